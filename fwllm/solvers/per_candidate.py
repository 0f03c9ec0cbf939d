"""One statistic per candidate (Fisher diagonal, Gram matrices), one candidate at a time.

Fisher merging and RegMean share this shape: for each candidate, load that model, run it
on *its own* calibration task, reduce what it saw to one tensor per weight, and free the
model before the next one, so memory does not grow with the pool. This module computes and
returns; keeping the statistics (the content-keyed cache) is the method's business
(`fwllm.methods.statistics`).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.job import CandidateSpec
from fwllm.data.calibration import CalibrationTask
from fwllm.io.candidates import open_candidate
from fwllm.io.models import architecture_of, is_adapter_dir, load_model, resolve_model_path

# compute(model, task, tokenizer) -> (tensors by name, meta)
ComputeFn = Callable[[torch.nn.Module, CalibrationTask, object], Tuple[Dict[str, torch.Tensor], dict]]


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


def measure_candidate(
    spec: CandidateSpec,
    task: CalibrationTask,
    tokenizer,
    base_dir: str,
    device: str,
    seed: int,
    compute: ComputeFn,
    what: str,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Load one candidate, run `compute` on its task, free the model; the statistic's tensors
    (each checked finite; `what` names the statistic in that error) and its meta."""
    torch.manual_seed(seed)
    model = load_candidate_model(spec, base_dir, device)
    tensors, meta = compute(model, task, tokenizer)
    del model  # the next candidate loads only after this one is gone
    for name, t in tensors.items():
        check_finite(f"{what} of candidate {spec.label}", name, t)
    return tensors, meta
