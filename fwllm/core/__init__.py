"""The bottom layer: errors, paths, parameters with their ranges, the job, typed plans,
the method base class and the registry. Nothing here imports another fwllm room."""
