"""fwllm's methods as mergekit merge methods (idempotent registration, public API only).

Each `DataMethod` becomes a mergekit `GroupMergeMethod`. Its parameters carry their schema
ranges (`fwllm.core.params`), so mergekit's planner rejects `iterations: 0` before any
tensor is read. The kernel finds the method's plan: the folder named by the `plan`
parameter (set by `fwllm merge`, or by the user), else a cache folder keyed by the recipe
and by the content of every file it names (`fwllm.mergekit_glue.inputs`), solving there on
first use; that is what lets plain `mergekit-yaml` run fwllm recipes once the startup hook
has registered them.

A cached plan is reused only when its recorded inputs match (a user's `plan:` folder that
does not match is one clear error); `no_cache: true` solves again. Runs that want the same
plan folder take its lock, so two concurrent `mergekit-yaml` runs of one recipe solve once.
Within one mergekit run a recipe keeps the plan it started with (`start_run`, called by the
startup hook at each `run_merge`), so an edit during a run cannot mix two plans.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Annotated, Any, Dict

import torch
from pydantic import PlainValidator, TypeAdapter, ValidationError
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import base as mk
from mergekit.merge_methods import registry

from fwllm.core.errors import FwllmError
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.memory import return_free_memory
from fwllm.core.method import DataMethod, describe_error
from fwllm.core.paths import cache_root
from fwllm.core.plan import Plan, plan_is_complete
from fwllm.io.cache_bound import bound_plan_cache
from fwllm.io.staged_output import (
    PLAN_WAIT,
    check_plan_folder,
    folder_lock,
    is_plan_folder,
    lock_timeout,
    staged_output,
)
from fwllm.mergekit_glue.inputs import (
    changes,
    check_plan_inputs,
    content_key,
    job_inputs,
    read_inputs,
    solve_recorded,
)
from fwllm.mergekit_glue.preflight import check_job
from fwllm.methods.registry import METHODS

LOG = logging.getLogger(__name__)
_LOCK = threading.RLock()
_PLANS: Dict[str, Plan] = {}  # plan folder -> plan installed by `fwllm merge` for its run
_RUN: Dict[str, Plan] = {}  # (plan parameter, recipe fingerprint) -> the plan this mergekit run uses


def default_plan_root() -> str:
    return os.path.join(cache_root(), "plans")


def _constrained(method: str, name: str, field) -> Any:
    """The field's type with its schema range, for mergekit's validator: out of range is one
    clear message that names the parameter ("fw_merging: iterations must be >= 1 (got 0)")."""
    if not field.metadata:
        return field.annotation
    checked = TypeAdapter(Annotated[(field.annotation, *field.metadata)])

    def validate(value):
        try:
            return checked.validate_python(value)
        except ValidationError as err:
            raise ValueError(f"{method}: {name} {describe_error(err.errors()[0])} (got {value!r})") from None

    return Annotated[field.annotation, PlainValidator(validate)]


class MergekitAdapter(mk.GroupMergeMethod):
    """A fwllm DataMethod seen through mergekit's GroupMergeMethod interface."""

    def __init__(self, method: DataMethod):
        self.method = method
        shared = [
            mk.ParameterSpec(
                name, _constrained(method.name, name, field), mk.ParameterScope.SHARED, default=field.default
            )
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
        params = self.method.validate_params({n: parameters[n] for n in self.method.Params.model_fields})
        candidates = [
            CandidateSpec(
                str(e.id),
                e.id.model.path,
                e.id.lora.path if e.id.lora else None,
                {n: parameters[n][e.id] for n in self.method.per_model},
            )
            for e in group.non_base
        ]
        job = MergeJob(self.method.name, str(group.base.id), candidates, params, plan_dir="")
        job.device = params.device or "cpu"
        job.no_cache = params.no_cache
        return job

    def _plan_for(self, group: mk.TensorGroup, parameters: Dict[str, Any]) -> Plan:
        plan_dir = parameters.get("plan")
        with _LOCK:
            if plan_dir and plan_dir in _PLANS:
                return _PLANS[plan_dir]
            job = self._job(group, parameters)
            run_key = f"{plan_dir}|{job.fingerprint()}"
            if run_key not in _RUN:
                _RUN[run_key] = self._resolve(job)
            return _RUN[run_key]

    def _resolve(self, job: MergeJob) -> Plan:
        """The plan for `job`: the cached one if it was made from these very inputs, else a fresh solve."""
        if job.params.lora_out:  # plain mergekit-yaml would drop it silently
            raise FwllmError(
                f"lora_out: {job.params.lora_out} is written by `fwllm merge RECIPE OUT_DIR` (plain "
                f"mergekit-yaml has no step after its merge); run fwllm merge, or drop lora_out"
            )
        plan = self._cached_or_solved(job)
        if not job.params.plan:
            bound_plan_cache(plan.folder)  # the plain-mergekit plan cache stays under its size cap
        return self.method.bind(plan, job)

    def _cached_or_solved(self, job: MergeJob) -> Plan:
        check_job(job)
        inputs = job_inputs(job)
        user_plan = job.params.plan
        if user_plan:
            check_plan_folder(user_plan)  # a folder of the user's is never replaced by a plan
        key = job.fingerprint(content_key(inputs))
        target = user_plan or os.path.join(default_plan_root(), f"{self.method.name}-{key}")
        with folder_lock(target, "plan folder", lock_timeout(PLAN_WAIT)):
            if plan_is_complete(target) and not job.no_cache:
                if user_plan:
                    check_plan_inputs(target, inputs)
                    return self.method.load_plan(target)
                recorded = read_inputs(target)
                if recorded is not None and not changes(recorded, inputs):
                    return self.method.load_plan(target)
                LOG.warning("fwllm: the cached plan %s does not record these inputs; solving again", target)
            LOG.warning("fwllm: no plan yet for %s; solving into %s", self.method.name, target)
            with staged_output(
                target, force=True, lock=False, what="plan folder", replaceable=is_plan_folder
            ) as staging:
                job.plan_dir = staging
                solve_recorded(self.method, job, inputs)
            job.plan_dir = target
            return self.method.load_plan(target)

    def merge_group(self, group: mk.TensorGroup, /, **parameters: Any) -> torch.Tensor:
        plan = self._plan_for(group, parameters)
        candidates = {str(e.id): e.tensor for e in group.non_base}
        per_model = {
            str(e.id): {n: parameters[n][e.id] for n in self.method.per_model} for e in group.non_base
        }
        out = self.method.merge_tensor(plan, group.metadata.name, group.base.tensor, candidates, per_model)
        merged = out.to(group.base.tensor.dtype)
        del out
        # mergekit's loaders keep the current shard of every input mapped, and each page read stays resident
        # until the shard is closed (at 7B up to a whole base shard); reopening costs a header read
        LoaderCache().flush_all()
        return_free_memory()  # the float32 work tensors, between the output tensors mergekit buffers
        return merged


def forget_plans() -> None:
    """Drop loaded plans (tests and repeated in-process merges)."""
    with _LOCK:
        _PLANS.clear()
        _RUN.clear()


def start_run() -> None:
    """A new mergekit run: each recipe finds its plan afresh (its inputs may have changed since),
    and mergekit's own process-wide tensor loaders, which it keys by model reference rather
    than content and keeps across runs, are dropped (an in-process rerun after an expert or
    adapter was replaced in place would read the old files, or the old merged LoRA copy)."""
    from mergekit.io.tasks import LoaderCache

    with _LOCK:
        _RUN.clear()
        cache = LoaderCache()
        cache.flush_all()
        cache.loaders.clear()


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


def is_fwllm_method(name) -> bool:
    return any(method.name == name for method in METHODS)


def available_methods() -> list:
    register_all()
    return sorted(m.spec.name for m in registry.registered_methods())
