"""The blocked Cholesky against LAPACK's (torch.linalg.cholesky) and its definition L L^T = A."""

import pytest
import torch

from fwllm.kernels.cholesky import cholesky_lower


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return x @ x.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n,block", [(7, 3), (64, 16), (65, 16), (300, 64)])
def test_blocked_factor_equals_lapack_and_rebuilds_the_matrix(n, block):
    a = _spd(n)
    chol, info = cholesky_lower(a, block)
    assert info == 0
    torch.testing.assert_close(chol, torch.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chol @ chol.T, a, rtol=1e-10, atol=1e-12)
    assert torch.equal(chol, chol.tril())


def test_only_the_lower_triangle_is_read():
    a = _spd(50)
    garbage = a.tril() + torch.triu(torch.full_like(a, 7.0), 1)
    torch.testing.assert_close(
        cholesky_lower(garbage, 16)[0], torch.linalg.cholesky(a), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("bad", [0, 20, 45])
def test_a_matrix_that_is_not_positive_definite_reports_the_first_failing_minor(bad):
    a = _spd(50)
    # make the leading minor of order bad + 1 indefinite, and none before it
    a[bad, bad] = -1.0
    _, info = cholesky_lower(a, 16)
    assert info == torch.linalg.cholesky_ex(a)[1].item() == bad + 1


@pytest.mark.parametrize("n,block", [(7, 16), (64, 16), (65, 16), (300, 64)])
def test_in_place_factor_fills_the_lower_triangle_and_keeps_the_upper_one(n, block):
    a = _spd(n, seed=n)
    upper = torch.triu(torch.full_like(a, 7.0), 1)  # what a caller parked there (a mirror, say)
    work = a.tril() + upper
    chol, info = cholesky_lower(work, block, in_place=True)
    assert info == 0 and chol.data_ptr() == work.data_ptr()
    torch.testing.assert_close(work.tril(), torch.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
    assert torch.equal(work.triu(1), upper)
    # LAPACK's solve reads only the lower triangle: the parked upper one does not reach it
    rhs = torch.randn(n, 3, dtype=torch.float64)
    torch.testing.assert_close(
        torch.cholesky_solve(rhs, work), torch.linalg.solve(a, rhs), rtol=1e-8, atol=1e-10
    )
