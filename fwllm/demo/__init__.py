"""What `fwllm demo` runs: the recipes each method merges an expert pool with, the pool's
dev rows, tuned task arithmetic, and the pool-quality engine (merges scored with task metrics
by `fwllm.evaluation.likelihood`, bootstrap figures by `fwllm.evaluation.figures`). The full
benchmark harness lives in eval/fwbench and builds on this; fwllm never imports it."""
