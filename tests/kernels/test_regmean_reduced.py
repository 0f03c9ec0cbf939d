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


def test_a_gram_is_read_from_its_lower_triangle():
    """`add` takes a Gram as `add_lower_product` leaves it (anything above the diagonal): the merge
    is the one of the whole Gram, with a task vector on the input (mirrored in place first) and
    without one (the base's share of S only: never mirrored, never read above the diagonal)."""
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(600, 700, generator=g) for _ in range(3)]  # wider than a block of ROWS rows
    taus = [torch.randn(5, 700, generator=g), None, torch.randn(5, 700, generator=g)]
    whole, lower = RegMeanSums(alpha=0.8), RegMeanSums(alpha=0.8)
    for x, t, c in zip(xs, taus, [1.0, 2.0, 0.5]):
        gram = x.T @ x
        garbage = gram.tril() + torch.full_like(gram, 1e9).triu(1)
        whole.add(gram, {"o": t}, c)
        lower.add(garbage, {"o": t}, c)
        if t is None:
            assert garbage[0, 1] == 1e9  # left as it was
        else:
            torch.testing.assert_close(garbage, gram, rtol=0, atol=0)  # mirrored where a numerator needs it
    torch.testing.assert_close(lower.solve()[0]["o"], whole.solve()[0]["o"], rtol=0, atol=0)


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


def test_singular_gram_sum_past_one_factor_block_is_restored_for_the_ridge():
    # wider than the blocked Cholesky's block: the failed in-place factorisation has overwritten
    # part of S's lower triangle, which the ridge solve must get back from its mirror
    n = 300
    g = torch.Generator().manual_seed(90)
    xs = [torch.randn(120, n, generator=g, dtype=torch.float64) for _ in range(2)]  # 240 rows < 300
    grams = [(x.T @ x).float() for x in xs]
    taus = [torch.randn(5, n, generator=g) for _ in range(2)]
    sums = RegMeanSums(alpha=1.0)
    for gram, tau, c in zip(grams, taus, (1.0, 2.0)):
        sums.add(gram, {"w": tau}, weight=c)
    got, lam = sums.solve(ridge=1e-3)
    ref, ref_lam = regmean_merge(zip(taus, grams, (1.0, 2.0)), alpha=1.0, ridge=1e-3)
    assert lam == pytest.approx(ref_lam) and lam > 0
    torch.testing.assert_close(got["w"], ref, rtol=1e-4, atol=1e-5)


def test_zero_gram_returns_the_weighted_average_of_the_task_vectors():
    loras = [_lora(80, 6, 2, 1.0), _lora(81, 6, 2, 1.0)]
    sums = RegMeanSums(alpha=1.0)
    sums.add(torch.zeros(D_IN, D_IN), {"v": loras[0]}, weight=1.0)
    sums.add(torch.zeros(D_IN, D_IN), {"v": loras[1]}, weight=3.0)
    got, lam = sums.solve()
    assert lam == float("inf")
    torch.testing.assert_close(got["v"].dense(), 0.25 * loras[0].dense() + 0.75 * loras[1].dense())


# -- rows instead of Grams (Woodbury while the rows are few, the dense path past them) ------------
D_ROWS = 24  # rows are kept up to D_ROWS of them


def _explicit_solve(xs, taus, weights, alpha, ridge=1e-5):
    """Truth: S and N formed explicitly in float64 from the rows, torch.linalg.solve; the ridge
    of fwllm.kernels.regmean by its definition (lambda = ridge * mean diag S, towards the average)."""
    s = torch.zeros(D_ROWS, D_ROWS, dtype=torch.float64)
    n = avg = 0
    for x, tau, c in zip(xs, taus, weights):
        g = x.double().T @ x.double()
        g_tilde = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
        s += c * g_tilde
        n = n + c * g_tilde @ _dense(tau).T
        avg = avg + c * _dense(tau).T
    lam = 0.0
    if torch.linalg.matrix_rank(s) < D_ROWS:
        lam = ridge * float(s.diagonal().mean())
        s = s + lam * torch.eye(D_ROWS, dtype=torch.float64)
        n = n + lam * avg / sum(weights)
    return torch.linalg.solve(s, n).T, lam


def _row_candidates(seed, count, rows, zero_column=None):
    """`count` candidates with `rows` float32 activation rows each, alternately LoRA and dense."""
    g = torch.Generator().manual_seed(seed)
    xs, taus = [], []
    for i in range(count):
        x = torch.randn(rows, D_ROWS, generator=g) * torch.linspace(0.5, 2.0, D_ROWS)
        if zero_column is not None:
            x[:, zero_column] = 0.0
        xs.append(x)
        if i % 2 == 0:
            taus.append(LowRank(torch.randn(3, D_ROWS, generator=g), torch.randn(7, 3, generator=g), 0.7))
        else:
            taus.append(torch.randn(7, D_ROWS, generator=g))
    return xs, taus


def _dense(t):
    """A task vector as a float64 [out, in] tensor (a LowRank's product in float64)."""
    return t.scale * t.b.double() @ t.a.double() if isinstance(t, LowRank) else t.double()


@pytest.mark.parametrize("weights", [None, [0.3, 1.7, 1.0, 0.6]])
def test_few_rows_solve_by_woodbury_equal_the_explicit_solve_and_the_gram_path(weights):
    xs, taus = _row_candidates(90, 4, 3)  # k = 12 rows <= 24 / 2: never a Gram
    coef = weights or [1.0] * 4
    rows, grams = RegMeanSums(alpha=0.6), RegMeanSums(alpha=0.6)
    for x, t, c in zip(xs, taus, coef):
        rows.add_rows(x, {"o": t}, c) if weights else rows.add_rows(x, {"o": t})
        grams.add(x.double().T @ x.double(), {"o": t}, c)
    got, lam = rows.solve()
    assert rows.gram_sum is None  # solved from the rows: no [in, in] matrix was formed
    truth, truth_lam = _explicit_solve(xs, taus, coef, alpha=0.6)
    assert lam == truth_lam == 0.0
    assert isinstance(got["o"], torch.Tensor)  # LoRA and dense candidates mixed: a dense merge
    torch.testing.assert_close(got["o"].double(), truth, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["o"], grams.solve()[0]["o"], rtol=1e-6, atol=1e-7)


def test_all_lora_rows_merge_stays_a_lora():
    g = torch.Generator().manual_seed(91)
    xs = [torch.randn(4, D_ROWS, generator=g) for _ in range(3)]
    loras = [LowRank(torch.randn(2, D_ROWS, generator=g), torch.randn(5, 2, generator=g), 2.0) for _ in xs]
    sums = RegMeanSums(alpha=0.9)
    for x, t in zip(xs, loras):
        sums.add_rows(x, {"q": t}, 0.5)
    got, _ = sums.solve()
    assert isinstance(got["q"], LowRank) and got["q"].rank == 6
    truth, _ = _explicit_solve(xs, loras, [0.5] * 3, alpha=0.9)
    # float32 factors of rank 6: their rounding (~1e-7 of terms ~3) where the sum cancels to ~0.1
    torch.testing.assert_close(_dense(got["q"]), truth, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_rows_crossing_the_limit_fold_into_the_gram_sum(alpha):
    xs, taus = _row_candidates(92, 6, 5)  # 30 rows in all, over the limit of 24 at the fifth candidate
    coef = [0.5, 1.0, 2.0, 0.7, 1.3, 0.9]
    sums = RegMeanSums(alpha=alpha)
    rooms = []
    for i, (x, t, c) in enumerate(zip(xs, taus, coef)):
        rooms.append(sums.rows_room(D_ROWS))
        if i == 5:
            sums.add(x.double().T @ x.double(), {"o": t}, c)  # a Gram may come, too
        else:
            sums.add_rows(x, {"o": t}, c)
    assert rooms == [24, 19, 14, 9, 4, 0]
    got, lam = sums.solve()
    truth, truth_lam = _explicit_solve(xs, taus, coef, alpha)
    assert lam == truth_lam == 0.0  # 30 rows span the 24 coordinates: no ridge, even at alpha = 1
    torch.testing.assert_close(got["o"].double(), truth, rtol=1e-6, atol=1e-7)


def test_alpha_one_with_few_rows_falls_back_to_the_ridge():
    xs, taus = _row_candidates(93, 3, 4)  # 12 rows < 24 coordinates and no diagonal term: S is singular
    coef = [1.0, 0.5, 2.0]
    sums = RegMeanSums(alpha=1.0)
    for x, t, c in zip(xs, taus, coef):
        sums.add_rows(x, {"v": t}, c)
    got, lam = sums.solve(ridge=1e-3)
    truth, truth_lam = _explicit_solve(xs, taus, coef, alpha=1.0, ridge=1e-3)
    assert truth_lam > 0 and lam == pytest.approx(truth_lam, rel=1e-12)
    torch.testing.assert_close(got["v"].double(), truth, rtol=1e-5, atol=1e-6)


def test_an_input_coordinate_that_is_always_zero_falls_back_to_the_ridge():
    xs, taus = _row_candidates(94, 4, 2, zero_column=5)  # D = 0 there: no Woodbury, S singular
    coef = [1.0, 2.0, 1.0, 0.5]
    sums = RegMeanSums(alpha=0.7)
    for x, t, c in zip(xs, taus, coef):
        sums.add_rows(x, {"v": t}, c)
    got, lam = sums.solve(ridge=1e-4)
    truth, truth_lam = _explicit_solve(xs, taus, coef, alpha=0.7, ridge=1e-4)
    assert truth_lam > 0 and lam == pytest.approx(truth_lam, rel=1e-12)
    torch.testing.assert_close(got["v"].double(), truth, rtol=1e-5, atol=1e-6)
    # the unseen coordinate keeps the weighted average of the task vectors' column there
    avg = sum(c * _dense(t)[:, 5] for t, c in zip(taus, coef)) / sum(coef)
    torch.testing.assert_close(got["v"][:, 5].double(), avg, rtol=1e-5, atol=1e-6)


def test_rows_of_no_token_give_the_weighted_average():
    loras = [_lora(95, 6, 2, 1.0), _lora(96, 6, 2, 1.0)]
    sums = RegMeanSums(alpha=0.5)
    sums.add_rows(torch.zeros(0, D_IN), {"v": loras[0]}, weight=1.0)
    sums.add_rows(torch.zeros(0, D_IN), {"v": loras[1]}, weight=3.0)
    got, lam = sums.solve()
    assert lam == float("inf")
    torch.testing.assert_close(got["v"].dense(), 0.25 * loras[0].dense() + 0.75 * loras[1].dense())


@pytest.mark.parametrize("n", [5, 256, 257, 600, 1100])
def test_a_lower_product_mirrored_is_the_whole_gram(n):
    """`add_lower_product` then `symmetrize_` (blocks of BLOCK, n on and off a multiple of it) give
    alpha x^T x as torch forms it, exactly symmetric, whatever was above the diagonal before."""
    from fwllm.kernels.regmean_reduced import add_lower_product, symmetrize_

    g = torch.Generator().manual_seed(n)
    x = torch.randn(37, n, generator=g, dtype=torch.float64)
    out = torch.full((n, n), 1e9, dtype=torch.float64).triu_(1)  # garbage above, zeros on and below
    add_lower_product(out, x, alpha=0.5)
    symmetrize_(out)
    assert torch.equal(out, out.T)
    torch.testing.assert_close(out, 0.5 * x.T @ x, rtol=1e-12, atol=1e-12)
