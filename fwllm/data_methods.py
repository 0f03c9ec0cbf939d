"""The contract between a data-informed merge method and mergekit.

mergekit merges one tensor at a time and never runs the model, so a data-informed
method is split in two:

* ``solve(job)``  runs the model on calibration data (FW loop, Fishers, Gram matrices,
  AdaMerging coefficients) and writes a *plan* folder: everything the merge needs per
  tensor, plus the trace a user inspects.
* ``merge_tensor(plan, name, base, candidates, ...)`` is the pure per-tensor merge that
  mergekit's executor calls (through `fwllm.plugin`) for each output tensor.

`fwllm merge` solves first and points the method at the plan (hidden `plan` parameter);
under plain `mergekit-yaml` the first tensor triggers the solve into a cache folder.
A plan may also store the merged tensors (`fwllm.merged_store`): FW-Merging, Fisher and
RegMean do, so `fwllm merge` hands mergekit a base-only graph and no candidate shard is
mapped by mergekit's loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fwllm.errors import FwllmError


class MethodParams(BaseModel):
    """Scalar recipe parameters shared by every data-informed method; misspelt keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: Optional[str] = None  # .jsonl file or folder of .jsonl files (one per task)
    max_rows: Optional[int] = None  # per task; None = all rows
    max_length: int = 256  # tokens per calibration row
    batch_size: int = 8
    seed: int = 0
    device: Optional[str] = None  # solve device; default: mergekit's --device / cpu
    plan: Optional[str] = None  # reuse (or write) the plan in this folder


@dataclass(frozen=True)
class CandidateSpec:
    """One non-base model of the recipe, as mergekit names it."""

    label: str  # str(ModelReference), e.g. "path" or "base+adapter"
    model: str
    lora: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)  # per-model recipe parameters


@dataclass
class MergeJob:
    method: str
    base: str  # the base model as written in the recipe
    candidates: List[CandidateSpec]
    params: MethodParams
    plan_dir: str
    device: str = "cpu"
    progress: bool = True

    def fingerprint(self) -> str:
        """Stable id of what determines the plan (for the lazy-solve cache)."""
        payload = {
            "method": self.method,
            "base": self.base,
            "candidates": [(c.label, sorted(c.params.items())) for c in self.candidates],
            "params": self.params.model_dump(exclude={"plan", "device"}),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DataMethod:
    """Base class: subclasses set the class attributes and implement solve/merge_tensor."""

    name: str = ""
    pretty_name: str = ""
    reference_url: str = ""
    Params: Type[MethodParams] = MethodParams
    # per-model recipe parameters: name -> (type, default)
    per_model: Dict[str, tuple] = {"weight": (float, 1.0), "task": (str, "")}

    def validate_params(self, raw: Dict[str, Any]) -> MethodParams:
        try:
            return self.Params(**raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "parameters"
            if first["type"] == "extra_forbidden":
                known = ", ".join(sorted(self.Params.model_fields))
                raise FwllmError(f"{self.name}: unknown parameter {where!r} (known: {known})") from None
            raise FwllmError(f"{self.name}: parameter {where}: {first['msg']}") from None

    def solve(self, job: MergeJob) -> None:
        raise NotImplementedError

    def load_plan(self, plan_dir: str) -> Any:
        """Read the plan once per process (the plugin caches the result)."""
        raise NotImplementedError

    def merge_tensor(
        self,
        plan: Any,
        name: str,
        base: torch.Tensor,
        candidates: Dict[str, torch.Tensor],
        per_model: Dict[str, Dict[str, Any]],
    ) -> torch.Tensor:
        """Merge one output tensor; `candidates` maps CandidateSpec.label -> tensor."""
        raise NotImplementedError


PLAN_DONE = "DONE"  # marker written last: a plan folder without it is unfinished


def plan_is_complete(plan_dir: str) -> bool:
    return os.path.isfile(os.path.join(plan_dir, PLAN_DONE))


def mark_plan_complete(plan_dir: str) -> None:
    with open(os.path.join(plan_dir, PLAN_DONE), "w", encoding="utf-8") as fp:
        fp.write("ok\n")


_METHODS: Dict[str, DataMethod] = {}


def register_data_method(method: DataMethod) -> DataMethod:
    _METHODS[method.name] = method
    return method


def data_methods() -> Dict[str, DataMethod]:
    """All fwllm methods by name (imports their modules on first use).

    Always imports the built-in set: importing one method's module first (fwllm.regmean,
    say) registers that method alone, and must not hide the others."""
    from fwllm import methods  # noqa: F401  (registers the built-in methods; cached after the first import)

    return dict(_METHODS)
