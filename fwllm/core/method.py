"""The contract between a data-informed merge method and mergekit.

mergekit merges one tensor at a time and never runs the model, so a data-informed
method is split in two:

* ``solve(job)`` runs the model on calibration data (FW loop, Fishers, Gram matrices,
  AdaMerging coefficients) and writes a *plan* folder: everything the merge needs per
  tensor, plus the trace a user inspects;
* ``merge_tensor(plan, name, base, candidates, per_model)`` is the per-tensor merge that
  mergekit's executor calls (through `fwllm.mergekit_glue.adapter`) for each output tensor.

A plan may also store the merged tensors (`fwllm.io.merged_store`): FW-Merging, Fisher and
RegMean do, so `fwllm merge` hands mergekit a base-only graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Type

from pydantic import ValidationError

from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.params import MethodParams
from fwllm.core.plan import Plan

if TYPE_CHECKING:  # annotations only: `fwllm merge` checks a recipe's parameters here before torch loads
    import torch


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def describe_error(error: dict) -> str:
    """A pydantic error as a range: 'must be >= 1', 'must be one of ...'."""
    ctx = error.get("ctx") or {}
    if error["type"] in _BOUNDS:
        return f"must be {_BOUNDS[error['type']]} {next(iter(ctx.values())):g}"
    if error["type"] == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return f"is invalid: {error['msg']}"


class DataMethod:
    """Base class: subclasses set the class attributes and implement solve/load_plan/merge_tensor."""

    name: str = ""
    pretty_name: str = ""
    reference_url: str = ""
    Params: Type[MethodParams] = MethodParams
    # per-model recipe parameters: name -> (type, default)
    per_model: Dict[str, tuple] = {"weight": (float, 1.0), "task": (str, "")}

    def validate_params(self, raw: Dict[str, Any]) -> MethodParams:
        """The recipe's parameters, checked against the schema: one clear error or the params."""
        try:
            params = self.Params(**raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "parameters"
            if first["type"] == "extra_forbidden":
                known = ", ".join(sorted(self.Params.model_fields))
                raise FwllmError(f"{self.name}: unknown parameter {where!r} (known: {known})") from None
            raise FwllmError(
                f"{self.name}: {where} {describe_error(first)} (got {first.get('input')!r})"
            ) from None
        if not params.calibration:
            raise FwllmError(
                f"{self.name} needs `parameters: {{calibration: PATH}}` (a .jsonl file or a folder of them)"
            )
        return params

    def solve(self, job: MergeJob) -> None:
        raise NotImplementedError

    def load_plan(self, plan_dir: str) -> Plan:
        raise NotImplementedError

    def bind(self, plan: Plan, job: MergeJob) -> Plan:
        """The plan as this job executes it. A plan may name input folders (a LoRA pool's adapters):
        they must be the job's, not the folders the plan was solved from (a copied or reused plan
        would read those), so a method whose plan names inputs maps them to the job's here."""
        return plan

    def needs_candidates(self, plan: Plan) -> bool:
        """Whether executing the plan needs mergekit to hand over the candidates' tensors
        (False: a base-only graph will do, the plan holds or forms every merged tensor)."""
        return plan.merged is None

    def merged_recomputable(self, plan: Plan) -> bool:
        """Whether `merge_tensor` forms the same tensors from the plan and the candidates when the
        plan's stored merged tensors are deleted (False: they are the only record of the merge)."""
        return True

    def merge_tensor(
        self,
        plan: Plan,
        name: str,
        base: torch.Tensor,
        candidates: Dict[str, torch.Tensor],
        per_model: Dict[str, Dict[str, Any]],
    ) -> torch.Tensor:
        """Merge one output tensor; `candidates` maps CandidateSpec.label -> tensor."""
        raise NotImplementedError
