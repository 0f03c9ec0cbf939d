"""A blocked Cholesky factorisation built from matrix products.

torch's `linalg.cholesky_ex` (MKL's potrf) ran at a fifth of the same machine's float64 matrix
product speed on the 2-core machines fwllm is benchmarked on (2048 x 2048: 87 ms, where its flops
take ~20 ms as products); RegMean factors one such matrix per layer input. Here only the small
diagonal blocks go to potrf; the panel is a triangular solve and the trailing update is products,
of the lower triangle only (a block row at a time). Same result to round-off: the same
elimination, in another order.
"""

from __future__ import annotations

from typing import Tuple

import torch

BLOCK = 256  # columns factored at a time (at 2048 and 4096, 256 was the fastest of 128 / 256 / 512)


def cholesky_lower(a: torch.Tensor, block: int = BLOCK) -> Tuple[torch.Tensor, int]:
    """(L, info) as `torch.linalg.cholesky_ex(a)` gives for a 2-D `a`: L lower triangular with
    L L^T = a, reading only a's lower triangle; info = 0, or the 1-based order of the first leading
    minor that is not positive definite (then L is not meaningful)."""
    n = a.shape[0]
    if a.dim() != 2 or n <= block:
        chol, info = torch.linalg.cholesky_ex(a)
        return chol, int(info)
    work = a.tril()  # a copy; the upper triangle is never read or written again
    for i in range(0, n, block):
        j = min(i + block, n)
        diag, info = torch.linalg.cholesky_ex(work[i:j, i:j])
        if int(info) != 0:
            return work, i + int(info)
        work[i:j, i:j] = diag
        if j == n:
            break
        # the panel below: L21 = A21 L11^-T
        panel = torch.linalg.solve_triangular(diag.T, work[j:, i:j], upper=True, left=False)
        work[j:, i:j] = panel
        # the trailing lower triangle: A22 -= L21 L21^T, one block row at a time
        for r in range(j, n, block):
            e = min(r + block, n)
            work[r:e, j:e].addmm_(panel[r - j : e - j], panel[: e - j].T, alpha=-1.0)
    # the trailing updates wrote the upper parts of the diagonal blocks: zero them
    return work.tril_(), 0
