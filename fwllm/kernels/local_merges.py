"""Task-vector combination steps as small pure functions (no I/O, no globals).

Each takes task vectors (tau_i = theta_i - theta_0 for one tensor) and mixing weights and
returns one combined delta, in two stages: `localize` turns one candidate's tau into its
own delta (TIES' trim, DARE's drop-and-rescale), `combine_local` merges those. FW-Merging
uses them to build its vertices; the same functions run again at execution time, so the
plan reproduces the solve exactly (DARE draws each candidate's mask from a generator
seeded by (seed, tensor, candidate)).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from fwllm.kernels.weighted_sum import weighted_sum

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


def localize(
    method: str,
    tau: torch.Tensor,
    density: float = 1.0,
    drop_rate: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One candidate's delta before combining: trim (ties), dare (dare_*), itself (task arithmetic).

    This is also FW's vertex for that candidate: theta_0 + lambda * localize(tau_i)."""
    if method not in LOCAL_MERGES:
        raise ValueError(f"unknown local merge {method!r}; choose from {LOCAL_MERGES}")
    if method == "ties":
        return trim(tau, density)
    if method.startswith("dare"):
        return dare(tau, drop_rate, generator)
    return tau


def combine_local(method: str, deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Combine localized deltas: a weighted sum (task_arithmetic, dare_linear) or TIES' elect
    and disjoint merge (ties, dare_ties). With one delta and w = 1 every method returns it."""
    if method in ("task_arithmetic", "dare_linear"):
        return weighted_sum(deltas, weights)
    return disjoint_merge(
        torch.stack([d.float() for d in deltas]), torch.tensor(list(weights), dtype=torch.float32)
    )
