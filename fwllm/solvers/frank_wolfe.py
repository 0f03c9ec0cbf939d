"""The Frank-Wolfe loop over the convex hull of {theta_0} U {theta_0 + lambda * v_i}.

theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t,   gamma_t = step_size * 2 / (t + 2)

v_i = localize(w_i tau_i) (`fwllm.kernels.atoms`). s_t is chosen per block (one weight
tensor, `granularity: layer`) or for the whole model (`granularity: model`) by the LMO in
`fwllm.kernels.lmo`, on the sketched scores <g, v_i> of `fwllm.kernels.sketch`. The iterate
is kept in the model being differentiated and, in parallel, as a list of atoms per block:
the plan mergekit executes.

Memory: the model (theta_t), theta_0 (in bfloat16 where that is exact, as it is for bf16
checkpoints), the candidates' sketches, and the gradient: all of it with `FullGradient`,
one layer's with `LayerwiseGradient`. Task vectors are streamed one tensor at a time.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from fwllm.core.params import FWParams
from fwllm.core.plan import Atom
from fwllm.data.objective import Objective
from fwllm.io.candidates import Candidate
from fwllm.kernels.atoms import TaskVector, atom_delta, block_delta, local_vertex
from fwllm.kernels.lmo import choose_top_k, choose_vertex, project_simplex
from fwllm.kernels.sketch import CountSketch, alignment, rescored, sketch_error
from fwllm.solvers.gradients import FullGradient

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


def compact_copy(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of x, in bfloat16 when that round-trips exactly (a bf16 checkpoint's base)."""
    x = x.detach().to("cpu", torch.float32)
    small = x.to(torch.bfloat16)
    return small if torch.equal(small.float(), x) else x.clone()


class FrankWolfe:
    def __init__(self, model: torch.nn.Module, objective: Objective, candidates: Sequence[Candidate],
                 weights: Sequence[float], blocks: Sequence[str], p: FWParams, progress: bool = True, gradient=None):
        self.model, self.objective, self.candidates, self.p = model, objective, list(candidates), p
        self.weights = [float(w) for w in weights]
        self.labels = [c.label for c in self.candidates]
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in blocks}
        self.blocks = list(blocks)
        self.gradient = gradient if gradient is not None else FullGradient(model, objective, blocks)
        self._base = {n: compact_copy(prm) for n, prm in self.params.items()}
        self.sketch = CountSketch(p.sketch_ratio, seed=p.seed)
        self.progress = progress
        self.v_sketch: Dict[str, torch.Tensor] = {}
        self.v_norm: Dict[str, torch.Tensor] = {}
        self.rescored = 0

    # -- candidate access -------------------------------------------------------------
    def base(self, name: str) -> torch.Tensor:
        """theta_0 of one block as a fresh float32 tensor (callers may write into it)."""
        return self._base[name].to(torch.float32, copy=True)

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
        return lambda i: local_vertex(self.p.local_merge, name, i, tau, self.labels, self.p)

    def _set_block(self, name: str, value: torch.Tensor) -> None:
        prm = self.params[name]
        prm.data.copy_(value.to(prm.device, prm.dtype))

    # -- phases ---------------------------------------------------------------------------
    def read_candidates(self) -> Dict[str, List[Atom]]:
        """One streamed pass: sketch every v_i, and build the initial point."""
        n, p = len(self.candidates), self.p
        atoms: Dict[str, List[Atom]] = {}
        for name in tqdm(self.blocks, desc="fw: reading candidates", disable=not self.progress):
            rows, norms = [], []
            total = torch.zeros(self._base[name].shape)  # not a read tensor: one candidate tensor alive at a time
            tau = self.tau(name)
            for i in range(n):
                t = tau(i)
                v = local_vertex(p.local_merge, name, i, lambda _, t=t: t, self.labels, p)
                rows.append(self.sketch(name, v))
                norms.append(float(v.norm()))
                if p.init == "task_arithmetic":
                    total += t
                del t, v
            self.v_sketch[name] = torch.stack(rows)
            self.v_norm[name] = torch.tensor(norms)
            if p.init == "task_arithmetic":
                self._set_block(name, self.base(name) + p.scaling * total)
                atoms[name] = [Atom(weight=1.0, method="task_arithmetic", members=list(range(n)), mix=[1.0] * n,
                                    tag="init")]
            else:
                atoms[name] = []
        return atoms

    def _evaluate(self, objective: Optional[Objective] = None) -> Tuple[float, Dict[str, torch.Tensor]]:
        """Objective value at the current iterate, and <g, v_i> per block (the gradient is
        reduced to N scores as it arrives, never kept). `objective`: a minibatch objective."""
        scores: Dict[str, torch.Tensor] = {}

        def consume(name: str, g: torch.Tensor) -> None:
            g = g.detach().to("cpu", torch.float32)
            sketched = alignment(self.sketch(name, g), self.v_sketch[name])
            m = self.v_sketch[name].shape[1]
            if self.p.rescore > 0 and m < g.numel():
                sigma = sketch_error(float(g.norm()), self.v_norm[name], m)
                vertex = self.vertex(name)
                exact = lambda i: float(torch.sum(g * vertex(i)))  # noqa: E731
                sketched, checked = rescored(sketched, sigma, self.p.rescore, exact)
                self.rescored += len(checked)
            scores[name] = sketched

        value = self.gradient(consume, objective)
        return value, scores

    def _model_scores(self, scores: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(scores.values())).sum(0)

    def _choose(self, scores: Dict[str, torch.Tensor]) -> Dict[str, List[int]]:
        k = self.p.top_k if self.p.variant == "soft" else 1

        def pick(s: torch.Tensor) -> List[int]:
            return choose_top_k(s, k) if k > 1 else [i for i in [choose_vertex(s)] if i >= 0]

        if self.p.granularity == "model":  # one vertex for the whole model
            members = pick(self._model_scores(scores))
            return {name: list(members) for name in scores}
        return {name: pick(s) for name, s in scores.items()}

    def _mix(self, chosen: Dict[str, List[int]], scores: Dict[str, torch.Tensor],
             objective: Optional[Objective] = None) -> Dict[str, List[float]]:
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
        current = {n: prm.detach().clone() for n, prm in self.params.items()}
        for _ in range(self.p.soft_steps):
            for name, members in chosen.items():
                if members:
                    atom = Atom(weight=1.0, method=self.p.local_merge, members=members, mix=mix[name], tag="mix")
                    self._set_block(name, self.base(name) + atom_delta(atom, name, self.tau(name), self.labels, self.p))
            _, at_s = self._evaluate(objective)
            for name, members in chosen.items():
                if len(members) > 1:
                    # d loss / d mix_j = lambda <g, v_j>: exact for a linear combine, a first-order
                    # guide for TIES' elect-and-merge
                    grad = alignments(at_s, name, members) * self.p.scaling
                    step = grad / (grad.abs().max() + 1e-12) / len(members)
                    mix[name] = project_simplex(torch.tensor(mix[name]) - step).tolist()
        for name, value in current.items():
            self._set_block(name, value)
        return mix

    def _materialise(self, atoms: Dict[str, List[Atom]]) -> None:
        """Put the selected iterate into the model, streaming one tensor at a time."""
        for name in tqdm(self.blocks, desc="fw: restoring best iterate", disable=not self.progress):
            base = self.base(name)
            self._set_block(name, base + block_delta(atoms[name], name, self.tau(name), self.labels, base, self.p))

    def merged_state(self) -> Dict[str, torch.Tensor]:
        """The merged blocks as they stand in the model (after `run`: the selected iterate)."""
        return {n: prm.detach().to("cpu", torch.float32) for n, prm in self.params.items()}

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
        bar = tqdm(range(p.iterations), desc="fw: iterations", disable=not self.progress)
        for t in bar:
            checked = self.rescored
            objective = self.objective.sample(t, k, p.seed) if stochastic else None
            value, scores = self._evaluate(objective)
            if not stochastic:
                initial = value if t == 0 else initial
                if value < best[0]:
                    best = (value, t, copy.deepcopy(atoms))
            gamma = open_loop_gamma(t, p.step_size)
            chosen = self._choose(scores)
            mix = self._mix(chosen, scores, objective)
            for name in self.blocks:
                for a in atoms[name]:
                    a.weight *= 1.0 - gamma
                vertex = self.base(name)
                if chosen[name]:
                    atom = Atom(weight=gamma, method=p.local_merge, members=chosen[name], mix=mix[name], tag=f"t{t}")
                    vertex += atom_delta(atom, name, self.tau(name), self.labels, p)
                    atoms[name].append(atom)
                prm = self.params[name]
                self._set_block(name, (1.0 - gamma) * prm.detach().float().cpu() + gamma * vertex)
            step = {"iteration": t, "objective": value, "gamma": gamma, "rescored": self.rescored - checked,
                    "chosen": {n: chosen[n] for n in self.blocks},
                    "mix": {n: mix[n] for n in self.blocks if n in mix}}
            if stochastic:
                step["minibatch"] = True  # `objective` is this iteration's minibatch estimate
            trace.append(step)
            bar.set_postfix(objective=f"{value:.4f}")
            LOG.info("fw iteration %d: objective %.5f, gamma %.4f", t, value, gamma)
        final = self.gradient.value()
        selected = p.iterations
        if best[0] < final:
            final, selected, atoms = best
            self._materialise(atoms)
        for name in self.blocks:
            # never left the base, or no candidate changes it: write the base exactly,
            # not the rounded (1 - gamma) x + gamma x of the loop
            if not atoms[name] or not self.v_norm[name].any():
                self._set_block(name, self.base(name))
        read = sum(c.bytes_read for c in self.candidates)
        return FWResult(atoms, trace, final, selected, read, time.time() - start, initial, self.rescored)
