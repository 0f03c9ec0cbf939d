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


def cholesky_lower(a: torch.Tensor, block: int = BLOCK, in_place: bool = False) -> Tuple[torch.Tensor, int]:
    """(L, info) as `torch.linalg.cholesky_ex(a)` gives for a 2-D `a`: L lower triangular with
    L L^T = a, reading only a's lower triangle; info = 0, or the 1-based order of the first leading
    minor that is not positive definite (then L is not meaningful).

    `in_place`: L is formed in a's lower triangle (with the diagonal) and returned as `a` itself;
    the strict upper triangle is neither read nor written, so it still holds whatever it held
    (a mirror of the matrix, say). Solvers that read only the lower triangle (`cholesky_solve`,
    `solve_triangular(upper=False)`) take it as it is; at a 7B MLP's 11008 inputs this saves a
    1 GB float64 copy."""
    n = a.shape[0]
    if a.dim() != 2 or n <= block:
        chol, info = torch.linalg.cholesky_ex(a)
        if in_place:
            a.copy_(chol + a.triu(1))
            chol = a
        return chol, int(info)
    work = a if in_place else a.tril()  # a copy unless in place; its upper triangle is never read
    for i in range(0, n, block):
        j = min(i + block, n)
        diag, info = torch.linalg.cholesky_ex(work[i:j, i:j])
        if int(info) != 0:
            return work, i + int(info)
        _set_lower(work[i:j, i:j], diag)
        if j == n:
            break
        # the panel below: L21 = A21 L11^-T
        panel = torch.linalg.solve_triangular(diag.T, work[j:, i:j], upper=True, left=False)
        work[j:, i:j] = panel
        # the trailing lower triangle: A22 -= L21 L21^T, one block row at a time; the block on the
        # diagonal through a small product, so that nothing above the diagonal is written
        for r in range(j, n, block):
            e = min(r + block, n)
            rows = panel[r - j : e - j]
            work[r:e, j:r].addmm_(rows, panel[: r - j].T, alpha=-1.0)
            work[r:e, r:e].sub_((rows @ rows.T).tril_())
    return (work if in_place else work.tril_()), 0


def _set_lower(out: torch.Tensor, lower: torch.Tensor) -> None:
    """out's lower triangle (with the diagonal) := lower's; out's strict upper one kept."""
    out.copy_(lower.tril() + out.triu(1))
