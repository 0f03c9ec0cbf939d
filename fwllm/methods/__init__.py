"""Thin adapters, one per method: pool -> solver -> plan, and the per-tensor merge that
mergekit's executor calls. The built-in set is `fwllm.methods.registry.BUILTIN_METHODS`."""
