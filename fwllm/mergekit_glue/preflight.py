"""Every input check that needs no model loaded, run before any model is loaded or output staged.

A data-informed merge can run for minutes before it first touches a broken input. So the
calibration files are read and checked here (every row, and every label against the head
that will score it, from that model's config), and each candidate is compared with the
base from the safetensors headers alone: a tensor missing or extra, a shape that differs,
an adapter that targets modules the base does not have.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

from safetensors import safe_open

from fwllm.arch.heads import is_head_tensor
from fwllm.core.errors import FwllmError
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.data.calibration import CalibrationTask, check_labels, load_calibration
from fwllm.io.adapters import AdapterReader
from fwllm.mergekit_glue.bounds import check_bounds
from fwllm.io.models import (
    ADAPTER_CONFIG,
    architecture_of,
    is_adapter_dir,
    read_config,
    resolve_model_path,
    safetensors_files,
)
from fwllm.mergekit_glue.weight_files import check_shard

# Buffers some checkpoints carry and others of the same class do not; no merge reads them.
BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", ".attn.bias", ".attn.masked_bias")


def tensor_shapes(model_dir: str) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} from the safetensors headers (no tensor is read)."""
    shapes = {}
    for shard in safetensors_files(model_dir):
        check_shard(shard)  # a truncated shard is one error line here, not a traceback mid-merge
        try:
            with safe_open(shard, framework="pt") as fp:
                for name in fp.keys():
                    shapes[name] = tuple(fp.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error type for a damaged header
            raise FwllmError(
                f"{shard} is not a readable safetensors file ({str(err).splitlines()[0]})"
            ) from None
    return shapes


def _merged_names(shapes: Dict[str, tuple]) -> set:
    return {n for n in shapes if not is_head_tensor(n) and not n.endswith(BUFFER_SUFFIXES)}


def check_checkpoint(label: str, model_dir: str, base: Dict[str, tuple], same_class: bool) -> None:
    """A full candidate against the base: same tensors (bar heads and buffers) with the same shapes."""
    own = tensor_shapes(model_dir)
    mine, theirs = _merged_names(own), _merged_names(base)
    if same_class:
        for names, how in ((sorted(theirs - mine), "lacks"), (sorted(mine - theirs), "has")):
            if names:
                which = "the base has" if how == "lacks" else "the base lacks"
                raise FwllmError(
                    f"candidate {label} {how} {names[0]}, which {which} ({len(names)} such tensor(s)): "
                    f"it is not a checkpoint of the base's architecture"
                )
    for name in sorted(mine & theirs):
        if own[name] != base[name]:
            raise FwllmError(f"candidate {label}: {name} has shape {own[name]}, the base {base[name]}")


def _module_matches(target: str, modules: set) -> bool:
    return any(m == target or m.endswith("." + target) for m in modules)  # peft's rule for a name list


def check_adapter(label: str, adapter_dir: str, base: Dict[str, tuple]) -> None:
    """An adapter against the base: its target_modules and its tensors must all exist there."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as fp:
            targets = json.load(fp).get("target_modules")
    except (OSError, ValueError, AttributeError) as err:
        raise FwllmError(f"cannot read {path}: {err}") from None
    modules = {n.rsplit(".", 1)[0] for n in base}
    if isinstance(targets, str) and targets != "all-linear":
        unknown = [] if any(re.fullmatch(targets, m) for m in modules) else [targets]
    else:
        unknown = [t for t in targets or [] if isinstance(t, str) and not _module_matches(t, modules)]
    if unknown:
        raise FwllmError(
            f"{label}: the adapter's target_modules name {unknown[0]!r}, which the base has no module "
            f"called (was it trained on another base?)"
        )
    AdapterReader(adapter_dir).check_targets(base, label)


def _scorer(task: CalibrationTask, job: MergeJob, base_dir: str) -> Tuple[str, str]:
    """(label, folder) of the model whose head scores `task`: the full checkpoint whose per-model
    `task` names it, else the base."""
    for c in job.candidates:
        if c.params.get("task") == task.name and not c.lora:
            path = resolve_model_path(c.model)
            if not is_adapter_dir(path):
                return c.label, path
    return job.base, base_dir


def check_task_labels(tasks: List[CalibrationTask], job: MergeJob, base_dir: str) -> None:
    for task in tasks:
        label, folder = _scorer(task, job, base_dir)
        cfg = read_config(folder)
        if not ((cfg.get("architectures") or [""])[0]).endswith("ForSequenceClassification"):
            continue  # rows a causal or masked LM cannot score are refused when the pool opens
        num_labels = len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))
        check_labels(task, num_labels, label)


def _candidate(spec: CandidateSpec, base: Dict[str, tuple], base_class: str) -> None:
    if spec.lora:
        check_adapter(spec.label, resolve_model_path(spec.lora), base)
        return
    path = resolve_model_path(spec.model)
    if is_adapter_dir(path):
        check_adapter(spec.label, path, base)
    else:
        check_checkpoint(spec.label, path, base, architecture_of(path) == base_class)


def check_job(job: MergeJob) -> List[CalibrationTask]:
    """Read the calibration data and check it and the pool against each other; returns the tasks."""
    tasks = load_calibration(job.params.calibration, job.params.max_rows)
    base_dir = resolve_model_path(job.base)
    base = tensor_shapes(base_dir)
    base_class = architecture_of(base_dir)
    for spec in job.candidates:
        _candidate(spec, base, base_class)
    check_task_labels(tasks, job, base_dir)
    check_bounds(job, tasks, base_dir, base)  # context and memory; may lower the default max_length
    return tasks
