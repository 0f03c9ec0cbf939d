"""Typed plans: what a solve writes to `<plan>/plan.json`, and how it is read back.

A plan is the "why" of a merge and everything mergekit's executor needs per tensor.
Each method has its record type; `read_record` refuses a folder that holds no plan, an
unfinished one, another method's plan, a plan folder that is not trusted, and a plan that
names a file outside its folder (`fwllm.core.trust`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Generic, List, Optional, Type, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fwllm.core.errors import FwllmError
from fwllm.core.params import MethodParams
from fwllm.core.trust import check_trusted, inside

PLAN_FILE = "plan.json"
PLAN_DONE = "DONE"  # written last: a plan folder without it is unfinished


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Atom(_Record):
    """A vertex of an FW iterate and its weight: theta += weight * scale * combine(method, members, mix).

    `tag` names the step that first made it. `scale` is the hull's lambda when the atom was
    made (None: the recipe's `scaling`); an adaptive hull grows it during the solve."""

    weight: float
    method: str
    members: List[int]
    mix: List[float]
    tag: str
    scale: Optional[float] = None


class PlanRecord(_Record):
    method: str
    base: str
    settings: Dict[str, Any]
    primary_head: Optional[str] = None  # the candidate whose head the loadable checkpoint carries


class FWPlanRecord(PlanRecord):
    candidates: List[str]
    weights: List[float]  # per-model `weight`: candidate i's vertex is theta_0 + lambda * localize(w_i tau_i)
    adapters: Optional[List[str]] = (
        None  # a LoRA pool's adapter folders: tensors are formed from their factors
    )
    atoms: Dict[str, List[Atom]]
    coefficients: Optional[Dict[str, List[float]]] = None  # per tensor and candidate, when all steps are TA
    objective: Dict[str, float]  # initial, final
    stochastic: bool = False
    selected_iteration: int = 0
    candidate_bytes_read: int = 0
    lmo_rescored_tensors: int = 0
    solve_seconds: float = 0.0
    gradient: Dict[str, Any] = {}


class CandidateStats(_Record):
    label: str
    task: str
    file: str  # relative to the plan folder
    meta: Dict[str, Any]  # what the method reports per candidate (Fisher mean, token count, ...)
    cached: bool


class StatsPlanRecord(PlanRecord):
    candidates: List[CandidateStats]
    timings: Dict[str, float] = {}  # where the solve's seconds went (benchmarks read it)

    @property
    def labels(self) -> List[str]:
        return [c.label for c in self.candidates]


class AdaMergingPlanRecord(PlanRecord):
    candidates: List[str]
    coefficients: Dict[str, List[float]]  # per tensor, one lambda per candidate
    entropy: Dict[str, float]  # initial, final
    solve_seconds: float = 0.0


R = TypeVar("R", bound=PlanRecord)


@dataclass(frozen=True)
class Plan(Generic[R]):
    """A plan as a method's kernel uses it."""

    folder: str
    record: R
    params: MethodParams
    merged: Optional[Dict[str, str]] = None  # {tensor: shard} of stored merged tensors, or None


def plan_is_complete(plan_dir: str) -> bool:
    return os.path.isfile(os.path.join(plan_dir, PLAN_DONE))


def mark_plan_complete(plan_dir: str) -> None:
    with open(os.path.join(plan_dir, PLAN_DONE), "w", encoding="utf-8") as fp:
        fp.write("ok\n")


def write_record(plan_dir: str, record: PlanRecord) -> None:
    os.makedirs(plan_dir, exist_ok=True)
    with open(os.path.join(plan_dir, PLAN_FILE), "w", encoding="utf-8") as fp:
        fp.write(record.model_dump_json(indent=1))


def read_record(plan_dir: str, method: str, record_type: Type[R]) -> R:
    path = os.path.join(plan_dir, PLAN_FILE)
    if not os.path.isfile(path):
        raise FwllmError(f"{plan_dir} is not a {method} plan (no {PLAN_FILE})")
    check_trusted("plan folder", plan_dir)
    with open(path, encoding="utf-8") as fp:
        try:
            raw = json.load(fp)
        except ValueError:
            raise FwllmError(f"{path} is not valid JSON: the plan is damaged; solve again") from None
    if not isinstance(raw, dict) or raw.get("method") != method:
        found = raw.get("method") if isinstance(raw, dict) else None
        raise FwllmError(f"{plan_dir} holds a {found} plan, not a {method} plan")
    try:
        record = record_type.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FwllmError(
            f"{path}: {where}: {first['msg']} (a plan from another fwllm version? solve again)"
        ) from None
    for c in getattr(record, "candidates", []):
        if isinstance(c, CandidateStats):
            inside(plan_dir, c.file, f"{path} (candidate {c.label})")
    return record
