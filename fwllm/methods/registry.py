"""fwllm's built-in data-informed methods, listed explicitly (as mergekit's own registry is)."""

from __future__ import annotations

from fwllm.core.registry import Registry
from fwllm.methods.adamerging import AdaMerging
from fwllm.methods.fisher import FisherMerging
from fwllm.methods.fw_merging import FWMerging
from fwllm.methods.regmean import RegMean

BUILTIN_METHODS = (FWMerging(), FisherMerging(), RegMean(), AdaMerging())
METHODS = Registry(BUILTIN_METHODS)
