"""Registering fwllm's methods with mergekit (idempotent, public API only).

Each `DataMethod` becomes a mergekit `GroupMergeMethod`. Its kernel finds the method's
plan: the folder named by the hidden `plan` parameter (set by `fwllm merge`), else a
cache folder keyed by the job's fingerprint, solving there on first use; that is what
lets plain `mergekit-yaml` run fwllm recipes once the startup hook has registered them.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, Optional

import torch
from mergekit.merge_methods import base as mk
from mergekit.merge_methods import registry

from fwllm.paths import cache_root
from fwllm.data_methods import (
    CandidateSpec,
    DataMethod,
    MergeJob,
    data_methods,
    plan_is_complete,
)

LOG = logging.getLogger(__name__)
_LOCK = threading.RLock()
_PLANS: Dict[str, Any] = {}  # plan folder -> loaded plan


def default_plan_root() -> str:
    return os.path.join(cache_root(), "plans")


def _candidate_spec(ref, per_model: Dict[str, Any]) -> CandidateSpec:
    return CandidateSpec(
        label=str(ref),
        model=ref.model.path,
        lora=ref.lora.path if ref.lora else None,
        params=per_model,
    )


class MergekitAdapter(mk.GroupMergeMethod):
    """A fwllm DataMethod seen through mergekit's GroupMergeMethod interface."""

    def __init__(self, method: DataMethod):
        self.method = method
        shared = [
            mk.ParameterSpec(name, field.annotation, mk.ParameterScope.SHARED, default=field.default)
            for name, field in method.Params.model_fields.items()
        ]
        per_model = [
            mk.ParameterSpec(name, typ, mk.ParameterScope.NON_BASE, default=default)
            for name, (typ, default) in method.per_model.items()
        ]
        self.spec = mk.MergeMethodSpec(
            name=method.name,
            pretty_name=method.pretty_name,
            reference_url=method.reference_url,
            parameters=tuple(shared + per_model),
            contract=mk.InputContract(base=mk.BasePolicy.REQUIRED, min_non_base=0),
            optional_tensor_policy=mk.OptionalTensorPolicy.PASSTHROUGH_BASE_SINGLETON,
        )

    def _job(self, group: mk.TensorGroup, parameters: Dict[str, Any]) -> MergeJob:
        shared = {n: parameters[n] for n in self.method.Params.model_fields}
        params = self.method.validate_params(shared)
        candidates = [
            _candidate_spec(e.id, {n: parameters[n][e.id] for n in self.method.per_model})
            for e in group.non_base
        ]
        job = MergeJob(self.method.name, str(group.base.id), candidates, params, plan_dir="")
        job.plan_dir = params.plan or os.path.join(default_plan_root(), f"{self.method.name}-{job.fingerprint()}")
        job.device = params.device or "cpu"
        return job

    def _plan_for(self, group: mk.TensorGroup, parameters: Dict[str, Any]) -> Any:
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


def register_all() -> None:
    """Register every fwllm method with mergekit once; later calls do nothing."""
    with _LOCK:
        known = {m.spec.name for m in registry.registered_methods()}
        for name, method in data_methods().items():
            if name not in known:
                registry.register(MergekitAdapter(method))


def available_methods() -> list:
    register_all()
    return sorted(m.spec.name for m in registry.registered_methods())


def install_plan(plan_dir: str, plan: Optional[Any]) -> None:
    with _LOCK:
        _PLANS[plan_dir] = plan
