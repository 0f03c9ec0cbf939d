"""Where fwllm meets mergekit: the GroupMergeMethod adapter, the startup hook that registers
it for plain `mergekit-yaml`, strict recipe reading, and `merge.merge_recipe`, the library
entry point. Kept import-free: the startup hook imports `fwllm.mergekit_glue.hook` whenever
mergekit is imported."""
