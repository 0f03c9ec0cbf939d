"""FW's step rules on a quadratic objective whose minimiser is known: line search, the adaptive
hull and pairwise steps, checked against closed forms and the feasible set."""

import pytest
import torch

from fwllm.core.params import FWParams
from fwllm.io.sketch_store import SketchStore
from fwllm.kernels.atoms import ta_coefficients
from fwllm.solvers.frank_wolfe import FrankWolfe
from fwllm.solvers.iterates import ModelIterate
from fwllm.solvers.plan_atoms import kernel_atoms

SHAPE = (3, 4)


class Candidate:
    """A candidate whose task vector is a fixed tensor (what the solver reads of a checkpoint)."""

    def __init__(self, label, tau):
        self.label, self.tau, self.adapter, self.bytes_read = label, tau, None, 0

    def task_vector(self, name, base):
        return self.tau.clone()


class Quadratic:
    """f(theta) = 1/2 ||theta - target||^2 for one block: gradient theta - target."""

    def __init__(self, param, target):
        self.param, self.target = param, target
        self.values = []
        self.passes = {"backward": 0, "forward only": 0, "value": 0}

    def __call__(self, consume, objective=None, accept=None):
        value = self._f()
        if accept is not None and not accept(value):  # as the streamed gradient: no backward
            self.passes["forward only"] += 1
            return value
        self.passes["backward"] += 1
        consume("w", (self.param.detach() - self.target).clone())
        return value

    def value(self, objective=None):
        self.passes["value"] += 1
        return self._f()

    def _f(self):
        return float(0.5 * (self.param.detach() - self.target).square().sum())


class NoSampling:
    def is_sampled_by(self, k):
        return False


def solver(taus, target, **params):
    p = FWParams(
        calibration="unused", sketch_ratio=1, init="base", preset="paper", **params
    )  # the old defaults
    w = torch.nn.Parameter(torch.zeros(SHAPE))  # theta_0 = 0
    candidates = [Candidate(f"c{i}", t) for i, t in enumerate(taus)]
    fw = FrankWolfe(
        ModelIterate({"w": w}),
        Quadratic(w, target),
        NoSampling(),
        candidates,
        [1.0] * len(taus),
        ["w"],
        p,
        lambda name: torch.zeros(SHAPE),
        progress=False,
        sketches=SketchStore(),
    )
    return fw, w


def taus_and_target(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    taus = [torch.randn(SHAPE, generator=g) for _ in range(n)]
    return taus, 0.4 * taus[0] + 0.3 * taus[1] + 0.05 * torch.randn(SHAPE, generator=g)


def test_line_search_takes_the_exact_minimiser_along_each_step():
    taus, target = taus_and_target()
    fw, w = solver(taus, target, iterations=5, step="line_search", scaling=1.0)
    trace, thetas = [], []
    original = fw._apply

    def apply(moves, atoms, gamma, relative=False):
        thetas.append(w.detach().clone())
        original(moves, atoms, gamma, relative)

    fw._apply = apply
    result = fw.run()
    for step, theta in zip(result.trace, thetas):
        chosen = step["chosen"]["w"]
        s = taus[chosen[0]] if chosen else torch.zeros(SHAPE)  # vertex theta_0 + lambda v, lambda = 1
        d = s - theta
        exact = float(((target - theta) * d).sum() / d.square().sum()) if d.any() else 0.0
        assert step["gamma"] == pytest.approx(min(1.0, max(0.0, exact)), abs=1e-5)
        trace.append(step["objective"])
    assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:]))  # exact line search never goes up


def test_adaptive_hull_reaches_the_one_dimensional_optimum():
    """One candidate, target c* tau with c* = 3.7: a fixed hull of scale 0.3 stops at 0.3 tau, a
    free one grows until the line search finds c*."""
    tau = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    off = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    off -= (off * tau).sum() / tau.square().sum() * tau  # orthogonal to tau: the 1-D optimum stays c*
    target = 3.7 * tau + off
    fixed, w_fixed = solver([tau], target, iterations=6, step="line_search", scaling=0.3)
    fixed.run()
    assert torch.allclose(w_fixed.detach(), 0.3 * tau, atol=1e-5)
    free, w_free = solver([tau], target, iterations=12, step="line_search", scaling=0.3, hull="adaptive")
    result = free.run()
    assert torch.allclose(w_free.detach(), 3.7 * tau, atol=1e-4)
    assert ta_coefficients(kernel_atoms(result.atoms["w"]), [1.0], 0.3) == pytest.approx([3.7], abs=1e-4)


def decoy_pool():
    """tau_1 = e_1, tau_2 = e_2, target = (e_1 + e_2) / 2 (in the hull, weights 1/2, 1/2); the decoy
    tau_0 = 0.9 (e_1 + e_2) + 0.8 e_3 aligns best with -g at the start, so FW takes it first, but its
    e_3 part only hurts: at the optimum it has no weight."""
    e = torch.eye(12).reshape(12, *SHAPE)
    return [0.9 * (e[0] + e[1]) + 0.8 * e[2], e[0], e[1]], 0.5 * (e[0] + e[1])


def run_recording(fw):
    """Run, and record each candidate's total weight after every step."""
    seen = []
    original = fw._apply

    def apply(moves, atoms, gamma, relative=False):
        original(moves, atoms, gamma, relative)
        weights = {}
        for a in atoms["w"]:
            assert len(a.members) == 1 and a.mix == [1.0]
            weights[a.members[0]] = weights.get(a.members[0], 0.0) + a.weight
        seen.append(weights)

    fw._apply = apply
    return fw.run(), seen


@pytest.mark.parametrize("step", ["open_loop", "line_search"])
def test_pairwise_steps_never_leave_the_hull(step):
    taus, target = decoy_pool()
    fw, _ = solver(taus, target, iterations=20, step=step, step_size=1.0, pairwise=True, scaling=1.0)
    _, seen = run_recording(fw)
    for weights in seen:  # a point of the convex hull at every step
        assert all(v >= -1e-9 for v in weights.values()) and sum(weights.values()) <= 1 + 1e-9


def test_pairwise_steps_drop_a_vertex_that_stopped_helping():
    taus, target = decoy_pool()
    pair, _ = solver(taus, target, iterations=30, step="line_search", pairwise=True, scaling=1.0)
    result, seen = run_recording(pair)
    assert seen[0].get(0, 0) > 0.3  # FW took the decoy first ...
    final = seen[-1]
    assert final.get(0, 0.0) < 1e-3  # ... and the pairwise steps took its mass away again
    assert final.get(1, 0) == pytest.approx(0.5, abs=1e-2) and final.get(2, 0) == pytest.approx(0.5, abs=1e-2)
    plain, _ = solver(taus, target, iterations=30, step="line_search", scaling=1.0)
    plain_result, plain_seen = run_recording(plain)
    assert plain_seen[-1].get(0, 0) > 0.02  # vanilla FW keeps a share of its first vertex
    assert result.final_objective < plain_result.final_objective


def coefficients(result, n):
    return ta_coefficients(kernel_atoms(result.atoms["w"]), [1.0] * n, 1.0)


def test_adaptive_step_retries_a_whole_step_at_the_exact_minimiser_of_a_one_dimensional_quadratic():
    """One candidate, target 0.37 tau (+ an orthogonal part): with no curvature known yet the
    first trial is the whole step; its value gives the exact parabola, whose minimiser 0.37 is
    taken on the retry. After that the slope is zero: no further step."""
    tau = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    off = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    off -= (off * tau).sum() / tau.square().sum() * tau
    fw, w = solver([tau], 0.37 * tau + off, iterations=4, step="adaptive", scaling=1.0)
    result = fw.run()
    assert coefficients(result, 1) == pytest.approx([0.37], abs=1e-5)
    assert result.trace[0]["trial_gamma"] == 1.0 and result.trace[0]["gamma"] == pytest.approx(0.37, abs=1e-5)
    # 4 gradients (one per iteration) and the rejected whole step's forward; no line-search evaluation
    assert fw.gradient.passes == {"backward": 4, "forward only": 1, "value": 1}


def test_adaptive_steps_never_go_up_and_keep_three_quarters_of_the_exact_line_search():
    """On a quadratic every step's parabola is exact: each step kept must decrease the objective
    by at least 3/4 of what the exact line search along the same move would (closed form)."""
    taus, target = taus_and_target(seed=3, n=4)
    fw, w = solver(taus, target, iterations=15, step="adaptive", scaling=1.0)
    seen = []
    original = fw._apply

    def apply(moves, atoms, gamma, relative=False):
        before = w.detach().clone()
        original(moves, atoms, gamma, relative)
        seen.append((before, w.detach().clone(), moves))

    fw._apply = apply
    result = fw.run()
    steps = {}  # the last step applied from each starting point (a retry replaces its trial)
    for before, after, moves in seen:
        steps[tuple(before.flatten().tolist())] = (before, after, moves)
    f = lambda theta: float(0.5 * (theta - target).square().sum())  # noqa: E731
    for before, after, moves in steps.values():
        toward = moves["w"][0]
        s = taus[toward.members[0]] if toward is not None else torch.zeros(SHAPE)
        d = s - before
        if not d.any():
            continue
        exact = min(1.0, max(0.0, float(((target - before) * d).sum() / d.square().sum())))
        best = f(before) - f(before + exact * d)
        assert f(before) - f(after) >= 0.75 * best - 1e-6
    values = [step["objective"] for step in result.trace] + [result.final_objective]
    assert all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
    searched, _ = solver(taus, target, iterations=15, step="line_search", scaling=1.0)
    assert result.final_objective <= searched.run().final_objective * 1.05 + 1e-9


def test_adaptive_step_costs_one_gradient_per_iteration_where_the_line_search_costs_three_passes():
    taus, target = taus_and_target(seed=4, n=3)
    adaptive, _ = solver(taus, target, iterations=10, step="adaptive", scaling=1.0)
    adaptive.run()
    searched, _ = solver(taus, target, iterations=10, step="line_search", scaling=1.0)
    searched.run()
    # the line search: a gradient per iteration, two trial points per step, and the final value
    assert searched.gradient.passes == {"backward": 10, "forward only": 0, "value": 2 * 10 + 1}
    passes = adaptive.gradient.passes
    assert passes["backward"] == 10 and passes["value"] <= 2  # a gradient per iteration, the final value ...
    # f's Hessian is I: along any move d its curvature in |d|^2 = sum d_i d_j <v_i, v_j> is exactly 1, so only
    # the first step (no curvature known yet) is retried
    assert passes["forward only"] == 1


def test_adaptive_step_grows_the_hull_to_the_one_dimensional_optimum():
    tau = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    fw, w = solver([tau], 3.7 * tau, iterations=12, step="adaptive", scaling=0.3, hull="adaptive")
    result = fw.run()
    assert coefficients(result, 1) == pytest.approx([3.7], abs=1e-4)
    assert torch.allclose(w.detach(), 3.7 * tau, atol=1e-4)


def test_adaptive_step_searches_where_scores_are_sketch_estimates():
    """A block of 10,000 entries is sketched at ratio 32: the slope would be an estimate, so each
    step is the line search's (two evaluations, recorded in the trace)."""
    g = torch.Generator().manual_seed(5)
    shape = (100, 100)
    taus = [torch.randn(shape, generator=g) for _ in range(2)]
    target = 0.5 * taus[0]
    w = torch.nn.Parameter(torch.zeros(shape))
    p = FWParams(
        calibration="unused", sketch_ratio=32, init="base", preset="paper", step="adaptive", iterations=3
    )
    fw = FrankWolfe(
        ModelIterate({"w": w}),
        Quadratic(w, target),
        NoSampling(),
        [Candidate(f"c{i}", t) for i, t in enumerate(taus)],
        [1.0, 1.0],
        ["w"],
        p,
        lambda name: torch.zeros(shape),
        progress=False,
        sketches=SketchStore(),
    )
    result = fw.run()
    assert fw.sketched and all("line_search" in step for step in result.trace)


class Blocks:
    """f = 1/2 ||w - target||^2 over block w, plus a large block z no candidate changes."""

    def __init__(self, params, target):
        self.params, self.target = params, target

    def __call__(self, consume, objective=None, accept=None):
        consume("w", (self.params["w"].detach() - self.target).clone())
        consume("z", self.params["z"].detach().clone())
        return self.value()

    def value(self, objective=None):
        return float(0.5 * (self.params["w"].detach() - self.target).square().sum())


def test_a_large_block_no_candidate_changes_does_not_make_the_slope_an_estimate():
    """Regression: a block of 10,000 entries that every candidate leaves at zero was sketched (zeros
    into 4,096 buckets), which marked the scores as estimates and sent every step to the line search."""
    taus, target = taus_and_target(seed=6, n=2)
    params = {"w": torch.nn.Parameter(torch.zeros(SHAPE)), "z": torch.nn.Parameter(torch.zeros(100, 100))}

    class TwoBlocks(Candidate):
        def task_vector(self, name, base):
            return self.tau.clone() if name == "w" else torch.zeros(100, 100)

    p = FWParams(
        calibration="unused", sketch_ratio=32, init="base", preset="paper", step="adaptive", iterations=3
    )
    fw = FrankWolfe(
        ModelIterate(params),
        Blocks(params, target),
        NoSampling(),
        [TwoBlocks(f"c{i}", t) for i, t in enumerate(taus)],
        [1.0, 1.0],
        ["w", "z"],
        p,
        lambda name: torch.zeros(SHAPE if name == "w" else (100, 100)),
        progress=False,
        sketches=SketchStore(),
    )
    result = fw.run()
    assert not fw.sketched and not any("line_search" in step for step in result.trace)
    assert result.final_objective < result.initial_objective


class Cliff(Quadratic):
    """The gradient of 1/2 ||theta - target||^2, but any move off theta_0 = 0 costs 1 more (or is NaN):
    every step the slope promises goes up."""

    def __init__(self, param, target, above=1.0):
        super().__init__(param, target)
        self.above = above

    def _f(self):
        start = float(0.5 * self.target.square().sum())
        return start if not self.param.detach().any() else start + self.above


@pytest.mark.parametrize("above", [1.0, float("nan")])
def test_a_step_that_goes_up_on_every_retry_is_undone(above):
    tau = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    fw, w = solver([tau], 0.5 * tau, iterations=2, step="adaptive", scaling=1.0)
    fw.gradient = Cliff(w, 0.5 * tau, above)
    result = fw.run()
    assert not w.detach().any()  # back at theta_0 after each step's retries all went up
    assert all(step["gamma"] == 0.0 for step in result.trace)
    assert [c["kept"] for c in result.trace[0]["checks"]] == [False] * 4  # the trial and 3 retries
    start = float(0.5 * (0.5 * tau).square().sum())
    assert [step["objective"] for step in result.trace] == pytest.approx([start, start])
    assert result.final_objective == pytest.approx(start)


def test_nan_is_never_kept_and_retried_shorter():
    from fwllm.kernels.step_rule import keeps, learned_curvature, retry_gamma

    nan = float("nan")
    assert not keeps(1.0, -1.0, 0.5, nan)
    assert not keeps(1.0, -1.0, 0.5, 0.4, end_slope=nan)
    assert keeps(1.0, -1.0, 0.5, 0.6, end_slope=-0.2)
    assert 0.0 < retry_gamma(1.0, -1.0, 0.5, nan) < 0.5
    assert learned_curvature(3.0, nan, 1.0) == 3.0


class Anisotropic(Quadratic):
    """f(theta) = 1/2 sum h (theta - target)^2: curvatures from 0.05 to 20 along the coordinates, so
    each candidate's direction has its own curvature (the metric <v_i, v_j> alone cannot tell them)."""

    def __init__(self, param, target, h):
        super().__init__(param, target)
        self.h = h

    def __call__(self, consume, objective=None, accept=None):
        value = self._f()
        if accept is not None and not accept(value):
            self.passes["forward only"] += 1
            return value
        self.passes["backward"] += 1
        consume("w", (self.h * (self.param.detach() - self.target)).clone())
        return value

    def _f(self):
        return float(0.5 * (self.h * (self.param.detach() - self.target).square()).sum())


def test_adaptive_step_learns_each_directions_curvature():
    """Four candidates, each on its own coordinates, curvatures 400x apart. A scalar curvature carried
    from one move to the next overshoots or stops short each time FW turns to another candidate; the
    N x N curvature learned from the scores' changes (exact along each direction a step has taken, on a
    quadratic) predicts the steps: after the first few, every step is kept on its first trial, and the
    objective ends where the exact line search's does."""
    h = torch.ones(SHAPE, dtype=torch.float32)
    taus = []
    for i, curvature in enumerate([0.05, 20.0, 1.0, 4.0]):
        tau = torch.zeros(SHAPE)
        tau.view(-1)[3 * i : 3 * i + 3] = torch.tensor([1.0, -0.5, 0.25])
        h.view(-1)[3 * i : 3 * i + 3] = curvature
        taus.append(tau)
    shares = [0.3, 0.2, 0.25, 0.15]  # inside the simplex: the optimum is the target itself
    target = sum(s * t for s, t in zip(shares, taus))
    fw, w = solver(taus, target, iterations=40, step="adaptive", scaling=1.0)
    fw.gradient = Anisotropic(w, target, h)
    result = fw.run()
    first_tries = [len(step.get("checks", [])) <= 1 for step in result.trace]
    assert all(first_tries[-20:]), [len(step.get("checks", [])) for step in result.trace]
    searched, ws = solver(taus, target, iterations=40, step="line_search", scaling=1.0)
    searched.gradient = Anisotropic(ws, target, h)
    assert result.final_objective <= searched.run().final_objective * 1.05 + 1e-9
