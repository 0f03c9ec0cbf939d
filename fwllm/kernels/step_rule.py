"""FW's adaptive step: a step size from a curvature learned along the run, checked by the next
iteration's own gradient instead of by extra evaluations.

Along a move d (gamma in [0, 1] is the share of it taken) the slope <g, d> is exact from the LMO's
scores (every step a linear combination of task vectors, every score exact), at the start of the
step and, from the next iteration's scores, at its end. The step taken is the minimiser of the
parabola f0 + slope * gamma + a * gamma^2. Where every block moves by one direction d in the N
candidates' coefficients, a = d^T H d / 2 with H an N x N curvature learned from each step's change of
scores (`secant_hessian`, BFGS); elsewhere a = curvature * |d|^2 / 2, a scalar carried from the last move
in the metric of the weights, so that a longer move expects a larger a.

The next gradient brings the value and the slope where the step ended. The step is kept when it
decreased the objective (Armijo's condition) and did not go far past the minimum along d (the slope
at its end is below CURVATURE times the start's magnitude: a Wolfe curvature condition; on a
quadratic, within 1.5 times the exact minimiser). Otherwise it is taken again at the zero of the
slope interpolated between both ends (the secant; exact on a quadratic), which costs one more
gradient, or, where only a value is known, at the minimiser of the parabola through it. The
curvature the next move inherits is that secant's. Values alone (a parabola through f0 with the
start's slope) mislead where the loss falls steeply and then flattens along d: they shorten every
step. Pedregosa et al. (AISTATS 2020, arXiv 1806.05123) check the same quadratic model by
backtracking; here the check is the next iteration's own gradient, so a step kept costs nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ARMIJO = 1e-4  # the share of the first-order decrease a kept step must reach
CURVATURE = 0.5  # a kept step's end slope is at most this times the start's magnitude
# a step promising less than this share of the objective is taken unchecked, and teaches nothing:
# so small a change is mostly the float32 rounding of the loss
RESOLUTION = 1e-4
LONGER = 0.5  # no curvature seen (the slope grew less negative by nothing): the next curvature, times this


def fitted_a(f0: float, slope: float, gamma: float, value: float) -> float:
    """a of the parabola through (0, f0) with slope `slope` there and through (gamma, value)."""
    return (value - f0 - slope * gamma) / (gamma * gamma)


def parabola_minimiser(slope: float, a: float) -> float:
    """argmin over [0, 1] of slope * gamma + a * gamma^2 (slope < 0: a descent direction)."""
    if slope >= 0.0:
        return 0.0
    if a <= 0.0:  # not convex along the move: the parabola falls all the way to the boundary
        return 1.0
    return min(1.0, -slope / (2.0 * a))


def secant_a(slope: float, gamma: float, end_slope: float) -> float:
    """a of the parabola whose slope goes from `slope` at 0 to `end_slope` at gamma."""
    return (end_slope - slope) / (2.0 * gamma)


def keeps(f0: float, slope: float, gamma: float, value: float, end_slope: Optional[float] = None) -> bool:
    """Armijo's decrease, and (where the end slope is known) no step far past the minimum. A NaN
    value or slope is never kept."""
    if not value <= f0 + ARMIJO * gamma * slope:
        return False
    return end_slope is None or end_slope <= CURVATURE * abs(slope)


def retry_gamma(
    f0: float, slope: float, gamma: float, value: float, end_slope: Optional[float] = None
) -> float:
    """Where a step that was not kept is taken again (always inside it)."""
    if not math.isfinite(value):
        return gamma / 4.0  # nothing to fit: much shorter
    if end_slope is not None and end_slope > 0.0:
        return gamma * (-slope) / (end_slope - slope)  # the secant's zero of the slope
    return min(gamma, parabola_minimiser(slope, fitted_a(f0, slope, gamma, value)))


def learned_curvature(previous: Optional[float], a: float, length_sq: float) -> Optional[float]:
    """What a move of squared length `length_sq` whose parabola has coefficient `a` teaches the
    next: its curvature; where it showed none (a <= 0), a longer step than the last one's; a NaN
    (the objective was not finite there) teaches nothing."""
    if not math.isfinite(a):
        return previous
    if a > 0.0:
        return 2.0 * a / length_sq
    return None if previous is None else previous * LONGER


def predicted_gamma(slope: float, length_sq: float, curvature: Optional[float]) -> float:
    """The trial step: the minimiser of the parabola the carried curvature gives this move (a whole
    step while no curvature is known)."""
    if slope >= 0.0 or length_sq <= 0.0:
        return 0.0
    if curvature is None or not math.isfinite(curvature) or curvature <= 0.0:
        return 1.0
    return parabola_minimiser(slope, curvature * length_sq / 2.0)


def checkable(f0: float, slope: float, gamma: float) -> bool:
    """The first-order decrease of the step stands above the rounding of the objective."""
    return -slope * gamma > RESOLUTION * max(abs(f0), 1e-30)


def secant_hessian(
    hessian: Optional[torch.Tensor], step: torch.Tensor, change: torch.Tensor, metric: torch.Tensor
) -> Optional[torch.Tensor]:
    """The N x N curvature in the candidates' coefficients after a step `step` changed the scores
    (the gradient in those coefficients) by `change`: BFGS's update, so that H step = change (on a
    quadratic, exact along every direction seen). The first one starts from the metric <v_i, v_j>
    scaled to the step's curvature. A step that showed no curvature (step . change <= 0) leaves it
    longer (times LONGER), as the scalar rule does."""
    sy = float(step @ change)
    if not math.isfinite(sy):
        return hessian
    if sy <= 0.0:
        return None if hessian is None else hessian * LONGER
    if hessian is None:
        sms = float(step @ metric @ step)
        if sms <= 0.0:
            return None
        hessian = metric * (sy / sms)
    hs = hessian @ step
    shs = float(step @ hs)
    if shs <= 0.0:
        return hessian
    return hessian - torch.outer(hs, hs) / shs + torch.outer(change, change) / sy


def along_hessian(
    hessian: torch.Tensor, d: torch.Tensor, curvature: float, metric: torch.Tensor
) -> torch.Tensor:
    """`hessian` raised along d to `curvature` = d^T H d (what a value alone showed: a step that went
    too far), by a rank-one term in the metric's direction M d; never lowered (it stays positive)."""
    now = float(d @ hessian @ d)
    u = metric @ d
    norm = float(d @ u)
    if not math.isfinite(curvature) or curvature <= now or norm <= 0.0:
        return hessian
    return hessian + torch.outer(u, u) * ((curvature - now) / (norm * norm))
