"""FW's `step: adaptive` (`fwllm.kernels.step_rule` has its rule): each step is the minimiser of a
parabola whose curvature the previous moves taught, and it is checked by the value the next
iteration's gradient brings, so a step kept costs no evaluation. This module measures a move
(its slope <g, d> from the LMO's scores, its length in the metric of the weights) and settles a
step once its value is known: kept, or taken again shorter (each retry one forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fwllm.core.plan import Atom
from fwllm.kernels.atoms import atom_scale
from fwllm.kernels.low_rank import LowRank, inner_products
from fwllm.kernels.step_rule import (
    along_hessian,
    checkable,
    fitted_a,
    keeps,
    learned_curvature,
    predicted_gamma,
    retry_gamma,
    secant_a,
    secant_hessian,
)
from fwllm.solvers.plan_atoms import kernel_atom

RETRIES = 3  # a step is taken again at most this often (each time shorter)


@dataclass
class Trial:
    """A step taken on trust, checked by the value and the slope the next evaluation brings."""

    f0: float  # the objective where the step started
    slope: float  # <g, d>: the objective's derivative along the whole move, at its start
    length_sq: float  # |d|^2 = sum d_i d_j <v_i, v_j>
    gamma: float  # the share of the move taken
    moves: dict
    directions: Dict[str, torch.Tensor]  # per block, d in coefficients on the v_i
    before: Dict[str, List[Atom]]  # the blocks' atoms where the step started
    entry: dict  # its iteration's trace entry
    scores: Dict[str, torch.Tensor]  # the scores where the step started (a step undone returns to them)
    # every block's d, when all moved blocks share it (`granularity: model`): the move is then one
    # direction in the N coefficients, and `metric` = sum over those blocks of <v_i, v_j>
    shared: Optional[torch.Tensor] = None
    metric: Optional[torch.Tensor] = None

    def keeps(self, value: float) -> bool:
        """The check a value alone can make (the gradient may skip its backward when it fails)."""
        return keeps(self.f0, self.slope, self.gamma, value)

    def end_slope(self, scores: Dict[str, torch.Tensor]) -> float:
        """<g, d> where the step ended, from the scores of the gradient there."""
        return sum(float(d @ scores[name].double()) for name, d in self.directions.items())


class AdaptiveStep:
    """The adaptive step of one `FrankWolfe` solve (which it reads: candidates, scores' exactness,
    the iterate; and moves: the iterate on a retry, the hull's lambda)."""

    def __init__(self, fw):
        self.fw = fw
        self.curvature: Optional[float] = None  # carried from move to move
        # where every move shares one direction in the N coefficients: the objective's curvature there,
        # N x N, learned from each step's change of scores (a BFGS update, `secant_hessian`)
        self.hessian: Optional[torch.Tensor] = None
        self._grams: Dict[str, torch.Tensor] = {}  # per block: <v_i, v_j>, the metric of the moves

    def exact(self, stochastic: bool) -> bool:
        """The slope is exact: task-arithmetic steps, exact scores, one objective for every step."""
        return not stochastic and not self.fw.sketched and self.fw.p.step_merge == "task_arithmetic"

    def _unit(self, atom: Optional[Atom]) -> torch.Tensor:
        """A vertex's coefficients on the v_i (its scale times its mix; the base vertex: none)."""
        c = torch.zeros(len(self.fw.candidates), dtype=torch.float64)
        if atom is not None:
            scale = atom_scale(kernel_atom(atom), self.fw.settings)
            c[atom.members] += scale * torch.tensor(atom.mix, dtype=c.dtype)
        return c

    def _gram(self, name: str) -> torch.Tensor:
        """<v_i, v_j> of one block, from the LoRA factors and the exact (m = numel) sketch rows."""
        if name not in self._grams:
            fw, rows, terms = self.fw, None, []
            exact = set(fw.exact.get(name, []))
            for i, c in enumerate(fw.candidates):
                if i in exact:
                    f = c.adapter.factors.get(name)
                    terms.append(None if f is None else LowRank(f.a, f.b, f.scale * fw.weights[i]))
                elif float(fw.v_norm[name][i]) == 0.0:
                    # leaves the block at zero: its sketch row may have fewer buckets than entries
                    # (a zero v_i does not make the scores estimates), and it adds nothing to <v_i, v_j>
                    terms.append(None)
                else:
                    rows = fw.v_sketch[name] if rows is None else rows
                    terms.append(rows[i])
            self._grams[name] = inner_products(terms)
        return self._grams[name]

    def geometry(
        self, moves, atoms: Dict[str, List[Atom]], scores
    ) -> Tuple[float, float, Dict[str, torch.Tensor]]:
        """<g, d>, |d|^2 and d per block (in coefficients on the v_i) of the whole move (gamma = 1,
        each block its most); d's length is that of the weights it moves (<v_i, v_j>, not the
        coefficients': a curvature carried in it does not depend on how long each task vector is).
        Exact for task-arithmetic steps: then <g, theta - theta_0> is the scores' combination, so
        the slope needs no evaluation."""
        slope, length_sq, n, directions = 0.0, 0.0, len(self.fw.candidates), {}
        for name, (toward, away, most) in moves.items():
            if most <= 0.0:
                continue
            if away is None and not self.fw.p.pairwise:  # toward the FW vertex, away from the iterate
                here = sum(
                    (a.weight * self._unit(a) for a in atoms[name]), torch.zeros(n, dtype=torch.float64)
                )
                d = most * (self._unit(toward) - here)
            else:
                d = most * (self._unit(toward) - self._unit(away))
            directions[name] = d
            slope += float(d @ scores[name].double())
            length_sq += float(d @ self._gram(name) @ d)
        return slope, length_sq, directions

    def _shared(
        self, directions: Dict[str, torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(d, sum of the blocks' <v_i, v_j>) when every moved block moves by the same d, else (None, None)."""
        ds = list(directions.values())
        if not ds or any(not torch.equal(d, ds[0]) for d in ds[1:]):
            return None, None
        return ds[0], sum(self._gram(name) for name in directions)

    def trial(self, moves, atoms, scores, value: float, entry: dict) -> Tuple[float, Optional[Trial]]:
        """The step to take (a share of each block's most) and, when it is worth a check, its Trial."""
        slope, length_sq, directions = self.geometry(moves, atoms, scores)
        shared, metric = self._shared(directions)
        if shared is not None and self.hessian is not None:
            # the learned curvature along this very direction (a parabola's a is half of it)
            gamma = predicted_gamma(slope, 1.0, float(shared @ self.hessian @ shared))
        else:
            gamma = predicted_gamma(slope, length_sq, self.curvature)
        if gamma <= 0.0 or not checkable(value, slope, gamma):
            return gamma, None
        before = {name: [a.model_copy() for a in atoms[name]] for name in moves}
        entry.update(slope=slope, length_sq=length_sq, curvature=self.curvature)
        trial = Trial(
            value, slope, length_sq, gamma, moves, directions, before, entry, scores, shared, metric
        )
        return gamma, trial

    def _learn(self, trial: Trial, a: float, scores: Optional[Dict[str, torch.Tensor]]) -> None:
        """What the check of a step teaches the curvature: the scalar one always; the N x N one from
        the change of the scores (a secant pair), or, from a value alone, along the move's direction."""
        self.curvature = learned_curvature(self.curvature, a, trial.length_sq)
        d = trial.shared
        if d is None:
            return
        if scores is not None:
            change = sum(scores[n].double() - trial.scores[n].double() for n in trial.directions)
            self.hessian = secant_hessian(self.hessian, trial.gamma * d, change, trial.metric)
        elif self.hessian is not None:
            self.hessian = along_hessian(self.hessian, d, 2.0 * a, trial.metric)

    def settle(
        self,
        trial: Trial,
        value: float,
        atoms: Dict[str, List[Atom]],
        again: Callable[[Any], Any],
        scores: Optional[Dict[str, torch.Tensor]] = None,
    ):
        """The check of `trial` by the value (and, with `scores`, the slope) at its point: kept
        (returns None), or the step is taken again inside it (`fwllm.kernels.step_rule`), and
        `again(accept)` evaluates there, checked the same way, at most RETRIES times; the last
        evaluation is returned. A step that still raises the objective after the last retry is
        undone (the start's value and scores are returned). The hull grows when the step kept
        reaches it."""
        fw, out, first, with_scores = self.fw, None, trial.gamma, scores is not None
        for attempt in range(RETRIES + 1):
            # scores are those of a gradient only where the value passed the gate (else no backward ran)
            end = trial.end_slope(scores) if scores is not None and trial.keeps(value) else None
            f0, slope, gamma = trial.f0, trial.slope, trial.gamma
            a = fitted_a(f0, slope, gamma, value) if end is None else secant_a(slope, gamma, end)
            self._learn(trial, a, scores if end is not None else None)
            kept = keeps(f0, slope, gamma, value, end)
            # what the check saw, for the trace (why a step was retried)
            trial.entry.setdefault("checks", []).append(
                {"gamma": gamma, "value": value, "end_slope": end, "kept": kept}
            )
            if attempt == RETRIES or kept:
                break
            trial.gamma = retry_gamma(f0, slope, gamma, value, end)
            self._restore(trial, atoms)
            fw._apply(trial.moves, atoms, trial.gamma, relative=True)
            out = again(trial.keeps if attempt + 1 < RETRIES else None)
            value, scores = (out, None) if isinstance(out, float) else out
        if not trial.keeps(value):  # every retry went up (or NaN): back to where the step started
            self._restore(trial, atoms)
            trial.gamma = 0.0
            out = (trial.f0, trial.scores) if with_scores else trial.f0
        if trial.gamma != first:
            trial.entry["trial_gamma"] = first  # the step first taken, before its check
        trial.entry["gamma"] = trial.gamma
        if fw.p.hull == "adaptive" and trial.gamma >= 1.0:
            fw.scale *= 2.0  # the step reached the hull's boundary: let the hull grow
        return out

    def _restore(self, trial: Trial, atoms: Dict[str, List[Atom]]) -> None:
        """The blocks the step moved, back to where it started."""
        for name, before in trial.before.items():
            if atoms[name] != before:
                self.fw.iterate.set(name, before, self.fw.realize)
                atoms[name] = before
