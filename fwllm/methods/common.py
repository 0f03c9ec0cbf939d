"""What the method adapters share: opening a pool, per-task heads, per-model weights, the
statistics-plan tail, and the plain mergekit recipe a plan can be reproduced with."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import yaml

from fwllm.arch.encoder_pool import classifier_arch
from fwllm.arch.heads import TaskHead, checkpoint_head, head_module, is_head_tensor, save_heads, task_heads
from fwllm.arch.kinds import CLASSIFIER_MODEL, architecture_kind
from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.plan import CandidateStats, Plan, PlanRecord, mark_plan_complete, write_record
from fwllm.data.calibration import CalibrationTask, load_calibration
from fwllm.data.encoding import check_rows_fit
from fwllm.io.candidates import Candidate, open_candidate
from fwllm.io.merged_store import execute_streamed, merged_factors, read_merged
from fwllm.io.models import architecture_of, check_same_architecture, load_model, resolve_model_path
from fwllm.io.stats_store import StatsCache, link_or_copy
from fwllm.io.tensors import TensorReader
from fwllm.kernels.low_rank import LowRank
from fwllm.methods.statistics import Measured

LOG = logging.getLogger(__name__)


# -- pools of candidates over one base (FW-Merging, AdaMerging) -------------------------------
@dataclass
class Pool:
    base_dir: str
    candidates: List[Candidate]
    architecture: Optional[str]  # an encoder pool's classifier class, else None (the base's own)
    kind: str  # causal / classifier / masked
    tasks: List[CalibrationTask]


def open_pool(
    job: MergeJob, usable: Optional[Callable[[List[CalibrationTask]], List[CalibrationTask]]] = None
) -> Pool:
    """Base, candidates and calibration tasks, checked against each other before any weights load.
    `usable` picks the tasks the method can use (before their rows are checked against the model)."""
    base_dir = resolve_model_path(job.base)
    candidates = [open_candidate(c.model, c.lora) for c in job.candidates]
    check_same_architecture(base_dir, [c.model_dir for c in candidates if c.model_dir])
    reader = TensorReader(base_dir)
    base_shapes = {n: reader.shape(n) for n in reader.names()}
    for c in candidates:
        if c.adapter is not None:
            c.adapter.check_targets(base_shapes, c.label)
    # encoder pools: the experts' classifier class, its body initialised from the base
    arch = classifier_arch([c.model_dir for c in candidates if c.model_dir])
    kind = architecture_kind(arch or architecture_of(base_dir))
    tasks = load_calibration(job.params.calibration, job.params.max_rows)
    if usable is not None:
        tasks = usable(tasks)
    for task in tasks:
        check_rows_fit(task, kind)
    return Pool(base_dir, candidates, arch, kind, tasks)


def load_pool_model(pool: Pool, device: str) -> torch.nn.Module:
    return load_model(pool.base_dir, torch.float32, device, architecture=pool.architecture)


def pool_heads(pool: Pool, job: MergeJob, tasks: Sequence[CalibrationTask]) -> Dict[str, TaskHead]:
    """Each task's own expert head (encoder pools; {} otherwise)."""
    if pool.kind != CLASSIFIER_MODEL:
        return {}
    owners = {
        spec.params.get("task"): (cand.label, cand.model_dir)
        for spec, cand in zip(job.candidates, pool.candidates)
        if spec.params.get("task")
    }
    return task_heads(owners, [t.name for t in tasks])


def head_modules(model: torch.nn.Module, heads: Dict[str, TaskHead], device) -> Dict[str, torch.nn.Module]:
    return {task: head_module(model, head, device) for task, head in heads.items()}


def primary_head(job: MergeJob, heads: Dict[str, TaskHead]) -> Optional[str]:
    """The candidate whose head the loadable checkpoint carries: the first one with a kept head."""
    return next((c.label for c in job.candidates if c.params.get("task") in heads), None)


def head_or_base(
    plan: Plan, name: str, base: torch.Tensor, candidates: Dict[str, torch.Tensor]
) -> torch.Tensor:
    """Head tensors are task specific: the loadable checkpoint carries the primary candidate's."""
    primary = plan.record.primary_head
    if is_head_tensor(name) and primary in candidates:
        return candidates[primary]
    return base


def weights_of(method: str, labels: Sequence[str], per_model: Dict[str, Dict]) -> List[float]:
    """Per-model `weight`s; negative or all-zero weights have no merge meaning for a weighted mean."""
    weights = [float(per_model.get(lab, {}).get("weight", 1.0)) for lab in labels]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise FwllmError(f"{method}: per-model weights must be >= 0 and not all zero (got {weights})")
    return weights


def check_candidates(method: str, labels: Sequence[str], candidates: Dict[str, torch.Tensor]) -> None:
    if set(candidates) != set(labels):
        raise FwllmError(
            f"{method}: the plan was solved for {list(labels)}; the recipe gives {sorted(candidates)}"
        )


# -- per-candidate statistics (Fisher, RegMean) ------------------------------------------------
def link_statistics(job: MergeJob, store: StatsCache, measured: Sequence[Measured]) -> List[CandidateStats]:
    """Hard-link each candidate's statistic from the store into `<plan>/<kind>/<i>.safetensors`."""
    records = []
    for i, m in enumerate(measured):
        rel = os.path.join(store.kind, f"{i}.safetensors")
        link_or_copy(store.paths(m.key)[0], os.path.join(job.plan_dir, rel))
        records.append(
            CandidateStats(label=m.spec.label, task=m.task.name, file=rel, meta=m.meta, cached=m.cached)
        )
    return records


def measured_heads(measured: Sequence[Measured]) -> Dict[str, TaskHead]:
    heads = {}
    for m in measured:
        path = None if m.spec.lora else resolve_model_path(m.spec.model)
        head = checkpoint_head(path) if path and os.path.isfile(os.path.join(path, "config.json")) else None
        if head is not None:
            heads[m.task.name] = head
    return heads


def finish_streamed_plan(
    method: DataMethod, job: MergeJob, record: PlanRecord, heads: Dict[str, TaskHead]
) -> None:
    """Write the plan, merge every tensor now (streamed: one candidate tensor at a time, so
    `fwllm merge` can hand mergekit a base-only graph), then mark the plan complete."""
    write_record(job.plan_dir, record)
    if heads:
        save_heads(job.plan_dir, heads)
    plan = method.load_plan(job.plan_dir)
    candidates = {spec.label: open_candidate(spec.model, spec.lora) for spec in job.candidates}
    per_model = {spec.label: spec.params for spec in job.candidates}
    execute_streamed(
        job.plan_dir,
        resolve_model_path(job.base),
        candidates,
        lambda name, base, cands: method.merge_tensor(plan, name, base, cands, per_model),
        job.progress,
    )
    mark_plan_complete(job.plan_dir)


def stored_or_none(plan: Plan, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
    """The merged tensor the plan stores (the base for a tensor it has none of), or None when
    the plan stores no merge (the kernel then merges from the candidates it is given)."""
    if plan.merged is None:
        return None
    stored = read_merged(plan.merged, name)
    if stored is not None:
        return stored
    factors = merged_factors(plan.merged, name)
    if factors is None:
        return base
    delta = LowRank(*factors)
    if delta.shape != tuple(base.shape):
        raise FwllmError(
            f"{name}: the plan's low-rank merge is {list(delta.shape)}, the base tensor "
            f"{list(base.shape)}: the plan is from another model; solve again"
        )
    return base.float() + delta.dense()


def storable(merged: Iterable[Tuple[str, Union[torch.Tensor, LowRank]]]) -> Iterator[Tuple[str, object]]:
    """A merge as the plan's store takes it: a LowRank delta as its factors (A, scale * B)."""
    for name, value in merged:
        yield name, (value.a, value.b * value.scale) if isinstance(value, LowRank) else value


# -- a plain mergekit recipe that gives the same tensors ----------------------------------------
def reproducible(coefficients: Dict[str, List[float]], tensor_names: Sequence[str]) -> bool:
    """mergekit's `filter` is a first-hit substring match: does every tensor find its own entry?"""
    order = sorted(coefficients, key=len, reverse=True)
    for name in tensor_names:
        hit = next((f for f in order if f in name), None)
        if hit is not None and hit != name:
            LOG.warning("%s would take %s's coefficient in mergekit; no reproduce.yml", name, hit)
            return False
    return True


def reproduce_recipe(base: str, labels: List[str], coefficients: Dict[str, List[float]], dtype: str) -> str:
    """mergekit task_arithmetic recipe with one weight per tensor and candidate.

    mergekit matches `filter` as a substring and takes the first hit, so longer names come
    first: a name can only be a substring of a longer one."""
    order = sorted(coefficients, key=len, reverse=True)
    models = []
    for i, label in enumerate(labels):
        weight = [{"filter": n, "value": float(coefficients[n][i])} for n in order] + [{"value": 0.0}]
        models.append({"model": label, "parameters": {"weight": weight}})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": models,
        "parameters": {"normalize": False, "lambda": 1.0},
        "dtype": dtype,
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def reproduce_command(labels: Sequence[str]) -> str:
    """The plain mergekit command that runs reproduce.yml: mergekit merges each BASE+ADAPTER
    reference into a cache folder first, and refuses to start without one."""
    from mergekit.common import ModelReference

    lora = any(ModelReference.parse(label).lora for label in labels)
    return "mergekit-yaml reproduce.yml OUT_DIR" + (" --lora-merge-cache LORA_CACHE_DIR" if lora else "")


def reproduce_header(labels: Sequence[str]) -> str:
    command = reproduce_command(labels)
    lines = [
        "A plain mergekit recipe giving the same tensors as this plan's merge. From this folder, run:",
        "  " + command,
        "OUT_DIR: a new output folder.",
    ]
    if "--lora-merge-cache" in command:
        lines += [
            "LORA_CACHE_DIR: any folder; mergekit writes each adapter merged into the base there",
            "(it refuses BASE+ADAPTER references without one).",
        ]
    return "".join(f"# {line}\n" for line in lines)


def write_reproduce_recipe(
    plan_dir: str, base: str, labels: List[str], coefficients: Dict[str, List[float]], base_dir: str
) -> None:
    if reproducible(coefficients, TensorReader(base_dir).names()):
        with open(os.path.join(plan_dir, "reproduce.yml"), "w", encoding="utf-8") as fp:
            fp.write(reproduce_header(labels) + reproduce_recipe(base, labels, coefficients, "float32"))
