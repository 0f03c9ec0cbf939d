"""FW's adaptive step: a step size from a curvature learned along the run, checked by the next
iteration's own forward pass instead of by extra evaluations (scalars in, scalars out).

Along a move d (gamma in [0, 1] is the share of it taken) the objective is modelled as the
parabola f(gamma) = f0 + slope * gamma + a * gamma^2, where slope = <g, d> is exact from the LMO's
scores (every step a linear combination of task vectors, every score exact). The curvature is
carried between moves as a = curvature * |d|^2 / 2, |d| the length of the move in candidate
coefficients, so that a longer move (a grown hull) expects a proportionally larger a.

One trial per iteration: gamma = the model's minimiser. The value at the trial point comes with
the next gradient (its forward); the parabola through f0 with the known slope and that value
gives the curvature along this very move, which the next move inherits. Only a step that went
too far is taken again: past the parabola's minimiser and short of `KEEP_SHARE` of its best
decrease (for an exact parabola: beyond 1.5 times the minimiser). It is then taken at that
minimiser, an interpolation inside the first step, checked again the same way; each retry costs
one forward. A step that fell short, or did better than the parabola's curvature allows (a <= 0:
no minimiser to trust), is kept, and the next move's model learns from it. This is the
backtracking line search of Pedregosa et al., "Linearly convergent Frank-Wolfe with backtracking
line-search" (AISTATS 2020, arXiv 1806.05123) with its quadratic model, except that the check
reuses the next iteration's forward, so a step kept costs no evaluation at all.
"""

from __future__ import annotations

import math
from typing import Optional

KEEP_SHARE = 0.75  # a trial keeping 3/4 of the parabola's best decrease is not retried
# a step promising less than this share of the objective is taken unchecked, and teaches nothing:
# a parabola fitted to so small a change is mostly the float32 rounding of the loss
RESOLUTION = 1e-4
SHORTER = 0.5  # a <= 0 (no curvature seen): the next move's curvature is the last one's times this


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


def decrease(slope: float, a: float, gamma: float) -> float:
    """f0 - f(gamma) under the parabola."""
    return -(slope * gamma + a * gamma * gamma)


def keeps(slope: float, a: float, gamma: float) -> bool:
    """The trial `gamma` is kept: it did not pass the parabola's minimiser, or it reached
    KEEP_SHARE of the parabola's best decrease over [0, 1] anyway."""
    if a <= 0.0 or gamma <= parabola_minimiser(slope, a):
        return True
    best = decrease(slope, a, parabola_minimiser(slope, a))
    return best <= 0.0 or decrease(slope, a, gamma) >= KEEP_SHARE * best


def predicted_gamma(slope: float, length_sq: float, curvature: Optional[float]) -> float:
    """The trial step: the minimiser of the parabola the carried curvature gives this move (a whole
    step while no curvature is known, or where the last move was not convex)."""
    if slope >= 0.0 or length_sq <= 0.0:
        return 0.0
    if curvature is None or not math.isfinite(curvature) or curvature <= 0.0:
        return 1.0
    return parabola_minimiser(slope, curvature * length_sq / 2.0)


def learned_curvature(previous: Optional[float], a: float, length_sq: float) -> Optional[float]:
    """What a move of squared length `length_sq` whose parabola has coefficient `a` teaches the
    next: its curvature; where it showed none (a <= 0), a longer step than the last one's."""
    if a > 0.0:
        return 2.0 * a / length_sq
    return None if previous is None else previous * SHORTER


def checkable(f0: float, slope: float, gamma: float) -> bool:
    """The first-order decrease of the step stands above the rounding of the objective."""
    return -slope * gamma > RESOLUTION * max(abs(f0), 1e-30)
