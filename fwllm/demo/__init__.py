"""What `fwllm demo` runs: the recipes each method merges an expert pool with, the pool's dev rows,
tuned task arithmetic, and the small pool-quality engine (merges scored with task metrics by
`fwllm.evaluation.likelihood`, bootstrap figures by `fwllm.evaluation.figures`, one table). The
benchmark harness (more methods, the best single expert, held-out tasks, paired differences, the
long report) lives in eval/fwbench and builds on this; fwllm never imports it."""
