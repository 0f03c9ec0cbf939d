"""`merge_method: fw_merging` — FW-Merging (arXiv 2503.12649) as a data-informed method.

solve:  load the base as the differentiable iterate, stream the candidates once
        (sketches + initial point), run `FrankWolfe`, write the plan folder:
          plan.json       settings, candidates, per-tensor atoms (the exact merge)
          trace.json      objective, gamma and chosen vertex per block, per iteration
          trace.png       the objective curve, and the share of blocks choosing each vertex
          reproduce.yml   a plain mergekit `task_arithmetic` recipe with per-tensor
                          weights (written when every step is task arithmetic)
          fwllm_heads/    per-task classification heads (encoder pools)
merge:  for each tensor mergekit hands over, base + sum_a beta_a * atom_a(taus).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Dict, List, Literal

import torch
import yaml

from fwllm.calibration import load_calibration
from fwllm.data_methods import DataMethod, MergeJob, MethodParams, mark_plan_complete, register_data_method
from fwllm.encoder_pool import classifier_arch
from fwllm.errors import FwllmError
from fwllm.frank_wolfe import Atom, FrankWolfe, FWSettings, block_delta, ta_coefficients
from fwllm.gradients import LayerOffload, LayerwiseGradient
from fwllm.heads import TaskHead, is_head_tensor, save_heads
from fwllm.merged_store import merged_index, read_merged, write_merged
from fwllm.model_io import (
    check_same_architecture, load_model, load_tokenizer, open_candidate, read_config, resolve_model_path,
)
from fwllm.objectives import CLASSIFIER_MODEL, architecture_kind, check_rows_fit, encode_tasks, head_attribute, model_kind
from fwllm.trace_plot import plot_trace

LOG = logging.getLogger(__name__)


class FWParams(MethodParams):
    iterations: int = 10
    step_size: float = 0.1
    granularity: Literal["layer", "model"] = "layer"
    variant: Literal["hard", "soft"] = "hard"
    top_k: int = 2
    soft_steps: int = 2
    local_merge: Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"] = "task_arithmetic"
    scaling: float = 0.3
    density: float = 0.2
    drop_rate: float = 0.5
    init: Literal["task_arithmetic", "base"] = "task_arithmetic"
    sketch_ratio: float = 32.0
    rescore: float = 0.0
    gradient: Literal["full", "layerwise"] = "full"
    batches_per_iteration: int = 0

    def settings(self) -> FWSettings:
        fields = FWSettings.__dataclass_fields__
        return FWSettings(**{k: v for k, v in self.model_dump().items() if k in fields})


def _check_settings(p: FWParams) -> None:
    if p.iterations < 1:
        raise FwllmError("fw_merging: iterations must be >= 1")
    if not 0 < p.step_size <= 1:
        raise FwllmError("fw_merging: step_size must be in (0, 1]")
    if p.top_k < 1:
        raise FwllmError("fw_merging: top_k must be >= 1")
    if not 0 < p.density <= 1 or not 0 <= p.drop_rate < 1:
        raise FwllmError("fw_merging: density must be in (0, 1] and drop_rate in [0, 1)")
    if p.sketch_ratio < 1:
        raise FwllmError("fw_merging: sketch_ratio must be >= 1 (1 = exact inner products)")
    if p.rescore < 0:
        raise FwllmError("fw_merging: rescore must be >= 0 (sketch errors; 0 = off)")
    if p.batches_per_iteration < 0:
        raise FwllmError("fw_merging: batches_per_iteration must be >= 0 (micro-batches per task; 0 = all)")


def _task_heads(model, candidates, specs, tasks) -> Dict[str, TaskHead]:
    """Each calibration task's head, taken from the candidate whose `task` names it."""
    owners = {spec.params.get("task"): cand for spec, cand in zip(specs, candidates) if spec.params.get("task")}
    heads = {}
    for task in tasks:
        cand = owners.get(task.name)
        if cand is None or cand.reader is None:
            raise FwllmError(
                f"calibration task {task.name!r} needs a classification head: give the candidate trained on it "
                f"`parameters: {{task: {task.name}}}` (a full checkpoint, not an adapter)"
            )
        tensors = {n: cand.reader.get(n) for n in cand.reader.names() if is_head_tensor(n)}
        out = next((t for n, t in tensors.items() if n.endswith("out_proj.weight") or n == "score.weight"), None)
        heads[task.name] = TaskHead(tensors, int(out.shape[0]) if out is not None else model.config.num_labels)
    return heads


def _head_module(model, head: TaskHead) -> torch.nn.Module:
    attr = head_attribute(model)
    if head.num_labels == model.config.num_labels:
        module = copy.deepcopy(getattr(model, attr))
    else:
        cfg = copy.deepcopy(model.config)
        cfg.num_labels = head.num_labels
        module = getattr(type(model)(cfg), attr)
    prefix = attr + "."
    module.load_state_dict({k[len(prefix):]: v for k, v in head.tensors.items()})
    module.requires_grad_(False)
    return module.to(next(model.parameters()).device)


def _reproduce_recipe(base: str, labels: List[str], coefficients: Dict[str, List[float]], dtype: str) -> str:
    """mergekit task_arithmetic recipe with one weight per tensor and candidate.

    mergekit matches `filter` as a substring and takes the first hit, so longer names
    come first: a name can only be a substring of a longer one.
    """
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


class FWMerging(DataMethod):
    name = "fw_merging"
    pretty_name = "FW-Merging (Frank-Wolfe)"
    reference_url = "https://arxiv.org/abs/2503.12649"
    Params = FWParams

    def solve(self, job: MergeJob) -> None:
        p: FWParams = job.params  # type: ignore[assignment]
        _check_settings(p)
        if not p.calibration:
            raise FwllmError("fw_merging needs `parameters: {calibration: PATH}` (a .jsonl file or a folder of them)")
        if not job.candidates:
            raise FwllmError("fw_merging: the candidate pool is empty")
        torch.manual_seed(p.seed)
        base_dir = resolve_model_path(job.base)
        candidates = [open_candidate(c.model, c.lora) for c in job.candidates]
        check_same_architecture(base_dir, [c.model_dir for c in candidates if c.model_dir])
        tasks = load_calibration(p.calibration, p.max_rows)
        # Encoder pools: differentiate the experts' classifier class, body initialised from the base.
        arch = classifier_arch([c.model_dir for c in candidates if c.model_dir])
        kind = architecture_kind(arch or (read_config(base_dir).get("architectures") or ["?"])[0])
        for task in tasks:  # before any weights are loaded
            check_rows_fit(task, kind)
        # layerwise: the weights load on the host; only the non-layer modules move to the device
        layerwise = p.gradient == "layerwise"
        model = load_model(base_dir, torch.float32, "cpu" if layerwise else job.device, architecture=arch)
        offload = LayerOffload(model, job.device) if layerwise else None
        tokenizer = load_tokenizer(base_dir)
        heads = {}
        if model_kind(model) == CLASSIFIER_MODEL:
            heads = _task_heads(model, candidates, job.candidates, tasks)
        objective = encode_tasks(tasks, tokenizer, model, p.max_length, p.batch_size,
                                 {t: _head_module(model, h) for t, h in heads.items()})
        blocks = [n for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)]
        for n, prm in model.named_parameters():
            prm.requires_grad_(n in blocks)
        gradient = LayerwiseGradient(model, offload, objective, blocks) if offload else None
        fw = FrankWolfe(model, objective, candidates, blocks, p.settings(), job.progress, gradient)
        result = fw.run()

        os.makedirs(job.plan_dir, exist_ok=True)
        labels = [c.label for c in job.candidates]
        coefficients = {n: ta_coefficients(a, len(labels), p.scaling) for n, a in result.atoms.items()}
        plan = {
            "method": self.name,
            "base": job.base,
            "candidates": labels,
            "settings": p.model_dump(),
            "primary_head": labels[0] if heads else None,
            "atoms": {n: [vars(a) for a in atoms] for n, atoms in result.atoms.items()},
            "coefficients": coefficients if all(c is not None for c in coefficients.values()) else None,
            "objective": {"initial": result.initial_objective, "final": result.final_objective},
            "stochastic": bool(result.trace and result.trace[0].get("minibatch")),
            "selected_iteration": result.selected_iteration,
            "candidate_bytes_read": result.bytes_read,
            "lmo_rescored_tensors": fw.rescored,
            "solve_seconds": result.seconds,
            "gradient": {"mode": p.gradient, "device": job.device,
                         "layer_fetches": offload.fetches if offload else None,
                         "peak_layers_on_device": offload.peak_resident if offload else None,
                         "device_weight_bytes": offload.device_weight_bytes if offload else None,
                         "model_weight_bytes": offload.model_weight_bytes if offload else None},
        }
        with open(os.path.join(job.plan_dir, "plan.json"), "w", encoding="utf-8") as fp:
            json.dump(plan, fp)
        with open(os.path.join(job.plan_dir, "trace.json"), "w", encoding="utf-8") as fp:
            json.dump({"trace": result.trace, "final_objective": result.final_objective}, fp)
        plot_trace(result.trace, labels, os.path.join(job.plan_dir, "trace.png"), result.selected_iteration,
                   result.final_objective, result.initial_objective)
        if plan["coefficients"] is not None:
            with open(os.path.join(job.plan_dir, "reproduce.yml"), "w", encoding="utf-8") as fp:
                fp.write(_reproduce_recipe(job.base, labels, plan["coefficients"], "float32"))
        if heads:
            save_heads(job.plan_dir, heads)
        # The solve ends holding the merged blocks: keep them, so executing the plan needs no
        # second pass over the candidates (fwllm merge hands mergekit a base-only graph).
        write_merged(job.plan_dir, fw.merged_state().items())
        mark_plan_complete(job.plan_dir)

    def load_plan(self, plan_dir: str) -> Any:
        path = os.path.join(plan_dir, "plan.json")
        if not os.path.isfile(path):
            raise FwllmError(f"{plan_dir} is not an fw_merging plan (no plan.json)")
        with open(path, encoding="utf-8") as fp:
            plan = json.load(fp)
        plan["_atoms"] = {n: [Atom(**a) for a in atoms] for n, atoms in plan["atoms"].items()}
        plan["_merged"] = merged_index(plan_dir)
        plan["_settings"] = FWParams(**plan["settings"]).settings()
        return plan

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        if plan.get("_merged") and name in plan["_atoms"]:
            return read_merged(plan["_merged"], name)
        labels = plan["candidates"]
        missing = [lab for lab in labels if lab not in candidates]
        if name in plan["_atoms"]:
            if missing:
                raise FwllmError(f"{name}: the plan needs candidates {missing}, which the recipe does not give")
            base32 = base.float()
            tau = lambda i: candidates[labels[i]].float() - base32  # noqa: E731
            return base32 + block_delta(plan["_atoms"][name], name, tau, plan["_settings"], base32)
        if is_head_tensor(name) and plan.get("primary_head") in candidates:
            return candidates[plan["primary_head"]]  # the loadable checkpoint carries task 1's head
        return base


register_data_method(FWMerging())
