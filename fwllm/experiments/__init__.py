"""Experiments over expert pools: the recipes each method merges a pool with, dev losses,
the merge matrix, the quality benchmark (`quality*`, `scoring`, `tuning`) and the demo
(what `fwllm demo` and the eval/ scripts run)."""
