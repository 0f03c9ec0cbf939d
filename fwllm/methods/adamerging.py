"""`merge_method: adamerging`: layer-wise AdaMerging (Yang et al., arXiv 2310.02575).

theta_l = theta0_l + sum_i lambda_{l,i} tau_{l,i}, one coefficient per parameter tensor l
(the paper's "layer-wise") and candidate i, learnt on the entropy of the merged model's
predictions (`fwllm.solvers.adamerging`). Regression tasks have no predictive
distribution and are skipped, with a warning.

Plan folder:
  plan.json          settings, candidates, coefficients, entropy before and after
  coefficients.json  {"candidates": [...], "coefficients": {tensor: [lambda per candidate]}}
  trace.json         entropy before each step and after the last one
  reproduce.yml      a plain mergekit `task_arithmetic` recipe giving the same tensors
  fwllm_heads/       per-task classification heads (encoder pools)
  merged/            a LoRA pool's merge on the layerwise path, as factors: executing the plan then
                     needs no candidate (mergekit would merge each adapter into a model copy first)

`gradient`: full holds the model, theta0 and every task vector in RAM; layerwise (LMs and encoders)
runs the merged model one layer at a time (`fwllm.solvers.streamed_adamerging`); auto picks
layerwise when the in-RAM solve would need more than half the free memory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import List

import torch

from fwllm.arch.heads import is_head_tensor, save_heads
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.core.errors import FwllmError
from fwllm.core.footprint import ModelSizes
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import AdaMergingParams
from fwllm.core.plan import AdaMergingPlanRecord, Plan, mark_plan_complete, read_record, write_record
from fwllm.data.calibration import REGRESSION, CalibrationTask, micro_batch_shape
from fwllm.data.encoding import encode_task
from fwllm.data.objective import Objective
from fwllm.io.merged_store import merged_index, write_merged
from fwllm.io.models import load_tokenizer, read_config
from fwllm.io.tensors import TensorReader
from fwllm.kernels.weighted_sum import weighted_sum
from fwllm.methods.common import (
    check_candidates,
    head_modules,
    head_or_base,
    load_pool_model,
    open_pool,
    pool_heads,
    primary_head,
    storable,
    stored_or_none,
    write_reproduce_recipe,
)
from fwllm.methods.fw_merging import choose_gradient
from fwllm.solvers.adamerging import adamerge
from fwllm.solvers.lora_terms import pool_is_low_rank
from fwllm.solvers.streamed_adamerging import MergedPoint, streamed_adamerge

LOG = logging.getLogger(__name__)


def _write_json(plan_dir: str, file: str, data: dict) -> None:
    with open(os.path.join(plan_dir, file), "w", encoding="utf-8") as fp:
        json.dump(data, fp, indent=2)


def _with_predictions(tasks: List[CalibrationTask]) -> List[CalibrationTask]:
    """Regression rows have no predictive distribution to take the entropy of: skip them."""
    for t in tasks:
        if t.kind == REGRESSION:
            LOG.warning("adamerging: skipping regression task %r (no predictive distribution)", t.name)
    kept = [t for t in tasks if t.kind != REGRESSION]
    if not kept:
        raise FwllmError(
            "adamerging: no calibration task with a predictive distribution (all are regression)"
        )
    return kept


def _merged_names(model: torch.nn.Module) -> List[str]:
    """The tensors that get coefficients: float parameters, not task heads (tied duplicates once)."""
    return [n for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)]


class AdaMerging(DataMethod):
    name = "adamerging"
    pretty_name = "AdaMerging (layer-wise)"
    reference_url = "https://arxiv.org/abs/2310.02575"
    Params = AdaMergingParams
    per_model = {"task": (str, "")}  # names the candidate's head (encoder pools); no weights to give

    def solve(self, job: MergeJob) -> None:
        p: AdaMergingParams = job.params  # type: ignore[assignment]
        torch.manual_seed(p.seed)
        start = time.time()
        pool = open_pool(job, _with_predictions)
        tasks = pool.tasks
        mode, reason = self._gradient_mode(p, pool)
        LOG.info("adamerging: gradient %s (%s)", mode, reason)
        if mode == "layerwise":
            heads = pool_heads(pool, job, tasks)
            result, info = self._streamed(job, pool, heads)
        else:
            model = load_pool_model(pool, job.device)
            tokenizer = load_tokenizer(pool.base_dir)
            heads = pool_heads(pool, job, tasks)
            modules = head_modules(model, heads, job.device)
            encoded = []
            for task in tasks:
                enc = encode_task(task, tokenizer, p.max_length, p.batch_size, pool.kind)
                enc.head = modules.get(task.name)
                encoded.append(enc)
            names = _merged_names(model)
            result = adamerge(model, encoded, pool.candidates, names, p, job.progress)
            info = {}
        info.update(mode=mode, reason=reason)

        labels = [c.label for c in job.candidates]
        record = AdaMergingPlanRecord(
            method=self.name,
            base=job.base,
            settings=p.model_dump(),
            primary_head=primary_head(job, heads),
            candidates=labels,
            coefficients=result.coefficients,
            entropy={"initial": result.entropy[0], "final": result.entropy[-1]},
            solve_seconds=time.time() - start,
        )
        write_record(job.plan_dir, record)
        _write_json(
            job.plan_dir, "coefficients.json", {"candidates": labels, "coefficients": result.coefficients}
        )
        _write_json(
            job.plan_dir,
            "trace.json",
            {"entropy": result.entropy, "lr": p.lr, "steps": p.steps, "gradient": info},
        )
        write_reproduce_recipe(job.plan_dir, job.base, labels, result.coefficients, pool.base_dir)
        if heads:
            save_heads(job.plan_dir, heads)
        mark_plan_complete(job.plan_dir)

    @staticmethod
    def _gradient_mode(p: AdaMergingParams, pool) -> tuple:
        reader = TensorReader(pool.base_dir)
        numel = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
        sizes = ModelSizes.from_config(read_config(pool.base_dir))
        rows, tokens = micro_batch_shape(pool.tasks, p.batch_size, p.max_length)
        # the model, theta0, its gradient and N task vectors, float32; one micro-batch's backward
        need = (
            4 * numel * (3 + len(pool.candidates))
            + sizes.activation_bytes(rows, tokens)
            + sizes.logits_bytes(rows, tokens)
        )
        return choose_gradient(p, need)

    @staticmethod
    def _streamed(job: MergeJob, pool, heads):
        p: AdaMergingParams = job.params  # type: ignore[assignment]
        model = skeleton(pool.base_dir, pool.architecture)
        base_map = base_weights(pool.base_dir)
        tokenizer = load_tokenizer(pool.base_dir)
        modules = head_modules(model, heads, job.device)  # an encoder pool: each task's own head
        encoded = [encode_task(t, tokenizer, p.max_length, p.batch_size, pool.kind) for t in pool.tasks]
        for enc, task in zip(encoded, pool.tasks):
            enc.head = modules.get(task.name)
        objective = Objective(encoded)
        names = _merged_names(model)
        meta = MetaModel(model, base_map, job.device, trainable=names, optional=is_head_tensor)
        point = MergedPoint(base_map, pool.candidates, names)
        result = streamed_adamerge(meta, objective, point, names, p, job.progress)
        if pool_is_low_rank([c.adapter for c in pool.candidates]):
            # a LoRA pool's merge as its factors, so that executing the plan needs no candidate: mergekit
            # would first merge every adapter into a copy of the model (16 x 2 GiB at 1.1B)
            write_merged(job.plan_dir, storable(point.low_rank_deltas()))
        return result, dict(result.stats)

    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, AdaMergingPlanRecord)
        return Plan(plan_dir, record, AdaMergingParams(**record.settings), merged_index(plan_dir))

    def merged_recomputable(self, plan: Plan) -> bool:
        # a LoRA pool's factors (rank sum r_i: small) stay in the plan: formed again from the
        # coefficients, they would need mergekit to merge each adapter into a model copy first
        return plan.merged is None

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        record: AdaMergingPlanRecord = plan.record
        coefficients = record.coefficients.get(name)
        if coefficients is None:
            return head_or_base(plan, name, base, candidates)
        stored = stored_or_none(plan, name, base)  # a LoRA pool's layerwise merge: its factors
        if stored is not None:
            return stored
        check_candidates(self.name, record.candidates, candidates)
        base32 = base.float()
        taus = (candidates[lab].float() - base32 for lab in record.candidates)
        return weighted_sum(taus, coefficients, start=base32)
