"""Fisher merging's formulas (Matena & Raffel, arXiv 2111.09832).

An example's diagonal Fisher is sum over terms of w * (grad term)^2, each term squared
on its own; the terms are given here, the gradients are taken by the solver.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fwllm.core.errors import FwllmError

# A term of an example's Fisher: (a scalar log-likelihood, its probability weight).
Term = Tuple[torch.Tensor, float]


def prediction_terms(
    logits: torch.Tensor, targets: Optional[torch.Tensor], fisher: str, top_k: int
) -> List[Term]:
    """Terms of one example whose predicted positions have `logits` [P, C].

    exact: (log p_t(v), p~_t(v)) for the top_k outputs v of each position t, p~ renormalised
    over those k (top_k <= 0: every output, p~ = p); empirical: one (sum_t log p_t(target_t), 1).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if fisher == "empirical":
        if targets is None:
            raise FwllmError(
                "the empirical Fisher needs observed labels; these rows have none (use fisher: exact)"
            )
        return [(logp.gather(-1, targets.view(-1, 1)).sum(), 1.0)]
    k = logp.shape[-1] if top_k <= 0 else min(top_k, logp.shape[-1])
    terms = []
    for t in range(logp.shape[0]):
        top = logp[t].detach().exp().topk(k)
        weights = top.values / top.values.sum()
        terms.extend((logp[t, v], float(w)) for v, w in zip(top.indices.tolist(), weights.tolist()))
    return terms


def gaussian_terms(prediction: torch.Tensor, target: Optional[torch.Tensor], fisher: str) -> List[Term]:
    """Regression under y ~ N(f, 1): E_y[(grad log p)^2] = (grad f)^2; empirical: ((y - f) grad f)^2."""
    if fisher == "empirical":
        if target is None:
            raise FwllmError(
                "the empirical Fisher needs observed labels; these rows have none (use fisher: exact)"
            )
        return [(-0.5 * (target.float() - prediction.float()).square().sum(), 1.0)]
    return [(prediction.float().sum(), 1.0)]


def fisher_merge(
    thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], weights: Sequence[float], epsilon: float
) -> torch.Tensor:
    """sum_i w_i F_i theta_i / sum_i w_i F_i with F_i floored at epsilon (> 0)."""
    num = den = None
    thetas, fishers = iter(thetas), iter(fishers)
    for w in weights:  # not zip(): zip keeps its last items alive while it fetches the next ones
        theta, fisher = next(thetas), next(fishers)
        f = fisher.float().clamp_min(epsilon) * w
        num = f * theta.float() if num is None else num.add_(f * theta.float())
        den = f if den is None else den.add_(f)
        del theta, fisher, f  # before the next one is read: inputs may stream from disk
    return num / den


def linear_square_sum(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """sum((dY^T X)^2), the squared norm of a linear weight's gradient from its inputs x [..., in] and
    output gradients dy [..., out], without forming the out x in gradient: ||dY^T X||^2 =
    <X X^T, dY dY^T> over the N rows (N x N Grams; float64: the sum enters a reported mean)."""
    x, dy = x.reshape(-1, x.shape[-1]).double(), dy.reshape(-1, dy.shape[-1]).double()
    return ((x @ x.T) * (dy @ dy.T)).sum()


def embedding_square_sum(
    ids: torch.Tensor, de: torch.Tensor, padding_idx: Optional[int] = None
) -> torch.Tensor:
    """sum(G^2) for an embedding's gradient G (row v = sum of the output gradients de [..., dim] at the
    positions of token v), without forming the vocab x dim G: positions of one token pair up. The
    `padding_idx` row gets no gradient (as torch.nn.Embedding's): its positions are left out."""
    ids, de = ids.reshape(-1), de.reshape(-1, de.shape[-1]).double()
    if padding_idx is not None:
        keep = ids != padding_idx
        ids, de = ids[keep], de[keep]
    return ((de @ de.T) * (ids[:, None] == ids[None, :])).sum()


def total(t: torch.Tensor) -> float:
    """sum(t), from float32 sums of its rows added in float64. torch's float64 sum of a float32 tensor
    converts element by element: ~12x this (eval/reduction_kernels.py; at 7B, ~0.5 s per candidate
    and layer, a quarter of a Fisher pass). A row of a few thousand floats summed pairwise in float32
    is good to ~1e-7."""
    if t.dim() < 2:
        return float(t.sum(dtype=torch.float64))
    return float(t.reshape(t.shape[0], -1).sum(1).sum(dtype=torch.float64))
