"""Per-candidate statistics (Fisher diagonals, Gram matrices), one candidate at a time.

Fisher merging and RegMean share one solve shape: for each candidate, load that model,
run it on *its own* calibration task, reduce what it saw to one statistic per tensor,
write it to ``<plan_dir>/<kind>/<i>.safetensors`` and free the model before the next
one, so solve memory does not grow with the pool. The merge then reads one tensor's
entry from each file per call, so it does not grow with the pool either.

A statistic depends on the base, the candidate, its task's rows and the method's
settings, never on the merge weights. It is therefore also kept in a content-keyed cache
(``$FWLLM_CACHE/stats``) and hard-linked into new plans: re-merging with other weights
(a new plan fingerprint under plain mergekit) recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fwllm.calibration import CalibrationTask, load_calibration
from fwllm.data_methods import CandidateSpec, MergeJob, mark_plan_complete
from fwllm.errors import FwllmError
from fwllm.heads import TaskHead, is_head_tensor, save_heads
from fwllm.model_io import (
    TensorReader, is_adapter_dir, load_model, load_tokenizer, open_candidate, read_config, resolve_model_path,
)
from fwllm.objectives import CLASSIFIER_MODEL, architecture_kind, check_rows_fit
from fwllm.paths import cache_root

LOG = logging.getLogger(__name__)


# -- files --------------------------------------------------------------------------------
def save_stats(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Write atomically: a half-written file must never look like a finished statistic."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def read_stat(path: str, name: str) -> Optional[torch.Tensor]:
    """One entry of a statistics file (None when the file has none for `name`)."""
    with safe_open(path, framework="pt") as fp:
        if name not in fp.keys():
            return None
        return fp.get_tensor(name)


def has_stat(path: str, name: str) -> bool:
    with safe_open(path, framework="pt") as fp:
        return name in fp.keys()


def check_finite(what: str, name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise FwllmError(
            f"{what} is not finite in {name} ({bad} NaN/inf entries): the model's outputs or gradients "
            f"overflow; check the checkpoint for NaN/inf weights or solve in float32"
        )


def _link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)  # no second copy of a model-sized file when both sit on one disk
    except OSError:
        shutil.copyfile(src, dst)


# -- cache keys ---------------------------------------------------------------------------
def _folder_signature(path: Optional[str]) -> List[tuple]:
    """Files of a model folder by name, size and mtime: a rebuilt checkpoint gets a new key."""
    if not path:
        return []
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            st = os.stat(full)
            out.append((name, st.st_size, st.st_mtime_ns))
    return out


def stats_key(kind: str, settings: dict, base_dir: str, spec: CandidateSpec, task: CalibrationTask) -> str:
    model_dir = resolve_model_path(spec.model)
    payload = {
        "kind": kind,
        "settings": settings,
        "base": [base_dir, _folder_signature(base_dir)],
        "model": [model_dir, _folder_signature(model_dir)],
        "lora": [spec.lora, _folder_signature(resolve_model_path(spec.lora) if spec.lora else None)],
        "task": task.name,
        "rows": hashlib.sha256(json.dumps(task.rows, sort_keys=True).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


# -- candidates ---------------------------------------------------------------------------
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
    if is_adapter_dir(path):
        path = base_dir
    return (read_config(path).get("architectures") or ["?"])[0]


def load_candidate_model(spec: CandidateSpec, base_dir: str, device: str) -> torch.nn.Module:
    """The candidate as a float32 model: its own checkpoint (and head), or its model + LoRA deltas."""
    cand = open_candidate(spec.model, spec.lora)
    if cand.model_dir is not None:
        return load_model(cand.model_dir, torch.float32, device)
    path = resolve_model_path(spec.model)
    model = load_model(base_dir if is_adapter_dir(path) else path, torch.float32, device)
    applied = 0
    with torch.no_grad():
        for name, prm in model.named_parameters():
            delta = cand.adapter.delta(name)
            if delta is not None:
                prm += delta.to(prm.device, prm.dtype)
                applied += 1
    if not applied:
        raise FwllmError(f"{spec.label}: the adapter changes no weight of {type(model).__name__}")
    return model


def checkpoint_head(spec: CandidateSpec) -> Optional[TaskHead]:
    """A full classifier checkpoint's head, read from its files (no model load)."""
    if spec.lora:
        return None
    path = resolve_model_path(spec.model)
    if is_adapter_dir(path):
        return None
    cfg = read_config(path)
    if architecture_kind((cfg.get("architectures") or ["?"])[0]) != CLASSIFIER_MODEL:
        return None
    reader = TensorReader(path)
    tensors = {n: reader.get(n, dtype=None) for n in reader.names() if is_head_tensor(n)}
    if not tensors:
        return None
    num_labels = len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))
    return TaskHead(tensors, num_labels, cfg.get("problem_type"))


def weights_of(method: str, labels: Sequence[str], per_model: Dict[str, Dict]) -> List[float]:
    """Per-model `weight`s; negative or all-zero weights have no merge meaning here."""
    weights = [float(per_model.get(lab, {}).get("weight", 1.0)) for lab in labels]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FwllmError(f"{method}: per-model weights must be >= 0 and not all zero (got {weights})")
    return weights


# -- the shared solve loop ----------------------------------------------------------------
@dataclass
class CandidateStats:
    label: str
    task: str
    file: str  # relative to the plan folder
    meta: dict  # whatever the method reports per candidate (Fisher mean, token count, ...)
    cached: bool


# compute(model, task, tokenizer) -> (tensors by name, meta)
ComputeFn = Callable[[torch.nn.Module, CalibrationTask, object], Tuple[Dict[str, torch.Tensor], dict]]


def solve_per_candidate(
    job: MergeJob, kind: str, settings: dict, compute: ComputeFn, what: str = "",
) -> Tuple[List[CandidateStats], Dict[str, TaskHead]]:
    """Run `compute` for each candidate in turn; write `<plan>/<kind>/<i>.safetensors`.

    `settings` are whatever changes the statistic (they key the cache); `what` names it in errors.

    Every input problem (missing task, rows the model cannot score) is reported before
    any weights are loaded. Returns each candidate's record and the per-task heads of
    classifier candidates (kept beside the merged body, never merged).
    """
    p = job.params
    if not p.calibration:
        raise FwllmError(f"{job.method} needs `parameters: {{calibration: PATH}}` (a .jsonl file or a folder of them)")
    if not job.candidates:
        raise FwllmError(f"{job.method}: the candidate pool is empty")
    base_dir = resolve_model_path(job.base)
    tasks = load_calibration(p.calibration, p.max_rows)
    own = [candidate_task(job.method, spec, tasks) for spec in job.candidates]
    for spec, task in zip(job.candidates, own):
        check_rows_fit(task, architecture_kind(candidate_architecture(spec, base_dir)))
    tokenizer = load_tokenizer(base_dir)

    records, heads = [], {}
    cache_dir = os.path.join(cache_root(), "stats", kind)
    for i, (spec, task) in enumerate(zip(job.candidates, own)):
        rel = os.path.join(kind, f"{i}.safetensors")
        target = os.path.join(job.plan_dir, rel)
        key = stats_key(kind, settings, base_dir, spec, task)
        cached_file, meta_file = os.path.join(cache_dir, key + ".safetensors"), os.path.join(cache_dir, key + ".json")
        hit = os.path.isfile(cached_file) and os.path.isfile(meta_file)
        model = None
        if hit:
            LOG.info("%s: reusing cached statistics for %s", job.method, spec.label)
            with open(meta_file, encoding="utf-8") as fp:
                meta = json.load(fp)
        else:
            torch.manual_seed(p.seed)
            model = load_candidate_model(spec, base_dir, job.device)
            tensors, meta = compute(model, task, tokenizer)
            for name, t in tensors.items():
                check_finite(f"{what or kind} of candidate {spec.label}", name, t)
            save_stats(cached_file, tensors)
            del tensors
            with open(meta_file, "w", encoding="utf-8") as fp:
                json.dump(meta, fp)
        del model  # the next candidate loads only after this one is gone
        _link_or_copy(cached_file, target)
        head = checkpoint_head(spec)
        if head is not None:
            heads[task.name] = head
        records.append(CandidateStats(spec.label, task.name, rel, meta, hit))
    return records, heads


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i t_i / sum_i w_i: the fallback for tensors a statistic does not cover."""
    total, out, tensors = sum(weights), None, iter(tensors)
    for w in weights:  # not zip(): zip keeps its last items alive while it fetches the next ones
        t = next(tensors)
        part = t.float() * (w / total)
        out = part if out is None else out + part
        del t, part  # before the next one is read: inputs may stream from disk
    return out


def head_or_base(plan: dict, name: str, base: torch.Tensor, candidates: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Head tensors are task specific: the loadable checkpoint carries the primary candidate's."""
    primary = plan.get("primary_head")
    if is_head_tensor(name) and primary in candidates:
        return candidates[primary]
    return base


# -- the shared plan tail -------------------------------------------------------------------
def load_stats_plan(method: str, plan_dir: str, params_type) -> dict:
    """plan.json of a per-candidate-statistics method, with its statistic files and stored merge."""
    from fwllm.merged_store import merged_index

    path = os.path.join(plan_dir, "plan.json")
    if not os.path.isfile(path):
        raise FwllmError(f"{plan_dir} is not a {method} plan (no plan.json)")
    with open(path, encoding="utf-8") as fp:
        plan = json.load(fp)
    if plan.get("method") != method:
        raise FwllmError(f"{plan_dir} holds a {plan.get('method')} plan, not a {method} plan")
    plan["labels"] = [c["label"] for c in plan["candidates"]]
    plan["_files"] = [os.path.join(plan_dir, c["file"]) for c in plan["candidates"]]
    plan["_params"] = params_type(**plan["settings"])
    plan["_merged"] = merged_index(plan_dir)
    return plan


def finish_stats_plan(method, job: MergeJob, plan: dict, heads: Dict[str, TaskHead]) -> None:
    """Write plan.json and the heads, merge every tensor now, then mark the plan complete.

    The merge runs here, streamed (`fwllm.merged_store`): one candidate tensor at a time
    through readers that close their shards, so `fwllm merge` can hand mergekit a
    base-only graph and the merge's memory stays flat in the number of candidates.
    """
    from fwllm.merged_store import execute_streamed

    with open(os.path.join(job.plan_dir, "plan.json"), "w", encoding="utf-8") as fp:
        json.dump(plan, fp, indent=2)
    if heads:
        save_heads(job.plan_dir, heads)
    loaded = method.load_plan(job.plan_dir)
    candidates = {spec.label: open_candidate(spec.model, spec.lora) for spec in job.candidates}
    per_model = {spec.label: spec.params for spec in job.candidates}
    execute_streamed(job.plan_dir, resolve_model_path(job.base), candidates,
                     lambda name, base, cands: method.merge_tensor(loaded, name, base, cands, per_model),
                     job.progress)
    mark_plan_complete(job.plan_dir)


def stored_or_none(plan: dict, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
    """The merged tensor the plan stores (the base for a tensor it has none of), or None
    when the plan stores no merge (the kernel then merges from the candidates it is given)."""
    from fwllm.merged_store import read_merged

    if plan.get("_merged") is None:
        return None
    stored = read_merged(plan["_merged"], name)
    return base if stored is None else stored
