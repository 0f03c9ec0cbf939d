"""One statistic per candidate (Fisher diagonal, Gram matrices), one candidate at a time.

Fisher merging and RegMean share this shape: for each candidate, load that model, run it
on *its own* calibration task, reduce what it saw to one tensor per weight, hand it to the
store, and free the model before the next one, so memory does not grow with the pool. A
statistic the store already holds (content-keyed) is not computed again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fwllm.arch.kinds import architecture_kind
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.data.calibration import CalibrationTask, load_calibration
from fwllm.data.encoding import check_rows_fit
from fwllm.io.candidates import open_candidate
from fwllm.io.models import architecture_of, is_adapter_dir, load_model, load_tokenizer, resolve_model_path
from fwllm.io.stats_store import StatsCache

LOG = logging.getLogger(__name__)

# compute(model, task, tokenizer) -> (tensors by name, meta)
ComputeFn = Callable[[torch.nn.Module, CalibrationTask, object], Tuple[Dict[str, torch.Tensor], dict]]


@dataclass
class Measured:
    spec: CandidateSpec
    task: CalibrationTask
    key: str  # the statistic's key in the store
    meta: dict
    cached: bool


def candidate_task(method: str, spec: CandidateSpec, tasks: Sequence[CalibrationTask]) -> CalibrationTask:
    """The candidate's own calibration data: the task its per-model `task` names."""
    name = spec.params.get("task") or ""
    if not name:
        raise FwllmError(f"{method}: candidate {spec.label} has no calibration task; set parameters.task")
    found = [t for t in tasks if t.name == name]
    if not found:
        raise FwllmError(
            f"{method}: candidate {spec.label} names task {name!r}, which the calibration data lacks "
            f"(available: {sorted(t.name for t in tasks)})"
        )
    return found[0]


def candidate_architecture(spec: CandidateSpec, base_dir: str) -> str:
    """The class the candidate loads as (adapters take their model's class)."""
    path = resolve_model_path(spec.model)
    return architecture_of(base_dir if is_adapter_dir(path) else path)


def load_candidate_model(spec: CandidateSpec, base_dir: str, device: str) -> torch.nn.Module:
    """The candidate as a float32 model: its own checkpoint (and head), or its model + LoRA deltas."""
    cand = open_candidate(spec.model, spec.lora)
    if cand.model_dir is not None:
        return load_model(cand.model_dir, torch.float32, device)
    path = resolve_model_path(spec.model)
    model = load_model(base_dir if is_adapter_dir(path) else path, torch.float32, device)
    cand.adapter.check_targets({n: tuple(p.shape) for n, p in model.named_parameters()}, spec.label)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            delta = cand.adapter.delta(name, prm.detach().cpu())
            if delta is not None:
                prm += delta.to(prm.device, prm.dtype)
    return model


def pooled_task(tasks: Sequence[CalibrationTask]) -> CalibrationTask:
    """Every calibration row of one kind in one task: the data of a candidate that has no task."""
    kinds = {t.kind for t in tasks}
    if len(kinds) != 1:
        raise FwllmError(
            f"a candidate without a task is measured on all calibration rows, which mix kinds {sorted(kinds)}"
        )
    fields = tasks[0].text_fields
    return CalibrationTask("all", tasks[0].kind, [r for t in tasks for r in t.rows], fields, source="")


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
        torch.manual_seed(p.seed)
        model = load_candidate_model(spec, base_dir, job.device)
        tensors, meta = compute(model, task, tokenizer)
        del model  # the next candidate loads only after this one is gone
        for name, t in tensors.items():
            check_finite(f"{what} of candidate {spec.label}", name, t)
        store.put(key, tensors, meta)
        del tensors
        out.append(Measured(spec, task, key, meta, False))
    return out
