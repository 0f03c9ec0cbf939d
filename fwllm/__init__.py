"""fwllm: data-informed model merging (FW-Merging and friends) inside the mergekit ecosystem."""

__version__ = "0.1.0"
