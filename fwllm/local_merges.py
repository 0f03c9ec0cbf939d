"""Task-vector combination steps as small pure functions (no I/O, no globals).

Each takes task vectors (tau_i = theta_i - theta_0 for one tensor) and mixing weights and
returns one combined delta. FW-Merging uses them to build a vertex from the selected
candidates; the same functions run again at execution time, so the plan reproduces the
solve exactly (DARE draws its masks from a generator seeded by the plan).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

LOCAL_MERGES = ("task_arithmetic", "ties", "dare_ties", "dare_linear")


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (TIES' trim)."""
    if density >= 1.0:
        return delta
    k = int(round(density * delta.numel()))
    if k <= 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


def dare(delta: torch.Tensor, drop_rate: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Drop entries with probability `drop_rate` and rescale survivors by 1/(1-p) (DARE)."""
    if drop_rate <= 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) >= drop_rate
    return delta * keep.to(delta.dtype) / (1.0 - drop_rate)


def elect_sign(weighted: torch.Tensor) -> torch.Tensor:
    """Majority sign per entry by summed mass (TIES' elect); zeros count as positive."""
    return torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_merge(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the entries that agree with the elected sign (TIES' merge)."""
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
    weighted = deltas * w
    agree = (torch.sign(deltas) == elect_sign(weighted)) & (deltas != 0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (weighted * agree).sum(0) / mass.clamp_min(1e-12), torch.zeros_like(mass))


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.reshape(-1, *([1] * (deltas.dim() - 1))).to(deltas.dtype)
    return (deltas * w).sum(0)


def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_j w_j tau_j, consuming one task vector at a time (memory does not grow with N)."""
    total = None
    for w, d in zip(weights, deltas):
        total = d.float() * w if total is None else total.add_(d.float(), alpha=w)
    if total is None:
        raise ValueError("weighted_sum of no task vectors")
    return total


def combine(
    method: str,
    deltas: Iterable[torch.Tensor],
    weights: Sequence[float],
    density: float = 1.0,
    drop_rate: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One combined delta from selected task vectors.

    task_arithmetic: sum_j w_j tau_j
    ties:            disjoint_merge(trim(tau_j, density), w)
    dare_linear:     sum_j w_j dare(tau_j)
    dare_ties:       disjoint_merge(dare(tau_j), w)
    With one task vector and w = 1, ties reduces to trim(tau) and dare_* to dare(tau).
    """
    if method not in LOCAL_MERGES:
        raise ValueError(f"unknown local merge {method!r}; choose from {LOCAL_MERGES}")
    if method == "task_arithmetic":
        return weighted_sum(deltas, weights)
    w = torch.tensor(list(weights), dtype=torch.float32)
    if method in ("dare_ties", "dare_linear"):
        deltas = [dare(d, drop_rate, generator) for d in deltas]
    elif method == "ties":
        deltas = [trim(d, density) for d in deltas]
    stacked = torch.stack(list(deltas))
    if method == "dare_linear":
        return task_arithmetic(stacked, w)
    return disjoint_merge(stacked, w)
