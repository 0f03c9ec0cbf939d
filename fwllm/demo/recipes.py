"""mergekit recipes that merge an expert pool, one per method: what `fwllm demo` and the
benchmark harness (eval/fwbench) write and run through `fwllm merge`, and the pool's
calibration folders they read.

A *recipe method* is a name in `RECIPE_METHODS`; most are a mergekit or fwllm
`merge_method`, and fw_hard / fw_soft are `fw_merging` with `variant: hard|soft`.

`Member` carries what a method may need of a candidate: its folder and the calibration
task it was trained on. Fisher and RegMean measure every candidate on its own data, so a
candidate without a task (an irrelevant expert) is measured on `fallback_task`, the
union of the user's calibration tasks.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence


FALLBACK_TASK = "pool_mix"  # Fisher/RegMean data for experts without a task of their own


@dataclass(frozen=True)
class Member:
    path: str
    task: Optional[str] = None  # calibration task (file stem) the expert was trained on


@dataclass
class PoolSettings:
    scaling: float = 0.3  # lambda of task arithmetic / TIES / DARE
    density: float = 0.2  # TIES kept fraction; DARE keeps `dare_density`
    dare_density: float = 0.5
    iterations: int = 8  # FW
    step_size: float = 0.3  # FW
    fw_scaling: float = 1.0  # FW vertices theta_0 + fw_scaling * tau_i (1 = the experts themselves)
    fw_init: str = "base"
    max_rows: int = 6  # calibration rows per task (data-informed methods)
    max_length: int = 96
    batch_size: int = 3
    adamerging_steps: int = 4
    fisher: str = "empirical"  # exact costs positions x top_k backward passes per row
    dtype: str = "bfloat16"
    seed: int = 0
    extra: Dict[str, dict] = field(default_factory=dict)  # per recipe method: parameter overrides


def _data_params(s: PoolSettings, calibration: str) -> dict:
    return {
        "calibration": calibration,
        "max_rows": s.max_rows,
        "max_length": s.max_length,
        "batch_size": s.batch_size,
        "seed": s.seed,
    }


def _fw(s: PoolSettings, calibration: str, variant: str) -> dict:
    return {
        **_data_params(s, calibration),
        "variant": variant,
        "scaling": s.fw_scaling,
        "init": s.fw_init,
        "iterations": s.iterations,
        "step_size": s.step_size,
    }


def recipe_for(
    method: str,
    base: str,
    members: Sequence[Member],
    calibration: str,
    s: PoolSettings,
    fallback_task: str = "",
) -> dict:
    """The mergekit-yaml recipe (as a dict) that merges `members` onto `base` with `method`."""
    if method not in RECIPE_METHODS:
        raise ValueError(f"unknown recipe method {method!r}; choose from {sorted(RECIPE_METHODS)}")
    models: List[dict]
    if method == "average":
        merge_method, params = "linear", {"normalize": True}
        models = [{"model": m.path, "parameters": {"weight": 1.0}} for m in members]
    elif method in ("task_arithmetic", "ties", "dare_ties"):
        merge_method, params = method, {"lambda": s.scaling}
        per = {"weight": 1.0}
        if method == "ties":
            per["density"] = s.density
        elif method == "dare_ties":
            per["density"] = s.dare_density
        models = [{"model": m.path, "parameters": dict(per)} for m in members]
    elif method in ("fisher", "regmean"):
        merge_method = method
        params = _data_params(s, calibration)
        if method == "fisher":
            params["fisher"] = s.fisher
        models = [{"model": m.path, "parameters": {"task": m.task or fallback_task}} for m in members]
    elif method == "adamerging":
        merge_method, params = method, {**_data_params(s, calibration), "steps": s.adamerging_steps}
        models = [{"model": m.path} for m in members]
    else:  # fw_hard | fw_soft
        merge_method, params = "fw_merging", _fw(s, calibration, method.split("_", 1)[1])
        models = [{"model": m.path, "parameters": {"task": m.task or ""}} for m in members]
    params.update(s.extra.get(method, {}))
    recipe = {
        "merge_method": merge_method,
        "base_model": base,
        "models": models,
        "parameters": params,
        "dtype": s.dtype,
    }
    if method == "average":
        del recipe["base_model"]  # mergekit's linear would weigh the base in as one more model
    return recipe


# recipe method -> does it read calibration data?
RECIPE_METHODS = {
    "average": False,
    "task_arithmetic": False,
    "ties": False,
    "dare_ties": False,
    "fisher": True,
    "regmean": True,
    "adamerging": True,
    "fw_hard": True,
    "fw_soft": True,
}


def ordered_members(pool) -> List[Member]:
    relevant = [e for e in pool.experts if e.relevant]
    others = [e for e in pool.experts if not e.relevant]
    return [Member(e.path, e.task if e.relevant else None) for e in relevant + others]


def write_pool_calibration(pool, tasks: Sequence[str], folder: str, with_mix: bool) -> str:
    """One .jsonl per task (a file stem names a task); `with_mix` adds FALLBACK_TASK, the
    tasks' rows interleaved, for candidates that have no calibration task of their own."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for task in tasks:
        src = pool.tasks[task].calibration
        shutil.copyfile(src, os.path.join(folder, f"{task}.jsonl"))
        with open(src, encoding="utf-8") as fp:
            rows.append([line for line in fp if line.strip()])
    if with_mix:
        mixed = [r for group in zip(*rows) for r in group]
        with open(os.path.join(folder, f"{FALLBACK_TASK}.jsonl"), "w", encoding="utf-8") as fp:
            fp.writelines(mixed)
    return folder
