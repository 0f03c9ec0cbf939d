"""fwllm's methods as mergekit merge methods (idempotent registration, public API only).

Each `DataMethod` becomes a mergekit `GroupMergeMethod`. Its parameters carry their schema
ranges (`fwllm.core.params`), so mergekit's planner rejects `iterations: 0` before any
tensor is read. The kernel finds the method's plan: the folder named by the hidden `plan`
parameter (set by `fwllm merge`), else a cache folder keyed by the job's fingerprint,
solving there on first use; that is what lets plain `mergekit-yaml` run fwllm recipes
once the startup hook has registered them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Annotated, Any, Dict

import torch
from mergekit.merge_methods import base as mk
from mergekit.merge_methods import registry

from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.paths import cache_root
from fwllm.core.plan import Plan, plan_is_complete
from fwllm.methods.registry import METHODS

LOG = logging.getLogger(__name__)
_LOCK = threading.RLock()
_PLANS: Dict[str, Plan] = {}  # plan folder -> loaded plan


def default_plan_root() -> str:
    return os.path.join(cache_root(), "plans")


def _constrained(field) -> Any:
    """The field's type with its schema constraints (ge, le, ...), for mergekit's validator."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


class MergekitAdapter(mk.GroupMergeMethod):
    """A fwllm DataMethod seen through mergekit's GroupMergeMethod interface."""

    def __init__(self, method: DataMethod):
        self.method = method
        shared = [mk.ParameterSpec(name, _constrained(field), mk.ParameterScope.SHARED, default=field.default)
                  for name, field in method.Params.model_fields.items()]
        per_model = [mk.ParameterSpec(name, typ, mk.ParameterScope.NON_BASE, default=default)
                     for name, (typ, default) in method.per_model.items()]
        self.spec = mk.MergeMethodSpec(
            name=method.name,
            pretty_name=method.pretty_name,
            reference_url=method.reference_url,
            parameters=tuple(shared + per_model),
            contract=mk.InputContract(base=mk.BasePolicy.REQUIRED, min_non_base=0),
            optional_tensor_policy=mk.OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        )

    def _job(self, group: mk.TensorGroup, parameters: Dict[str, Any]) -> MergeJob:
        params = self.method.validate_params({n: parameters[n] for n in self.method.Params.model_fields})
        candidates = [
            CandidateSpec(str(e.id), e.id.model.path, e.id.lora.path if e.id.lora else None,
                          {n: parameters[n][e.id] for n in self.method.per_model})
            for e in group.non_base
        ]
        job = MergeJob(self.method.name, str(group.base.id), candidates, params, plan_dir="")
        job.plan_dir = params.plan or os.path.join(default_plan_root(), f"{self.method.name}-{job.fingerprint()}")
        job.device = params.device or "cpu"
        return job

    def _plan_for(self, group: mk.TensorGroup, parameters: Dict[str, Any]) -> Plan:
        plan_dir = parameters.get("plan")
        with _LOCK:
            if plan_dir and plan_dir in _PLANS:
                return _PLANS[plan_dir]
            job = self._job(group, parameters)
            if job.plan_dir in _PLANS:
                return _PLANS[job.plan_dir]
            if not plan_is_complete(job.plan_dir):
                LOG.warning("fwllm: no plan yet for %s; solving into %s", self.method.name, job.plan_dir)
                self.method.solve(job)
            _PLANS[job.plan_dir] = self.method.load_plan(job.plan_dir)
            return _PLANS[job.plan_dir]

    def merge_group(self, group: mk.TensorGroup, /, **parameters: Any) -> torch.Tensor:
        plan = self._plan_for(group, parameters)
        candidates = {str(e.id): e.tensor for e in group.non_base}
        per_model = {str(e.id): {n: parameters[n][e.id] for n in self.method.per_model} for e in group.non_base}
        out = self.method.merge_tensor(plan, group.metadata.name, group.base.tensor, candidates, per_model)
        return out.to(group.base.tensor.dtype)


def forget_plans() -> None:
    """Drop loaded plans (tests and repeated in-process merges)."""
    with _LOCK:
        _PLANS.clear()


def install_plan(plan_dir: str, plan: Plan) -> None:
    with _LOCK:
        _PLANS[plan_dir] = plan


def register_all() -> None:
    """Register every fwllm method with mergekit once; later calls do nothing."""
    with _LOCK:
        known = {m.spec.name for m in registry.registered_methods()}
        for method in METHODS:
            if method.name not in known:
                registry.register(MergekitAdapter(method))


def available_methods() -> list:
    register_all()
    return sorted(m.spec.name for m in registry.registered_methods())
