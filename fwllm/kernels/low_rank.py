"""Low-rank deltas kept as factors: Delta W = scale * B A, never formed densely.

A task-arithmetic merge of LoRA terms sum_i c_i s_i B_i A_i is itself a LoRA of rank sum r_i
(A = [A_i] stacked, B = [c_i s_i B_i] side by side). Truncating it to rank k goes through QR of
B and A^T (B = Q_b R_b, A^T = Q_a R_a, so B A = Q_b (R_b R_a^T) Q_a^T): only the small
(sum r) x (sum r) core is decomposed, which keeps it cheap for 7B-sized layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch


@dataclass
class LowRank:
    """Delta W = scale * b @ a, for a weight [out, in]."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> Tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def dense(self) -> torch.Tensor:
        return (self.b.double() @ self.a.double() * self.scale).float()


def weighted_sum(terms: Sequence[LowRank], weights: Sequence[float]) -> LowRank:
    """sum_i w_i * scale_i * B_i A_i as one LowRank of rank sum r_i, scale 1 (the concatenation)."""
    if len(terms) != len(weights) or not terms:
        raise ValueError("weighted_sum needs one weight per term, and at least one term")
    a = torch.cat([t.a.float() for t in terms], dim=0)
    b = torch.cat([t.b.float() * (w * t.scale) for t, w in zip(terms, weights)], dim=1)
    return LowRank(a, b)


def singular_factors(delta: LowRank) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [out, q], sigma [q], V^T [q, in]) with scale * B A = U diag(sigma) V^T, from QR of the factors."""
    qb, rb = torch.linalg.qr(delta.b.double())  # [out, p], [p, r]
    qa, ra = torch.linalg.qr(delta.a.double().T)  # [in, p'], [p', r]
    u, sigma, vt = torch.linalg.svd(rb @ ra.T * delta.scale, full_matrices=False)
    return qb @ u, sigma, vt @ qa.T


def truncate(delta: LowRank, rank: int) -> Tuple[LowRank, float]:
    """The best rank-`rank` approximation (Eckart-Young) and its relative Frobenius error.

    sqrt(sigma) goes to each factor so A and B keep comparable magnitudes (fp16/bf16 storage)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (got {rank})")
    u, sigma, vt = singular_factors(delta)
    k = min(rank, int(sigma.numel()))
    total = float(sigma.square().sum())
    dropped = float(sigma[k:].square().sum())
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    root = sigma[:k].sqrt()
    return LowRank((root[:, None] * vt[:k]).float(), (u[:, :k] * root).float()), error


def inner_products(terms: Sequence[Optional[Union[torch.Tensor, LowRank]]]) -> torch.Tensor:
    """The float64 Gram <t_i, t_j> of one weight's terms, each a dense tensor, a LowRank (never
    formed: <s B A, s' B' A'> = s s' sum((B^T B') * (A A'^T)), <s B A, V> = s sum((B^T V) * A)) or
    None (zero)."""
    n = len(terms)
    out = torch.zeros(n, n, dtype=torch.float64)
    for i, ti in enumerate(terms):
        for j in range(i, n):
            tj = terms[j]
            if ti is None or tj is None:
                continue
            if isinstance(ti, LowRank) and isinstance(tj, LowRank):
                value = (
                    ti.scale
                    * tj.scale
                    * torch.sum((ti.b.double().T @ tj.b.double()) * (ti.a.double() @ tj.a.double().T))
                )
            elif isinstance(ti, LowRank) or isinstance(tj, LowRank):
                low, dense = (ti, tj) if isinstance(ti, LowRank) else (tj, ti)
                v = dense.double().reshape(low.shape)
                value = low.scale * torch.sum((low.b.double().T @ v) * low.a.double())
            else:
                value = torch.dot(ti.double().reshape(-1), tj.double().reshape(-1))
            out[i, j] = out[j, i] = float(value)
    return out
