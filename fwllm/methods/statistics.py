"""Per-candidate statistics (Fisher diagonal, Gram matrices) through the statistics cache.

The solver measures one candidate and returns the tensors (`fwllm.solvers.per_candidate`);
here the method checks every candidate's inputs first, asks the cache for each statistic
(content-keyed: a statistic the cache already holds is not computed again), and puts what the
solver measured into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from fwllm.arch.kinds import architecture_kind
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.params import RegMeanParams
from fwllm.data.calibration import CalibrationTask, load_calibration
from fwllm.data.encoding import check_rows_fit
from fwllm.io.models import load_tokenizer, resolve_model_path
from fwllm.io.stats_store import StatsCache
from fwllm.solvers.grams import GRAM_LAYERS, candidate_grams
from fwllm.solvers.per_candidate import (
    ComputeFn,
    candidate_architecture,
    candidate_task,
    measure_candidate,
    pooled_task,
)

LOG = logging.getLogger(__name__)


@dataclass
class Measured:
    spec: CandidateSpec
    task: CalibrationTask
    key: str  # the statistic's key in the store
    meta: dict
    cached: bool


def measure_candidates(
    job: MergeJob,
    store: StatsCache,
    settings: dict,
    compute: ComputeFn,
    what: str,
    specs: Optional[Sequence[CandidateSpec]] = None,
    without_task: str = "error",
) -> List[Measured]:
    """Run `compute` for each candidate (of `specs`, default all) in turn, unless `store`
    already holds its statistic. A candidate without a per-model `task` is an error, or with
    `without_task="all"` is measured on every calibration row.

    `settings` are whatever changes the statistic (they key the store); `what` names it in
    errors. Every input problem (missing task, rows the model cannot score) is reported
    before any weights are loaded."""
    p = job.params
    specs = list(job.candidates if specs is None else specs)
    base_dir = resolve_model_path(job.base)
    tasks = load_calibration(p.calibration, p.max_rows)
    own = [
        pooled_task(tasks)
        if without_task == "all" and not spec.params.get("task")
        else candidate_task(job.method, spec, tasks)
        for spec in specs
    ]
    for spec, task in zip(specs, own):
        check_rows_fit(task, architecture_kind(candidate_architecture(spec, base_dir)))
    tokenizer = load_tokenizer(base_dir)
    out = []
    for spec, task in zip(specs, own):
        key = store.key(settings, base_dir, spec, task.name, task.rows)
        meta = None if job.no_cache else store.get(key)
        if meta is not None:
            LOG.info("%s: reusing the cached %s of %s", job.method, what, spec.label)
            out.append(Measured(spec, task, key, meta, True))
            continue
        tensors, meta = measure_candidate(spec, task, tokenizer, base_dir, job.device, p.seed, compute, what)
        store.put(key, tensors, meta)
        del tensors
        out.append(Measured(spec, task, key, meta, False))
    return out


def measure_grams(job: MergeJob, used: Sequence[int]) -> Dict[int, str]:
    """FW's `refine: regmean`: the Gram file of each used candidate (computed once per content,
    then cached)."""
    p = job.params
    store = StatsCache("gram")
    settings = {"max_length": p.max_length, "batch_size": p.batch_size, "layers": GRAM_LAYERS}
    grams = RegMeanParams(calibration=p.calibration, max_length=p.max_length, batch_size=p.batch_size)
    specs = [job.candidates[i] for i in used]
    measured = measure_candidates(
        job,
        store,
        settings,
        lambda m, task, tok: candidate_grams(m, task, tok, grams),
        "Gram",
        specs=specs,
        without_task="all",
    )
    return {i: store.paths(m.key)[0] for i, m in zip(used, measured)}
