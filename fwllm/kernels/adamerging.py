"""Layer-wise AdaMerging's formulas (Yang et al., arXiv 2310.02575).

theta_l = theta0_l + sum_i lambda_{l,i} tau_{l,i}; by the chain rule
dE/dlambda_{l,i} = <dE/dtheta_l, tau_{l,i}>, so no graph through the merge is needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def merged_tensor(theta0: torch.Tensor, taus: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """theta0 + sum_i lambda_i tau_i for taus stacked as [N, *shape]."""
    return theta0 + torch.tensordot(lambdas.to(taus.dtype), taus, dims=1)


def coefficient_gradient(
    grads: Sequence[Optional[torch.Tensor]], taus: Sequence[torch.Tensor]
) -> torch.Tensor:
    """[L, N] matrix of <dE/dtheta_l, tau_{l,i}>, i.e. dE/dlambda_{l,i}."""
    return torch.stack(
        [
            torch.zeros(t.shape[0]) if g is None else (t.flatten(1) @ g.flatten().to(t.dtype)).cpu()
            for g, t in zip(grads, taus)
        ]
    )
