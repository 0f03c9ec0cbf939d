"""Importing this module registers fwllm's built-in data-informed methods."""

from fwllm import fw_method  # noqa: F401  fw_merging
from fwllm import fisher  # noqa: F401
from fwllm import regmean  # noqa: F401
from fwllm import adamerging  # noqa: F401
