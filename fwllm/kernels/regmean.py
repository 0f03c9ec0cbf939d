"""RegMean's closed form (Jin et al., arXiv 2212.09849).

For layer weights W_i ([out, in], torch's layout) and Gram matrices G_i = X_i^T X_i of the
layer's inputs, W^T = (sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T with G~ = alpha G +
(1 - alpha) diag(G); alpha = 1 is the exact least-squares merge.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from fwllm.kernels.cholesky import cholesky_lower

# A Cholesky pivot below this fraction of the largest diagonal entry counts as singular.
SINGULAR_PIVOT = 1e-10


def reduce_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): the diagonal is kept, the off-diagonals shrink."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def cholesky_or_none(a: torch.Tensor, in_place: bool = False) -> Optional[torch.Tensor]:
    """a's Cholesky factor L (in a's lower triangle, with `in_place`: `cholesky_lower`), or None
    where a is not safely positive definite (then, in place, a's lower triangle is overwritten)."""
    scale = float(a.diagonal().max())
    chol, info = cholesky_lower(a, in_place=in_place)
    if info != 0:
        return None
    if float(chol.diagonal().square().min()) <= SINGULAR_PIVOT * scale:
        return None  # positive only through round-off: the solve would amplify noise
    return chol


def regmean_merge(
    layers: Iterable[Tuple[torch.Tensor, torch.Tensor, float]], alpha: float, ridge: float
) -> Tuple[torch.Tensor, float]:
    """Merge (W_i [out, in], G_i [in, in], weight c_i) triples, streamed one at a time.

    Returns (W, lambda): W^T = (sum c_i G~_i + lambda I)^-1 (sum c_i G~_i W_i^T + lambda W_avg^T),
    lambda = 0 unless the sum is singular, then ridge * mean(diag).
    """
    a = b = avg = None
    total = 0.0
    for w, gram, c in layers:
        g = reduce_gram(gram.double(), alpha) * c
        wt = w.double().T
        a = g if a is None else a + g
        b = g @ wt if b is None else b + g @ wt
        avg = wt * c if avg is None else avg + wt * c
        total += c
        del w, gram, g, wt  # before the next one is read: inputs may stream from disk
    avg /= total
    chol = cholesky_or_none(a)
    if chol is not None:
        return torch.cholesky_solve(b, chol).T.float(), 0.0
    lam = ridge * float(a.diagonal().mean())
    if lam <= 0:
        return avg.T.float(), float("inf")  # no input ever reached the layer: the average is all we know
    a.diagonal().add_(lam)
    b += lam * avg
    return torch.linalg.solve(a, b).T.float(), lam
