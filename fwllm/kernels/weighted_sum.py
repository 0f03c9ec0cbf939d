"""The one streamed weighted sum every method's merge uses.

Inputs may be generators that read each tensor from disk on demand; each is consumed
and dropped before the next is read, so the sum holds one input and the accumulator.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def weighted_sum(
    tensors: Iterable[torch.Tensor], weights: Sequence[float], start: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """start + sum_j w_j t_j in float32, consuming one tensor at a time."""
    total = None if start is None else start.float().clone()
    tensors = iter(tensors)
    for w in weights:  # not zip(): zip keeps its last items alive while it fetches the next ones
        t = next(tensors)
        if total is None:
            total = t.float() * w  # a new tensor: the inputs are never written to
        else:
            total.add_(t.float(), alpha=w)
        del t  # before the next one is read: inputs may stream from disk
    if total is None:
        raise ValueError("weighted_sum of no tensors")
    return total


def weighted_average(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i: the fallback for tensors a statistic does not cover."""
    total = float(sum(weights))
    return weighted_sum(tensors, [w / total for w in weights])
