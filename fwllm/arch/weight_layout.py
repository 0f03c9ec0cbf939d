"""Which weights are stored [in, out] (transformers' `Conv1D`: GPT-2's attention and MLP), the
transpose of `nn.Linear`'s [out, in].

A layer y = x W + b with W [in, out] is the linear layer with weight W^T: its Gram (RegMean) is
over its input x all the same, but a closed form written for [out, in] must see W^T. A square
Conv1D weight (GPT-2's attention output projection) cannot be told apart by its shape, so the
layout comes from the model's modules.
"""

from __future__ import annotations

import functools
from typing import Dict, FrozenSet, Optional

import torch


def conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - a transformers without Conv1D
        return None
    return Conv1D


def input_features(module: torch.nn.Module) -> int:
    """The width of a linear layer's input, whichever layout its weight has."""
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return int(module.weight.shape[0])
    return int(module.in_features)


def linear_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """Every linear map of the model by its weight name: nn.Linear and Conv1D."""
    kinds = tuple(k for k in (torch.nn.Linear, conv1d_class()) if k is not None)
    return {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, kinds)}


def transposed_weights(model: torch.nn.Module) -> FrozenSet[str]:
    """The weight names stored [in, out] (Conv1D)."""
    conv1d = conv1d_class()
    if conv1d is None:
        return frozenset()
    return frozenset(f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, conv1d))


@functools.lru_cache(maxsize=8)
def transposed_weights_of(model_dir: str, architecture: Optional[str] = None) -> FrozenSet[str]:
    """`transposed_weights` of a checkpoint folder, from its meta-device skeleton (no weight is read)."""
    from fwllm.arch.streaming import skeleton

    return transposed_weights(skeleton(model_dir, architecture))
