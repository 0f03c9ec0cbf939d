"""The Frank-Wolfe loop over the convex hull of {theta_0} U {theta_0 + lambda * v_i}.

theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t,   gamma_t = step_size * 2 / (t + 2)

v_i = localize(w_i tau_i) (`fwllm.kernels.atoms`). s_t is chosen per block (one weight
tensor, `granularity: tensor`) or for the whole model (`granularity: model`) by the LMO in
`fwllm.kernels.lmo`, on the sketched scores <g, v_i> of `fwllm.kernels.sketch`. The iterate
is kept in the model being differentiated and, in parallel, as a list of atoms per block:
the plan mergekit executes.

Where theta_t lives is the iterate's business, behind one protocol (`fwllm.solvers.iterates`):
a model in RAM, an on-disk store, or, for a LoRA pool, nowhere but in the coefficients of its atoms. The
gradient comes from `FullGradient` (one backward through a model in RAM) or
`StreamedGradient` (one layer at a time). Scores: a LoRA candidate's <g, s B A> is exact
(<B^T g, A> from a weight gradient, or from the LoRA hooks when no weight gradient is
formed); other candidates are scored on sketches. Task vectors stream one tensor at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from fwllm.core.params import FWParams
from fwllm.core.plan import Atom
from fwllm.data.objective import Objective
from fwllm.io.candidates import Candidate
from fwllm.kernels.atoms import TaskVector, atom_delta, atom_scale, block_delta, local_vertex, vertex_key
from fwllm.kernels.lmo import choose_top_k, choose_vertex, project_simplex
from fwllm.kernels.sketch import CountSketch, alignment, rescored, sketch_error
from fwllm.solvers.adaptive_step import AdaptiveStep, Trial
from fwllm.solvers.lora_terms import LoraTerms, low_rank_candidate
from fwllm.solvers.plan_atoms import atom_settings, compact, kernel_atom, kernel_atoms

LOG = logging.getLogger(__name__)


@dataclass
class FWResult:
    atoms: Dict[str, List[Atom]]
    trace: List[dict] = field(default_factory=list)
    final_objective: float = float("nan")
    selected_iteration: int = 0  # the iterate returned: lowest calibration objective seen
    bytes_read: int = 0
    seconds: float = 0.0
    initial_objective: float = float("nan")  # the full objective at the initial point
    rescored: int = 0  # candidate tensors read to re-check near-tied LMO scores


def open_loop_gamma(t: int, step_size: float) -> float:
    return min(1.0, step_size * 2.0 / (t + 2))


class FrankWolfe:
    def __init__(
        self,
        iterate,
        gradient,
        objective: Objective,
        candidates: Sequence[Candidate],
        weights: Sequence[float],
        blocks: Sequence[str],
        p: FWParams,
        base: Callable[[str], torch.Tensor],
        progress: bool = True,
        lora: Optional[LoraTerms] = None,
        *,
        sketches,
    ):
        self.iterate, self.gradient, self.objective = iterate, gradient, objective
        self.candidates, self.p, self.progress, self.lora = list(candidates), p, progress, lora
        self.weights = [float(w) for w in weights]
        self.labels = [c.label for c in self.candidates]
        self.blocks = list(blocks)
        self._base = base
        self.settings = atom_settings(p)  # what the atom kernels take of the recipe
        self.sketch = CountSketch(p.sketch_ratio, seed=p.seed)
        # the method's `fwllm.io.sketch_store.SketchStore`: on disk when the sketches exceed their RAM budget
        self.v_sketch = sketches
        self.v_norm: Dict[str, torch.Tensor] = {}
        self.exact: Dict[str, List[int]] = {}  # per block: candidates scored exactly from their LoRA factors
        self.scale = p.scaling  # the hull's lambda for new atoms (grows with `hull: adaptive`)
        self.rescored = 0
        self.sketched = False  # some score is a sketch estimate (then the adaptive step is not exact)
        self.adaptive = AdaptiveStep(self)

    # -- candidate access -------------------------------------------------------------
    def base(self, name: str) -> torch.Tensor:
        """theta_0 of one block as a fresh float32 tensor (callers may write into it)."""
        return self._base(name)

    def tau(self, name: str) -> TaskVector:
        """i -> w_i tau_i for one block; one float32 base copy is shared by the candidates' reads."""
        base = self.base(name)

        def read(i: int) -> torch.Tensor:
            t = self.candidates[i].task_vector(name, base)
            return t if self.weights[i] == 1.0 else t.mul_(self.weights[i])

        return read

    def vertex(self, name: str) -> TaskVector:
        """i -> v_i for one block: what the LMO scores."""
        tau = self.tau(name)
        return lambda i: local_vertex(self.p.step_merge, name, i, tau, self.labels, self.settings)

    def realize(self, name: str, atoms: Sequence[Atom]) -> torch.Tensor:
        """The dense block theta_0 + sum of the atoms' deltas."""
        base = self.base(name)
        return base + block_delta(kernel_atoms(atoms), name, self.tau(name), self.labels, base, self.settings)

    # -- phases ---------------------------------------------------------------------------
    def read_candidates(self) -> Dict[str, List[Atom]]:
        """One streamed pass: sketch every v_i the oracle cannot score exactly, and set the start."""
        n, p = len(self.candidates), self.p
        init = [Atom(weight=1.0, method="task_arithmetic", members=list(range(n)), mix=[1.0] * n, tag="init")]
        atoms = {
            name: [a.model_copy() for a in init] if p.init == "task_arithmetic" else []
            for name in self.blocks
        }
        # a block the iterate reads nothing for (a LoRA pool: its hooks score every candidate) is exact
        self.exact = {name: list(range(n)) for name in self.blocks}
        reading = self._reading()
        try:
            self.iterate.start(reading, atoms, self._read_block)
        finally:
            reading.close()  # ends the progress bar's line before any error is printed
        return atoms

    def _reading(self) -> Iterator[str]:
        """The blocks to read, with a progress bar (a generator: no bar unless the iterate reads)."""
        with tqdm(self.blocks, desc="fw: reading candidates", disable=not self.progress) as bar:
            yield from bar

    def _read_block(self, name: str) -> torch.Tensor:
        """Sketch the block's v_i (those not scored exactly from LoRA factors); its start, dense."""
        n, p = len(self.candidates), self.p
        low_rank = p.step_merge == "task_arithmetic"
        self.exact[name] = [
            i for i, c in enumerate(self.candidates) if low_rank and low_rank_candidate(c.adapter, name)
        ]
        rows, norms = [], []
        total = torch.zeros(self.base(name).shape)  # not a read tensor: one candidate tensor alive at a time
        tau = self.tau(name)
        for i in range(n):
            t = tau(i)
            v = local_vertex(p.step_merge, name, i, lambda _, t=t: t, self.labels, self.settings)
            rows.append(torch.zeros(0) if i in self.exact[name] else self.sketch(name, v))
            norms.append(float(v.norm()))
            if p.init == "task_arithmetic":
                total += t
            del t, v
        width = max((r.numel() for r in rows), default=0)
        # a score is an estimate where a nonzero v_i was sketched into fewer buckets than it has entries
        self.sketched |= any(0 < r.numel() < total.numel() and norm > 0 for r, norm in zip(rows, norms))
        self.v_sketch[name] = torch.stack([r if r.numel() else torch.zeros(width) for r in rows])
        self.v_norm[name] = torch.tensor(norms)
        start = self.base(name)
        if p.init == "task_arithmetic":
            start += p.scaling * total
        return start

    def _moves_nothing(self, name: str) -> bool:
        """Every candidate's v_i of this (read) block is zero: no step can change it."""
        return name in self.v_norm and not self.v_norm[name].any()

    def _exact_scores(self, name: str, g: torch.Tensor, scores: torch.Tensor) -> None:
        """<g, w_i s_i B_i A_i> = w_i s_i <B_i^T g, A_i> for the LoRA candidates of this block."""
        for i in self.exact.get(name, []):
            f = self.candidates[i].adapter.factors.get(name)
            scores[i] = (
                0.0
                if f is None
                else self.weights[i] * f.scale * float(torch.sum((f.b.float().T @ g) * f.a.float()))
            )

    def _evaluate(
        self, objective: Optional[Objective] = None, accept: Optional[Callable[[float], bool]] = None
    ) -> Tuple[float, Dict[str, torch.Tensor]]:
        """Objective value at the current iterate, and <g, v_i> per block (the gradient is
        reduced to N scores as it arrives, never kept). `objective`: a minibatch objective.
        `accept`: the gradient may skip its backward when the value fails it (the scores are
        then not used)."""
        scores: Dict[str, torch.Tensor] = {}

        def consume(name: str, g: torch.Tensor) -> None:
            g = g.detach().to("cpu", torch.float32)
            m = self.v_sketch.width(name)
            sketched = (
                alignment(self.sketch(name, g), self.v_sketch[name])
                if m
                else torch.zeros(len(self.candidates))
            )
            if self.p.rescore > 0 and 0 < m < g.numel():
                sigma = sketch_error(float(g.norm()), self.v_norm[name], m)
                vertex = self.vertex(name)
                exact = lambda i: float(torch.sum(g * vertex(i)))  # noqa: E731
                sketched, checked = rescored(sketched, sigma, self.p.rescore, exact)
                self.rescored += len(checked)
            self._exact_scores(name, g, sketched)
            scores[name] = (
                sketched if name not in scores else scores[name] + sketched
            )  # micro-batch groups add up

        value = (
            self.gradient(consume, objective) if accept is None else self.gradient(consume, objective, accept)
        )
        if self.lora is not None:
            for name, s in self.lora.scores.items():
                scores[name] = s.clone()
        for name in self.blocks:  # a block no gradient reached (e.g. unused by the loss) scores zero
            scores.setdefault(name, torch.zeros(len(self.candidates)))
        return value, scores

    def _model_scores(self, scores: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([scores[n] for n in self.blocks]).sum(0)

    def _choose(self, scores: Dict[str, torch.Tensor]) -> Dict[str, List[int]]:
        k = self.p.top_k if self.p.variant == "soft" else 1

        def pick(s: torch.Tensor) -> List[int]:
            return choose_top_k(s, k) if k > 1 else [i for i in [choose_vertex(s)] if i >= 0]

        if self.p.granularity == "model":  # one vertex for the whole model
            members = pick(self._model_scores(scores))
            return {name: list(members) for name in self.blocks}
        return {name: pick(scores[name]) for name in self.blocks}

    def _mix(
        self,
        chosen: Dict[str, List[int]],
        scores: Dict[str, torch.Tensor],
        objective: Optional[Objective] = None,
    ) -> Dict[str, List[float]]:
        """Mixing weights of the chosen vertices: proportional to their alignment with -g, then
        (soft) projected-gradient steps on the calibration loss. At model granularity the
        alignments and the steps are summed over blocks: one mix for the whole model."""
        model_level = self.p.granularity == "model"

        def alignments(s: Dict[str, torch.Tensor], name: str, members: List[int]) -> torch.Tensor:
            return (self._model_scores(s) if model_level else s[name])[members]

        mix = {}
        for name, members in chosen.items():
            if members:
                a = -alignments(scores, name, members)  # every chosen vertex has a > 0
                mix[name] = (a / a.sum()).tolist()
        if self.p.variant != "soft" or self.p.soft_steps <= 0:
            return mix
        for _ in range(self.p.soft_steps):
            points = {
                name: [Atom(weight=1.0, method=self.p.step_merge, members=members, mix=mix[name], tag="mix")]
                for name, members in chosen.items()
                if members
            }
            with self.iterate.at(points, self.realize):
                _, at_s = self._evaluate(objective)
            for name, members in chosen.items():
                if len(members) > 1:
                    # d loss / d mix_j = lambda <g, v_j>: exact for a linear combine, a first-order
                    # guide for TIES' elect-and-merge
                    grad = alignments(at_s, name, members) * self.p.scaling
                    step = grad / (grad.abs().max() + 1e-12) / len(members)
                    mix[name] = project_simplex(torch.tensor(mix[name]) - step).tolist()
        return mix

    def _materialise(self, atoms: Dict[str, List[Atom]]) -> None:
        """Put the selected iterate in place, streaming one tensor at a time."""
        for name in tqdm(self.blocks, desc="fw: restoring best iterate", disable=not self.progress):
            self.iterate.set(name, atoms[name], self.realize)

    # -- steps ---------------------------------------------------------------------------
    def _vertex_value(self, name: str, atom: Optional[Atom]) -> torch.Tensor:
        """A vertex as a dense block: theta_0, or theta_0 + the atom's delta."""
        value = self.base(name)
        if atom is not None:
            value += atom_delta(kernel_atom(atom), name, self.tau(name), self.labels, self.settings)
        return value

    def _moves(
        self,
        t: int,
        chosen: Dict[str, List[int]],
        mix: Dict[str, List[float]],
        scores: Dict[str, torch.Tensor],
        atoms: Dict[str, List[Atom]],
    ) -> Dict[str, Tuple[Optional[Atom], Optional[Atom], float]]:
        """Per block: (toward, away, most gamma). A plain FW step moves toward the FW vertex
        (away = None: the iterate itself, gamma <= 1); a pairwise step moves mass from the
        worst active vertex to the FW vertex (gamma <= that vertex's weight)."""
        moves = {}
        for name in self.blocks:
            toward = (
                Atom(
                    weight=0.0,
                    method=self.p.step_merge,
                    members=chosen[name],
                    mix=mix[name],
                    tag=f"t{t}",
                    scale=self.scale,
                )
                if chosen[name]
                else None
            )
            if not self.p.pairwise:
                moves[name] = (toward, None, 1.0)
                continue
            away, most, worst = (
                None,
                1.0 - sum(a.weight for a in atoms[name]),
                0.0,
            )  # the base vertex scores 0
            if most <= 1e-12:
                most = 0.0
            for a in atoms[name]:
                score = atom_scale(kernel_atom(a), self.settings) * float(
                    sum(m * scores[name][i] for i, m in zip(a.members, a.mix))
                )
                if a.weight > 1e-12 and (score > worst or most == 0.0):
                    away, most, worst = a, a.weight, score
            best = (
                0.0
                if toward is None
                else self.scale * float(sum(m * scores[name][i] for i, m in zip(toward.members, toward.mix)))
            )
            same = (away is None and toward is None) or (
                away is not None
                and toward is not None
                and vertex_key(kernel_atom(away), self.settings)
                == vertex_key(kernel_atom(toward), self.settings)
            )
            moves[name] = (toward, away, 0.0 if same or best >= worst else most)
        return moves

    def _point(self, gamma: float, moves, atoms: Dict[str, List[Atom]], relative: bool = False):
        """The iterate after a step of `gamma` (clipped at each block's most; `relative`: that
        share of each block's most): atoms per block, and a dense realisation of them from the
        current block and the two vertices (no candidate is read but those)."""
        points, deltas = {}, {}
        for name, (toward, away, most) in moves.items():
            g = gamma * most if relative else min(gamma, most)
            if g <= 0.0:
                continue
            if away is None and not self.p.pairwise:
                new = [a.model_copy(update={"weight": a.weight * (1.0 - g)}) for a in atoms[name]]
            else:
                new = [a.model_copy() for a in atoms[name]]
                if away is not None:
                    new.append(away.model_copy(update={"weight": -g}))
            if toward is not None:
                new.append(toward.model_copy(update={"weight": g}))
            points[name], deltas[name] = compact(new, self.settings), (g, toward, away)

        def realize(name: str, _atoms) -> torch.Tensor:
            g, toward, away = deltas[name]
            current = self.iterate.read(name)
            if not self.p.pairwise:
                return (1.0 - g) * current + g * self._vertex_value(name, toward)
            return current + g * (self._vertex_value(name, toward) - self._vertex_value(name, away))

        return points, realize

    def _line_search(
        self, moves, atoms, value: float, objective: Optional[Objective]
    ) -> Tuple[float, List[float]]:
        """The share of the longest step (each block's most) minimising the parabola through the
        objective at 0, 1/2 and 1 of it (exact for a quadratic objective); two forward evaluations."""
        seen = []
        for g in (0.5, 1.0):
            points, realize = self._point(g, moves, atoms, relative=True)
            with self.iterate.at(points, realize):
                seen.append(self.gradient.value(objective))
        f0, (f1, f2) = value, seen
        a = 2.0 * (f2 - 2.0 * f1 + f0)  # f(g) = f0 + b g + a g^2 through (0, f0), (1/2, f1), (1, f2)
        b = 4.0 * f1 - 3.0 * f0 - f2
        if a > 0:
            return min(1.0, max(0.0, -b / (2.0 * a))), seen
        return (1.0 if f2 < f1 else 0.5) if min(f1, f2) < f0 else 0.0, seen

    def _apply(self, moves, atoms: Dict[str, List[Atom]], gamma: float, relative: bool = False) -> None:
        points, realize = self._point(gamma, moves, atoms, relative)
        for name in self.blocks:
            if name not in points:
                continue
            self.iterate.set(name, points[name], realize)
            atoms[name] = points[name]

    def merged_state(self, factors: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
        """The merged blocks (after `run`: the selected iterate), one at a time; with `factors` (a LoRA
        pool's implicit iterate), each block's low-rank delta, and none for a block left at the base."""
        return self.iterate.merged(self.blocks, factors=True) if factors else self.iterate.merged(self.blocks)

    def run(self) -> FWResult:
        start, p = time.time(), self.p
        atoms = self.read_candidates()
        trace = []
        k = p.batches_per_iteration
        stochastic = self.objective.is_sampled_by(k)
        # Open-loop FW steps are not monotone; keep the best iterate (the start included).
        # Stochastic iterations only see minibatch estimates, which do not compare across
        # iterations: there the choice is between the start and the last iterate, on the
        # full objective.
        initial = self.gradient.value() if stochastic else float("nan")
        best = (initial, 0, copy.deepcopy(atoms)) if stochastic else (float("inf"), 0, None)
        adaptive = p.step == "adaptive" and self.adaptive.exact(stochastic)
        trial: Optional[Trial] = None  # the adaptive step awaiting the check of the next evaluation
        bar = tqdm(range(p.iterations), desc="fw: iterations", disable=not self.progress)
        for t in bar:
            began = time.time()
            checked = self.rescored
            objective = self.objective.sample(t, k, p.seed) if stochastic else None
            value, scores = self._evaluate(objective, trial.keeps if trial is not None else None)
            if trial is not None:
                settling = time.time()
                again = self.adaptive.settle(
                    trial, value, atoms, lambda ok: self._evaluate(objective, ok), scores
                )
                value, scores = (value, scores) if again is None else again
                # a step's retries are its own seconds (as after the last iteration), not this one's
                spent = time.time() - settling
                trial.entry["seconds"] = round(trial.entry["seconds"] + spent, 3)
                began += spent
                trial = None
            if not stochastic:
                initial = value if t == 0 else initial
                if value < best[0]:
                    best = (value, t, copy.deepcopy(atoms))
            chosen = self._choose(scores)
            mix = self._mix(chosen, scores, objective)
            moves = self._moves(t, chosen, mix, scores, atoms)
            searched, hull, step = None, self.scale, {}
            if adaptive:
                gamma, trial = self.adaptive.trial(moves, atoms, scores, value, step)
            elif p.step in ("line_search", "adaptive"):  # adaptive without an exact slope: search
                gamma, searched = self._line_search(moves, atoms, value, objective)
            else:
                gamma = open_loop_gamma(t, p.step_size)
            self._apply(moves, atoms, gamma, relative=searched is not None or adaptive)
            if p.hull == "adaptive" and searched is not None and gamma >= 1.0 and not p.pairwise:
                self.scale *= 2.0  # the best step reached the hull's boundary: let the hull grow
            step.update(
                {
                    "iteration": t,
                    "objective": value,
                    "gamma": gamma,
                    "rescored": self.rescored - checked,
                    "chosen": {n: chosen[n] for n in self.blocks},
                    "mix": {n: mix[n] for n in self.blocks if n in mix},
                    "scaling": hull,
                }
            )
            if searched is not None:
                step["line_search"] = searched  # the objective at 1/2 and 1 of the step
            if p.pairwise:
                step["away"] = {
                    n: (m[1].members if m[1] is not None else []) for n, m in moves.items() if m[2] > 0
                }
            if stochastic:
                step["minibatch"] = True  # `objective` is this iteration's minibatch estimate
            step["seconds"] = round(time.time() - began, 3)
            trace.append(step)
            bar.set_postfix(objective=f"{value:.4f}")
            LOG.info("fw iteration %d: objective %.5f, gamma %.4f", t, value, gamma)
        final = self.gradient.value()
        if trial is not None:
            checked = time.time()
            again = self.adaptive.settle(trial, final, atoms, lambda ok: self.gradient.value())
            final = final if again is None else again
            trace[-1]["seconds"] = round(trace[-1]["seconds"] + time.time() - checked, 3)  # its retries
        selected = p.iterations
        if best[0] < final:
            final, selected, atoms = best
            self._materialise(atoms)
        for name in self.blocks:
            # never left the base, or no candidate changes it: hold the base exactly
            if not atoms[name] or self._moves_nothing(name):
                self.iterate.hold_base(name, self.base)
        read = sum(c.bytes_read for c in self.candidates)
        return FWResult(atoms, trace, final, selected, read, time.time() - start, initial, self.rescored)
