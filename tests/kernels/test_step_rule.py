"""The adaptive step's N x N curvature: BFGS's secant update and the rank-one raise along a direction,
checked against a quadratic whose Hessian is known."""

import torch

from fwllm.kernels.step_rule import LONGER, along_hessian, secant_hessian


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=torch.float64)
    return x @ x.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_secant_update_fits_each_step_and_converges_to_a_quadratics_hessian():
    n = 4
    true, metric = _spd(n, 0), _spd(n, 1)
    g = torch.Generator().manual_seed(2)
    h, errors = None, []
    for _ in range(60):
        step = torch.randn(n, generator=g, dtype=torch.float64)
        change = true @ step  # a quadratic's gradient changes by H s
        h = secant_hessian(h, step, change, metric)
        torch.testing.assert_close(h @ step, change)  # the secant equation, every step
        torch.testing.assert_close(h, h.T)
        assert float(torch.linalg.eigvalsh(h).min()) > 0.0  # stays positive definite
        errors.append(float(torch.linalg.matrix_norm(h - true) / torch.linalg.matrix_norm(true)))
    # BFGS on steps in every direction: the error falls from the scaled metric's to round-off
    assert errors[0] > 0.5 and errors[4 * n] < errors[0] / 5 and errors[-1] < 1e-3


def test_the_first_secant_scales_the_metric():
    metric = _spd(3, 3)
    step = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    change = 2.5 * metric @ step  # a quadratic whose Hessian is 2.5 times the metric
    torch.testing.assert_close(secant_hessian(None, step, change, metric), 2.5 * metric)


def test_no_curvature_seen_lengthens_the_next_steps():
    metric = _spd(3, 4)
    step = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert secant_hessian(None, step, -step, metric) is None
    h = _spd(3, 5)
    torch.testing.assert_close(secant_hessian(h, step, -step, metric), h * LONGER)


def test_a_value_raises_the_curvature_along_its_direction_only_upwards():
    metric, h = _spd(3, 6), _spd(3, 7)
    d = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64)
    now = float(d @ h @ d)
    raised = along_hessian(h, d, 3.0 * now, metric)
    assert abs(float(d @ raised @ d) - 3.0 * now) < 1e-9 * now
    assert float(torch.linalg.eigvalsh(raised - h).min()) > -1e-12  # a positive rank-one term
    torch.testing.assert_close(along_hessian(h, d, 0.5 * now, metric), h)  # never lowered
