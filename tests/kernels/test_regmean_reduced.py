"""Reduced RegMean statistics: checked against the existing closed form and against lstsq."""

import pytest
import torch

from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean import regmean_merge
from fwllm.kernels.regmean_reduced import RegMeanSums

D_IN = 12
OUTS = {"q": 12, "k": 6, "v": 6}  # three weights reading one input, as q/k/v do


def _inputs(seed, rows):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, D_IN, generator=g, dtype=torch.float64)


def _lora(seed, out, rank, scale):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, D_IN, generator=g), torch.randn(out, rank, generator=g), scale)


def _lstsq_merge(xs, weights):
    """argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, from the stacked problem."""
    x = torch.cat(xs)
    y = torch.cat([xi @ w.double().T for xi, w in zip(xs, weights)])
    return torch.linalg.lstsq(x, y).solution.T


def test_dense_equals_existing_closed_form_with_shared_input():
    torch.manual_seed(0)
    base = {n: torch.randn(o, D_IN) for n, o in OUTS.items()}
    experts = [{n: w + 0.1 * torch.randn_like(w) for n, w in base.items()} for _ in range(3)]
    grams = [(lambda x: x.T @ x)(_inputs(i, 20)).float() for i in range(3)]
    coef = [0.5, 1.0, 2.0]
    sums = RegMeanSums(alpha=0.7)
    for expert, gram, c in zip(experts, grams, coef):
        sums.add(gram, {n: expert[n] - base[n] for n in OUTS}, weight=c)
    merged, lam = sums.solve()
    assert lam == 0.0
    for n in OUTS:
        layers = ((e[n], g, c) for e, g, c in zip(experts, grams, coef))
        want, _ = regmean_merge(layers, alpha=0.7, ridge=1e-5)
        assert isinstance(merged[n], torch.Tensor)
        torch.testing.assert_close(base[n] + merged[n], want, rtol=1e-5, atol=1e-5)


def test_dense_alpha_one_is_the_joint_least_squares_solution():
    torch.manual_seed(1)
    base = torch.randn(OUTS["q"], D_IN)
    experts = [base + torch.randn_like(base) for _ in range(2)]
    xs = [_inputs(10, 8), _inputs(11, 9)]  # each rank-deficient alone (8, 9 < 12 rows), full rank together
    sums = RegMeanSums(alpha=1.0)
    for x, w in zip(xs, experts):
        sums.add(x.T @ x, {"q": w - base})
    merged, lam = sums.solve()
    assert lam == 0.0
    torch.testing.assert_close((base + merged["q"]).double(), _lstsq_merge(xs, experts), rtol=1e-5, atol=1e-5)


def test_two_lora_adapters_merge_to_the_joint_least_squares_solution_as_a_lora():
    torch.manual_seed(2)
    base = torch.randn(OUTS["q"], D_IN)
    loras = [_lora(20, OUTS["q"], 2, 0.5), _lora(21, OUTS["q"], 3, 2.0)]
    experts = [base + t.dense() for t in loras]
    xs = [_inputs(12, 30), _inputs(13, 25)]
    sums = RegMeanSums(alpha=1.0)
    for x, t in zip(xs, loras):
        sums.add(x.T @ x, {"q": t})
    merged, _ = sums.solve()
    delta = merged["q"]
    assert isinstance(delta, LowRank) and delta.scale == 1.0
    assert delta.rank == 5 and delta.a.shape == (5, D_IN) and delta.b.shape == (OUTS["q"], 5)
    truth = _lstsq_merge(xs, experts)
    torch.testing.assert_close((base + delta.dense()).double(), truth, rtol=1e-5, atol=1e-5)
    # the least-squares merge itself moves W_0 by a matrix of rank exactly sum r_i (float32 W_0: rtol 1e-5)
    assert int(torch.linalg.matrix_rank(truth - base.double(), rtol=1e-5)) == 5


def test_lora_factors_reproduce_the_dense_merge_with_weights_and_partial_targets():
    """Adapter 0 targets q and v only (k stays at W_0 for it, but its Gram still counts), FW-style weights."""
    loras = [
        {"q": _lora(30, 12, 2, 1.0), "v": _lora(31, 6, 2, 1.0)},
        {n: _lora(40 + j, o, 3, 0.25) for j, (n, o) in enumerate(OUTS.items())},
    ]
    grams = [(lambda x: x.T @ x)(_inputs(50 + i, 16)) for i in range(2)]
    coef = [0.3, 0.9]
    low, dense = RegMeanSums(alpha=0.5), RegMeanSums(alpha=0.5)
    for lo, g, c in zip(loras, grams, coef):
        low.add(g, lo, weight=c)
        dense.add(g, {n: t.dense() for n, t in lo.items()}, weight=c)
    got, _ = low.solve()
    want, _ = dense.solve()
    for n in OUTS:
        assert got[n].rank == sum(lo[n].rank for lo in loras if n in lo)
        torch.testing.assert_close(got[n].dense(), want[n], rtol=1e-5, atol=1e-6)
    # and the dense path is the existing closed form (W_0 = 0, so W_i = tau_i; missing = zero)
    for n, o in OUTS.items():
        taus = [lo[n].dense() if n in lo else torch.zeros(o, D_IN) for lo in loras]
        ref, _ = regmean_merge(zip(taus, grams, coef), alpha=0.5, ridge=1e-5)
        torch.testing.assert_close(got[n].dense(), ref, rtol=1e-5, atol=1e-6)


def test_mixed_dense_and_lora_candidates_give_a_dense_merge():
    lora = _lora(60, 6, 2, 1.5)
    tau = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(61))
    grams = [(lambda x: x.T @ x)(_inputs(62 + i, 20)) for i in range(2)]
    sums = RegMeanSums(alpha=0.9)
    sums.add(grams[0], {"k": lora})
    sums.add(grams[1], {"k": tau})
    got, _ = sums.solve()
    ref, _ = regmean_merge(zip([lora.dense(), tau], grams, [1.0, 1.0]), alpha=0.9, ridge=1e-5)
    assert isinstance(got["k"], torch.Tensor)
    torch.testing.assert_close(got["k"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low_rank", [True, False])
def test_singular_gram_sum_uses_the_same_ridge_as_the_existing_closed_form(low_rank):
    loras = [_lora(70, 6, 2, 1.0), _lora(71, 6, 1, 3.0)]
    grams = [(lambda x: x.T @ x)(_inputs(72 + i, 4)) for i in range(2)]  # 8 rows < 12: S is singular
    coef = [1.0, 0.5]
    sums = RegMeanSums(alpha=1.0)
    for t, g, c in zip(loras, grams, coef):
        sums.add(g, {"v": t if low_rank else t.dense()}, weight=c)
    got, lam = sums.solve(ridge=1e-3)
    ref, ref_lam = regmean_merge(zip([t.dense() for t in loras], grams, coef), alpha=1.0, ridge=1e-3)
    assert lam == pytest.approx(ref_lam) and lam > 0
    assert isinstance(got["v"], LowRank) == low_rank
    dense = got["v"].dense() if low_rank else got["v"]
    torch.testing.assert_close(dense, ref, rtol=1e-4, atol=1e-5)


def test_zero_gram_returns_the_weighted_average_of_the_task_vectors():
    loras = [_lora(80, 6, 2, 1.0), _lora(81, 6, 2, 1.0)]
    sums = RegMeanSums(alpha=1.0)
    sums.add(torch.zeros(D_IN, D_IN), {"v": loras[0]}, weight=1.0)
    sums.add(torch.zeros(D_IN, D_IN), {"v": loras[1]}, weight=3.0)
    got, lam = sums.solve()
    assert lam == float("inf")
    torch.testing.assert_close(got["v"].dense(), 0.25 * loras[0].dense() + 0.75 * loras[1].dense())
