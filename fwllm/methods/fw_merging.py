"""`merge_method: fw_merging`: FW-Merging (arXiv 2503.12649).

solve:  open the pool, load the base as the differentiable iterate, run the FW solver,
        write the plan folder:
          plan.json       settings, candidates, weights, per-tensor atoms (the exact merge)
          trace.json      objective, gamma and chosen vertex per block, per iteration
          trace.png       the objective curve, and the share of blocks choosing each vertex
          reproduce.yml   a plain mergekit `task_arithmetic` recipe with per-tensor weights
                          (when every step is task arithmetic)
          fwllm_heads/    per-task classification heads (encoder pools)
          merged/         the merged tensors (mergekit then executes a base-only graph)
merge:  the stored tensor, or base + sum_a beta_a * atom_a(taus) from the candidates given.
"""

from __future__ import annotations

import json
import os

import torch

from fwllm.arch.heads import is_head_tensor, save_heads
from fwllm.arch.layer_stack import LayerOffload
from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import FWParams
from fwllm.core.plan import FWPlanRecord, Plan, mark_plan_complete, read_record, write_record
from fwllm.data.objective import encode_tasks
from fwllm.io.merged_store import merged_index, read_merged, write_merged
from fwllm.io.models import load_tokenizer
from fwllm.io.trace_plot import plot_trace
from fwllm.kernels.atoms import block_delta, ta_coefficients
from fwllm.methods.common import (
    head_modules, load_pool_model, open_pool, pool_heads, primary_head, write_reproduce_recipe,
)
from fwllm.solvers.frank_wolfe import FrankWolfe
from fwllm.solvers.gradients import LayerwiseGradient


class FWMerging(DataMethod):
    name = "fw_merging"
    pretty_name = "FW-Merging (Frank-Wolfe)"
    reference_url = "https://arxiv.org/abs/2503.12649"
    Params = FWParams

    def solve(self, job: MergeJob) -> None:
        p: FWParams = job.params  # type: ignore[assignment]
        torch.manual_seed(p.seed)
        pool = open_pool(job)
        layerwise = p.gradient == "layerwise"  # the weights load on the host; the stack stays there
        model = load_pool_model(pool, "cpu" if layerwise else job.device)
        offload = LayerOffload(model, job.device) if layerwise else None
        heads = pool_heads(pool, job, pool.tasks)
        objective = encode_tasks(pool.tasks, load_tokenizer(pool.base_dir), model, p.max_length, p.batch_size,
                                 head_modules(model, heads))
        blocks = [n for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)]
        for n, prm in model.named_parameters():
            prm.requires_grad_(n in blocks)
        gradient = LayerwiseGradient(model, offload, objective, blocks) if offload else None
        weights = [float(c.params.get("weight", 1.0)) for c in job.candidates]
        fw = FrankWolfe(model, objective, pool.candidates, weights, blocks, p, job.progress, gradient)
        result = fw.run()

        labels = [c.label for c in job.candidates]
        coefficients = {n: ta_coefficients(a, weights, p.scaling) for n, a in result.atoms.items()}
        all_ta = all(c is not None for c in coefficients.values())
        record = FWPlanRecord(
            method=self.name, base=job.base, settings=p.model_dump(), primary_head=primary_head(job, heads),
            candidates=labels, weights=weights, atoms=result.atoms, coefficients=coefficients if all_ta else None,
            objective={"initial": result.initial_objective, "final": result.final_objective},
            stochastic=bool(result.trace and result.trace[0].get("minibatch")),
            selected_iteration=result.selected_iteration, candidate_bytes_read=result.bytes_read,
            lmo_rescored_tensors=result.rescored, solve_seconds=result.seconds,
            gradient={"mode": p.gradient, "device": job.device,
                      "layer_fetches": offload.fetches if offload else None,
                      "peak_layers_on_device": offload.peak_resident if offload else None,
                      "device_weight_bytes": offload.device_weight_bytes if offload else None,
                      "model_weight_bytes": offload.model_weight_bytes if offload else None},
        )
        write_record(job.plan_dir, record)
        with open(os.path.join(job.plan_dir, "trace.json"), "w", encoding="utf-8") as fp:
            json.dump({"trace": result.trace, "final_objective": result.final_objective}, fp)
        plot_trace(result.trace, labels, os.path.join(job.plan_dir, "trace.png"), result.selected_iteration,
                   result.final_objective, result.initial_objective)
        if all_ta:
            write_reproduce_recipe(job.plan_dir, job.base, labels, coefficients, pool.base_dir)
        if heads:
            save_heads(job.plan_dir, heads)
        # The solve ends holding the merged blocks: keep them, so executing the plan needs no
        # second pass over the candidates.
        write_merged(job.plan_dir, fw.merged_state().items())
        mark_plan_complete(job.plan_dir)

    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, FWPlanRecord)
        return Plan(plan_dir, record, FWParams(**record.settings), merged_index(plan_dir))

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        record: FWPlanRecord = plan.record
        if name in record.atoms:
            if plan.merged is not None:
                return read_merged(plan.merged, name)
            labels = record.candidates
            missing = [lab for lab in labels if lab not in candidates]
            if missing:
                raise FwllmError(f"{name}: the plan needs candidates {missing}, which the recipe does not give")
            base32 = base.float()
            tau = lambda i: (candidates[labels[i]].float() - base32) * record.weights[i]  # noqa: E731
            return base32 + block_delta(record.atoms[name], name, tau, labels, base32, plan.params)
        if is_head_tensor(name) and record.primary_head in candidates:
            return candidates[record.primary_head]  # the loadable checkpoint carries task 1's head
        return base
