"""The linear minimisation oracle (LMO) over {theta_0} U {theta_0 + lambda * tau_i}.

Per block the vertex minimising <g, s> is the base when every <g, tau_i> >= 0, else the
candidate with the most negative inner product; soft FW takes the top k and mixes them
on the simplex.
"""

from __future__ import annotations

from typing import List

import torch


def choose_vertex(scores: torch.Tensor) -> int:
    """Index of the best candidate vertex, or -1 for the base (ties and zeros go to the base)."""
    if scores.numel() == 0:
        return -1
    best = int(torch.argmin(scores))
    return best if float(scores[best]) < 0 else -1


def choose_top_k(scores: torch.Tensor, k: int) -> List[int]:
    """Up to k candidates aligned with -g, most aligned first (empty list = base vertex)."""
    order = torch.argsort(scores)
    return [int(i) for i in order[:k] if float(scores[i]) < 0]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, exact)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    ks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / ks > 0).max())
    return torch.clamp(v - css[rho] / (rho + 1), min=0)
