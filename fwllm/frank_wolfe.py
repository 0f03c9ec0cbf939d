"""The Frank-Wolfe loop over the convex hull of {theta_0} U {theta_0 + lambda * tau_i}.

theta_{t+1} = (1 - gamma_t) theta_t + gamma_t s_t,   gamma_t = step_size * 2 / (t + 2)

s_t is chosen per block (one weight tensor, `granularity: layer`) or for the whole model
(`granularity: model`) by the oracle in `fwllm.oracle`. The iterate is kept in the model
being differentiated and, in parallel, as a list of *atoms* (weight beta, local merge,
members, mix) with theta_T = theta_0 + sum_a beta_a * lambda * combine(members, mix):
the atoms are the plan mergekit executes, one tensor at a time.

Memory: the model (theta_t), theta_0 (in bfloat16 where that is exact, as it is for bf16
checkpoints), the candidates' sketches, and the gradient: all of it with `FullGradient`,
one layer's with `LayerwiseGradient`. Exact task vectors are streamed one tensor at a time
(`Candidate.task_vector`).
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from fwllm.gradients import FullGradient
from fwllm.local_merges import combine
from fwllm.model_io import Candidate
from fwllm.objectives import Objective
from fwllm.oracle import CountSketch, alignment, choose_top_k, choose_vertex, project_simplex, rescored, sketch_error

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class FWSettings:
    iterations: int = 10
    step_size: float = 0.1
    granularity: str = "layer"  # layer | model
    variant: str = "hard"  # hard | soft
    top_k: int = 2  # soft: vertices mixed per step
    soft_steps: int = 2  # soft: projected-gradient steps on the mix per iteration
    local_merge: str = "task_arithmetic"
    scaling: float = 0.3  # lambda
    density: float = 0.2  # ties: fraction kept by trim
    drop_rate: float = 0.5  # dare: drop probability
    init: str = "task_arithmetic"  # task_arithmetic | base
    sketch_ratio: float = 32.0
    rescore: float = 0.0  # z: re-check contenders within z sketch errors exactly (0 = sketch only)
    batches_per_iteration: int = 0  # stochastic FW: micro-batches per task and iteration (0 = all)
    seed: int = 0


@dataclass
class Atom:
    weight: float
    method: str
    members: List[int]
    mix: List[float]
    tag: str  # names the step that made it; seeds DARE masks reproducibly

    def delta(self, name: str, tau: Callable[[int], torch.Tensor], s: FWSettings) -> torch.Tensor:
        gen = None
        if self.method.startswith("dare"):
            gen = torch.Generator().manual_seed(zlib.crc32(f"{s.seed}/{name}/{self.tag}".encode()))
        taus = (tau(i) for i in self.members)  # lazily: task arithmetic never holds more than one
        return s.scaling * combine(self.method, taus, self.mix, s.density, s.drop_rate, gen)


@dataclass
class FWResult:
    atoms: Dict[str, List[Atom]]
    trace: List[dict] = field(default_factory=list)
    final_objective: float = float("nan")
    selected_iteration: int = 0  # the iterate returned: lowest calibration objective seen
    bytes_read: int = 0
    seconds: float = 0.0
    initial_objective: float = float("nan")  # the full objective at the initial point


def block_delta(atoms: Sequence[Atom], name: str, tau: Callable[[int], torch.Tensor], s: FWSettings, like: torch.Tensor) -> torch.Tensor:
    """sum_a beta_a * atom_a's delta for one tensor (what the executor adds to the base)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for atom in atoms:
        if atom.weight != 0.0:
            out += atom.weight * atom.delta(name, tau, s)
    return out


def ta_coefficients(atoms: Sequence[Atom], n: int, scaling: float) -> Optional[List[float]]:
    """Per-candidate weights when every atom is plain task arithmetic (else None)."""
    if any(a.method != "task_arithmetic" for a in atoms):
        return None
    coef = [0.0] * n
    for atom in atoms:
        for i, w in zip(atom.members, atom.mix):
            coef[i] += atom.weight * scaling * w
    return coef


def compact_copy(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of x, in bfloat16 when that round-trips exactly (a bf16 checkpoint's base)."""
    x = x.detach().to("cpu", torch.float32)
    small = x.to(torch.bfloat16)
    return small if torch.equal(small.float(), x) else x.clone()


class FrankWolfe:
    def __init__(self, model: torch.nn.Module, objective: Objective, candidates: Sequence[Candidate],
                 blocks: Sequence[str], settings: FWSettings, progress: bool = True, gradient=None):
        self.model, self.objective, self.candidates, self.s = model, objective, list(candidates), settings
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in blocks}
        self.blocks = list(blocks)
        self.gradient = gradient if gradient is not None else FullGradient(model, objective, blocks)
        self._base = {n: compact_copy(p) for n, p in self.params.items()}
        self.sketch = CountSketch(settings.sketch_ratio, seed=settings.seed)
        self.progress = progress
        self.tau_sketch: Dict[str, torch.Tensor] = {}
        self.tau_norm: Dict[str, torch.Tensor] = {}
        self.rescored = 0  # candidate tensors read to re-check near-tied LMO scores

    # -- candidate access -------------------------------------------------------------
    def base(self, name: str) -> torch.Tensor:
        """theta_0 of one block as a fresh float32 tensor (callers may write into it)."""
        return self._base[name].to(torch.float32, copy=True)

    def tau(self, name: str) -> Callable[[int], torch.Tensor]:
        base = self.base(name)  # one float32 copy per block, shared by the candidates' reads
        return lambda i: self.candidates[i].task_vector(name, base)

    def _set_block(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        p.data.copy_(value.to(p.device, p.dtype))

    # -- phases ---------------------------------------------------------------------------
    def read_candidates(self) -> Dict[str, List[Atom]]:
        """One streamed pass: sketch every tau_i, and build the initial point."""
        n = len(self.candidates)
        atoms: Dict[str, List[Atom]] = {}
        init_atom = Atom(1.0, "task_arithmetic", list(range(n)), [1.0] * n, "init")
        for name in tqdm(self.blocks, desc="fw: reading candidates", disable=not self.progress):
            rows, total = [], torch.zeros(self._base[name].shape)
            norms, tau = [], self.tau(name)
            for i in range(n):
                t = tau(i)
                rows.append(self.sketch(name, t))
                norms.append(float(t.float().norm()))
                if self.s.init == "task_arithmetic":
                    total += t
                del t
            self.tau_sketch[name] = torch.stack(rows)
            self.tau_norm[name] = torch.tensor(norms)
            if self.s.init == "task_arithmetic":
                self._set_block(name, self.base(name) + self.s.scaling * total)
                atoms[name] = [Atom(**asdict(init_atom))]
            else:
                atoms[name] = []
        return atoms

    def _evaluate(self, objective: Optional[Objective] = None) -> Tuple[float, Dict[str, torch.Tensor]]:
        """Objective value at the current iterate, and <g, tau_i> per block (the gradient is
        reduced to N scores as it arrives, never kept). `objective`: a minibatch objective
        instead of the full one."""
        scores: Dict[str, torch.Tensor] = {}

        def consume(name: str, g: torch.Tensor) -> None:
            g = g.detach().to("cpu", torch.float32)
            sketched = alignment(self.sketch(name, g), self.tau_sketch[name])
            m = self.tau_sketch[name].shape[1]
            if self.s.rescore > 0 and m < g.numel():
                sigma = sketch_error(float(g.norm()), self.tau_norm[name], m)
                tau = self.tau(name)
                exact = lambda i: float(torch.sum(g * tau(i)))  # noqa: E731
                sketched, checked = rescored(sketched, sigma, self.s.rescore, exact)
                self.rescored += len(checked)
            scores[name] = sketched

        value = self.gradient(consume, objective)
        return value, scores

    def _mix(self, chosen: Dict[str, List[int]], scores: Dict[str, torch.Tensor],
             objective: Optional[Objective] = None) -> Dict[str, List[float]]:
        """Soft variant: mixing weights of the chosen vertices, solved on the calibration loss."""
        mix = {}
        for name, members in chosen.items():
            if members:
                s = -scores[name][members]
                mix[name] = (s / s.sum()).tolist()
        if self.s.variant != "soft" or self.s.soft_steps <= 0:
            return mix
        current = {n: p.detach().clone() for n, p in self.params.items()}
        for _ in range(self.s.soft_steps):
            for name, members in chosen.items():
                if members:
                    atom = Atom(1.0, self.s.local_merge, members, mix[name], "mix")
                    self._set_block(name, self.base(name) + atom.delta(name, self.tau(name), self.s))
            _, at_s = self._evaluate(objective)
            for name, members in chosen.items():
                if len(members) > 1:
                    grad = at_s[name][members] * self.s.scaling
                    step = grad / (grad.abs().max() + 1e-12) / len(members)
                    mix[name] = project_simplex(torch.tensor(mix[name]) - step).tolist()
        for name, value in current.items():
            self._set_block(name, value)
        return mix

    def _choose(self, scores: Dict[str, torch.Tensor]) -> Dict[str, List[int]]:
        k = self.s.top_k if self.s.variant == "soft" else 1
        if self.s.granularity == "model":
            total = torch.stack(list(scores.values())).sum(0)
            pick = choose_top_k(total, k) if k > 1 else [i for i in [choose_vertex(total)] if i >= 0]
            return {name: list(pick) for name in scores}
        if k > 1:
            return {name: choose_top_k(s, k) for name, s in scores.items()}
        return {name: [i for i in [choose_vertex(s)] if i >= 0] for name, s in scores.items()}

    def _materialise(self, atoms: Dict[str, List[Atom]]) -> None:
        """Put the selected iterate into the model, streaming one tensor at a time."""
        for name in tqdm(self.blocks, desc="fw: restoring best iterate", disable=not self.progress):
            base = self.base(name)
            self._set_block(name, base + block_delta(atoms[name], name, self.tau(name), self.s, base))

    def merged_state(self) -> Dict[str, torch.Tensor]:
        """The merged blocks as they stand in the model (after `run`: the selected iterate)."""
        return {n: p.detach().to("cpu", torch.float32) for n, p in self.params.items()}

    def run(self) -> FWResult:
        start = time.time()
        atoms = self.read_candidates()
        trace = []
        k = self.s.batches_per_iteration
        stochastic = self.objective.is_sampled_by(k)
        # Open-loop FW steps are not monotone; keep the best iterate (the start included).
        # Stochastic iterations only see minibatch estimates, which do not compare across
        # iterations: there the choice is between the start and the last iterate, on the
        # full objective.
        initial = self.gradient.value() if stochastic else float("nan")
        best = (initial, 0, copy.deepcopy(atoms)) if stochastic else (float("inf"), 0, None)
        bar = tqdm(range(self.s.iterations), desc="fw: iterations", disable=not self.progress)
        for t in bar:
            checked = self.rescored
            objective = self.objective.sample(t, k, self.s.seed) if stochastic else None
            value, scores = self._evaluate(objective)
            if not stochastic:
                initial = value if t == 0 else initial
                if value < best[0]:
                    best = (value, t, copy.deepcopy(atoms))
            gamma = min(1.0, self.s.step_size * 2.0 / (t + 2))
            chosen = self._choose(scores)
            mix = self._mix(chosen, scores, objective)
            for name in self.blocks:
                for a in atoms[name]:
                    a.weight *= 1.0 - gamma
                vertex = self.base(name)
                if chosen[name]:
                    atom = Atom(gamma, self.s.local_merge, chosen[name], mix[name], f"t{t}")
                    vertex += atom.delta(name, self.tau(name), self.s)
                    atoms[name].append(atom)
                p = self.params[name]
                self._set_block(name, (1.0 - gamma) * p.detach().float().cpu() + gamma * vertex)
            step = {"iteration": t, "objective": value, "gamma": gamma, "rescored": self.rescored - checked,
                    "chosen": {n: chosen[n] for n in self.blocks},
                    "mix": {n: mix[n] for n in self.blocks if n in mix}}
            if stochastic:
                step["minibatch"] = True  # `objective` is this iteration's minibatch estimate
            trace.append(step)
            bar.set_postfix(objective=f"{value:.4f}")
            LOG.info("fw iteration %d: objective %.5f, gamma %.4f", t, value, gamma)
        final = self.gradient.value()
        selected = self.s.iterations
        if best[0] < final:
            final, selected, atoms = best
            self._materialise(atoms)
        for name in self.blocks:
            # never left the base, or no candidate changes it: write the base exactly,
            # not the rounded (1 - gamma) x + gamma x of the loop
            if not atoms[name] or not self.tau_sketch[name].any():
                self._set_block(name, self.base(name))
        read = sum(c.bytes_read for c in self.candidates)
        return FWResult(atoms, trace, final, selected, read, time.time() - start, initial_objective=initial)
