"""`local_merge: regmean`: FW picks the support, RegMean merges it.

FW (with task-arithmetic steps) ends with coefficients c_i >= 0 per tensor: which candidates a
layer uses, and how much. Irrelevant experts get c_i = 0 there. Each linear weight is then
merged in RegMean's closed form over the candidates it uses, weighted by FW's coefficients
and rescaled by FW's mass, in task-vector space:

    W = W_0 + (sum_i c_i) * (sum_i c_i G~_i)^-1 sum_i c_i G~_i tau_i,   G~ = alpha G + (1 - alpha) diag G

With equal Grams this is FW's own W_0 + sum_i c_i tau_i; with alpha = 1 and two experts fitted on
disjoint data it is their joint least-squares solution. `weights: uniform` keeps only FW's
support: every used candidate gets c_i = 1 and the mass is 1, so over the whole pool it is
RegMean itself, and FW's part is to leave out the candidates that do not help. G_i comes from candidate i run on its own
task's calibration rows (all rows for a candidate without a task), cached by content like RegMean's.
Tensors that are not linear weights, and linear weights FW left alone, keep FW's merge.
"""

from __future__ import annotations

import logging
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.params import RegMeanParams
from fwllm.io.stats_store import StatsCache, read_stat
from fwllm.kernels.regmean import regmean_merge
from fwllm.solvers.grams import GRAM_LAYERS, candidate_grams
from fwllm.solvers.per_candidate import measure_candidates

LOG = logging.getLogger(__name__)


def measure_grams(job: MergeJob, used: Sequence[int]) -> Dict[int, str]:
    """The Gram file of each used candidate (computed once per content, then cached)."""
    p = job.params
    store = StatsCache("gram")
    settings = {"max_length": p.max_length, "batch_size": p.batch_size, "layers": GRAM_LAYERS}
    grams = RegMeanParams(calibration=p.calibration, max_length=p.max_length, batch_size=p.batch_size)
    specs = [job.candidates[i] for i in used]
    measured = measure_candidates(job, store, settings, lambda m, task, tok: candidate_grams(m, task, tok, grams),
                                  "Gram", specs=specs, without_task="all")
    return {i: store.paths(m.key)[0] for i, m in zip(used, measured)}


def refine(merged: Iterable[Tuple[str, torch.Tensor]], coefficients: Dict[str, List[float]],
           gram_files: Dict[int, str], tau: Callable[[str], Callable[[int], torch.Tensor]],
           base: Callable[[str], torch.Tensor], alpha: float, ridge: float = 1e-5, weights: str = "fw",
           transposed: Collection[str] = ()) -> Iterator[Tuple[str, torch.Tensor]]:
    """FW's merged tensors, with every linear weight FW used re-merged in RegMean's closed form
    (`weights`: "fw" or "uniform", see the module docstring; `transposed`: weights stored [in, out],
    GPT-2's Conv1D)."""
    refined = 0
    for name, value in merged:
        coef = coefficients.get(name) or []
        used = [i for i, c in enumerate(coef) if c > 0]
        if any(c < 0 for c in coef):
            raise FwllmError(f"local_merge regmean needs coefficients >= 0; {name} has {coef} (use init: base)")
        gram = {i: read_stat(gram_files[i], name) for i in used if i in gram_files} if used else {}
        if not used or value.dim() != 2 or len(gram) != len(used) or any(g is None for g in gram.values()):
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
            LOG.warning("fw regmean: the Gram sum of %s is singular; ridge %.3g (towards FW's merge)", name, lam)
        refined += 1
        yield name, base(name) + mass * delta
    LOG.info("fw regmean: %d linear weights re-merged in closed form", refined)
