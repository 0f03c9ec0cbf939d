"""`refine: regmean` (formerly `local_merge: regmean`): FW picks the support, RegMean merges it.

FW (with task-arithmetic steps) ends with coefficients c_i >= 0 per tensor: which candidates a
layer uses, and how much. Irrelevant experts get c_i = 0 there. Each linear weight is then
merged in RegMean's closed form over the candidates it uses, weighted by FW's coefficients
and rescaled by FW's mass, in task-vector space:

    W = W_0 + (sum_i c_i) * (sum_i c_i G~_i)^-1 sum_i c_i G~_i tau_i,   G~ = alpha G + (1 - alpha) diag G

With equal Grams this is FW's own W_0 + sum_i c_i tau_i; with alpha = 1 and two experts fitted on
disjoint data it is their joint least-squares solution. `weights: uniform` keeps only FW's
support: every used candidate gets c_i = 1 and the mass is 1, so over the whole pool it is
RegMean itself, and FW's part is to leave out the candidates that do not help. G_i comes from candidate i run on its own
task's calibration rows (all rows for a candidate without a task); the method measures and caches
them by content like RegMean's (`fwllm.methods.statistics.measure_grams`) and hands them in.
Tensors that are not linear weights, and linear weights FW left alone, keep FW's merge.

On the bounded path (`gradient: layerwise`) `refine_streamed` measures the Grams one decoder
layer at a time and reduces them as they come (`fwllm.solvers.streamed_grams`): no Gram file, no
candidate loaded whole. Each linear weight gets its own sums unless it shares its input and its
candidate weights with another one (q/k/v under `granularity: model` share one Gram sum).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch

from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.data.calibration import CalibrationTask, load_calibration
from fwllm.data.encoding import encode_task
from fwllm.io.candidates import Candidate
from fwllm.io.models import load_tokenizer
from fwllm.kernels.regmean import regmean_merge
from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean_reduced import RegMeanSums
from fwllm.solvers.per_candidate import candidate_task, pooled_task
from fwllm.solvers.streamed_grams import SCRATCH_DIR, StreamedRegMean, add_statistics

LOG = logging.getLogger(__name__)


def refine(
    merged: Iterable[Tuple[str, torch.Tensor]],
    coefficients: Dict[str, List[float]],
    gram_of: Callable[[int, str], Optional[torch.Tensor]],
    tau: Callable[[str], Callable[[int], torch.Tensor]],
    base: Callable[[str], torch.Tensor],
    alpha: float,
    ridge: float = 1e-5,
    weights: str = "fw",
    transposed: Collection[str] = (),
) -> Iterator[Tuple[str, torch.Tensor]]:
    """FW's merged tensors, with every linear weight FW used re-merged in RegMean's closed form
    (`weights`: "fw" or "uniform", see the module docstring; `transposed`: weights stored [in, out],
    GPT-2's Conv1D). `gram_of(i, name)`: candidate i's Gram of that weight (None: it has none)."""
    refined = 0
    for name, value in merged:
        coef = coefficients.get(name) or []
        used = [i for i, c in enumerate(coef) if c > 0]
        if any(c < 0 for c in coef):
            raise FwllmError(f"refine regmean needs coefficients >= 0; {name} has {coef} (use init: base)")
        gram = {i: gram_of(i, name) for i in used}
        if not used or value.dim() != 2 or any(g is None for g in gram.values()):
            yield name, value
            continue
        t = tau(name)
        weight = {i: 1.0 if weights == "uniform" else coef[i] for i in used}
        mass = 1.0 if weights == "uniform" else sum(coef[i] for i in used)
        flip = name in transposed  # the closed form takes [out, in]
        layers = ((t(i).T if flip else t(i), gram[i], weight[i]) for i in used)  # one task vector at a time
        delta, lam = regmean_merge(layers, alpha, ridge)
        delta = delta.T if flip else delta
        if lam:
            LOG.warning(
                "fw regmean: the Gram sum of %s is singular; ridge %.3g (towards FW's merge)", name, lam
            )
        refined += 1
        yield name, base(name) + mass * delta
    LOG.info("fw regmean: %d linear weights re-merged in closed form", refined)


# -- the bounded path ------------------------------------------------------------------------
class _SupportRegMean(StreamedRegMean):
    """StreamedRegMean over FW's support: candidate k enters each linear weight's sums with that
    weight's own RegMean weight (`weights_of(name)[k]`, 0: left out there). Weights that read one
    input and carry the same weights (q/k/v under `granularity: model`) share one Gram sum; others
    get their own. Only the closed form is wanted: every other tensor keeps FW's merge."""

    def __init__(self, *args, weights_of: Callable[[str], Optional[Tuple[float, ...]]], **kw):
        super().__init__(*args, **kw)
        self.weights_of = weights_of
        self.position = {id(run): k for k, run in enumerate(self.runs)}

    def _room(self, sums):
        """The rows the sums of an input keep: the least any of its (input, weights) sums keeps."""

        def room(name: str, features: int) -> int:
            rooms = [s.rows_room(features) for (n, _), s in sums.items() if n == name]
            return min(rooms, default=RegMeanSums.row_limit(features))

        return room

    def _add(self, run, grams, leader, sums) -> None:
        k = self.position[id(run)]
        for name, stats in grams.items():
            stats = self._checked(run, name, stats)
            by_weights: Dict[Tuple[float, ...], List[str]] = {}
            for n in (n for n, lead in leader.items() if lead == name):
                w = self.weights_of(n)
                if w is not None and w[k] > 0:
                    by_weights.setdefault(w, []).append(n)
            for w, group in by_weights.items():
                taus = {n: self._weight_of(run, n) for n in group}
                add_statistics(sums.setdefault((name, w), RegMeanSums(self.alpha)), stats, taus, w[k])

    def _rest(self):
        return iter(())


def own_tasks(job: MergeJob) -> List[CalibrationTask]:
    """Each candidate's Gram data: its own task's rows, all rows for a candidate without a task
    (checked before the solve, so a bad task is an error before FW's iterations, not after)."""
    tasks = load_calibration(job.params.calibration, job.params.max_rows)
    return [
        pooled_task(tasks) if not s.params.get("task") else candidate_task(job.method, s, tasks)
        for s in job.candidates
    ]


def refine_streamed(
    job: MergeJob,
    candidates: Sequence[Candidate],
    tasks: Sequence[CalibrationTask],
    base_dir: str,
    coefficients: Dict[str, List[float]],
    base: Callable[[str], torch.Tensor],
    architecture: Optional[str] = None,
    ridge: float = 1e-5,
    check_space: Optional[Callable[[int], None]] = None,
) -> Tuple[Iterator[Tuple[str, torch.Tensor]], Set[str]]:
    """`refine` on the bounded path: the Grams measured one decoder layer at a time
    (`fwllm.solvers.streamed_grams`) and reduced as they come, never one per candidate kept.
    Returns the refined linear weights (a generator) and the set their names fill as it runs.
    `check_space(bytes)`: called with the bytes the spilled hidden states take in the plan folder
    before any of them is measured (the method's free-disk check)."""
    p = job.params
    coef = {n: c for n, c in coefficients.items() if c}
    bad = next(((n, c) for n, c in coef.items() if any(x < 0 for x in c)), None)
    if bad:
        raise FwllmError(f"refine regmean needs coefficients >= 0; {bad[0]} has {bad[1]} (use init: base)")
    used = sorted({i for c in coef.values() for i, x in enumerate(c) if x > 0})
    if not used:
        return iter(()), set()
    uniform = p.regmean_weights == "uniform"

    def weights_of(name: str) -> Optional[Tuple[float, ...]]:
        c = coef.get(name)
        if c is None or not any(c[i] > 0 for i in used):
            return None
        return tuple((1.0 if uniform else c[i]) if c[i] > 0 else 0.0 for i in used)

    tokenizer = load_tokenizer(base_dir)
    batches = [encode_task(tasks[i], tokenizer, p.max_length, p.batch_size).batches for i in used]
    solver = _SupportRegMean.for_candidates(
        base_dir,
        [candidates[i] for i in used],
        [1.0] * len(used),
        batches,
        p.regmean_alpha,
        ridge,
        job.device,
        weights_of=weights_of,
        architecture=architecture,  # an encoder pool runs its experts' classifier class
        spill_dir=os.path.join(job.plan_dir, SCRATCH_DIR),  # removed with FW's other scratch folders
    )
    if check_space is not None:
        check_space(solver.held_bytes(batches))

    solver.keep_factors = True  # a LoRA pool's refine is W_0 + B A: kept as factors

    def merged() -> Iterator[Tuple[str, Union[torch.Tensor, LowRank]]]:
        for name, value in solver.merged():
            if uniform:
                yield name, value
                continue
            # weights "fw": FW's mass on RegMean's direction, W_0 + mass * (W - W_0)
            mass = sum(x for x in coef[name] if x > 0)
            if isinstance(value, LowRank):
                yield name, LowRank(value.a, value.b, value.scale * mass)
                continue
            w0 = base(name)
            yield name, w0 + mass * (value - w0)
        LOG.info(
            "fw regmean: %d linear weights re-merged in closed form (Grams streamed)", len(solver.solved)
        )

    return merged(), solver.solved
