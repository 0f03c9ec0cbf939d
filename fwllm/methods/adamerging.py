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
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import List

import torch

from fwllm.arch.heads import is_head_tensor, save_heads
from fwllm.core.errors import FwllmError
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import AdaMergingParams
from fwllm.core.plan import AdaMergingPlanRecord, Plan, mark_plan_complete, read_record, write_record
from fwllm.data.calibration import REGRESSION, CalibrationTask
from fwllm.data.encoding import encode_task
from fwllm.io.models import load_tokenizer
from fwllm.kernels.weighted_sum import weighted_sum
from fwllm.methods.common import (
    check_candidates, head_modules, head_or_base, load_pool_model, open_pool, pool_heads, primary_head,
    write_reproduce_recipe,
)
from fwllm.solvers.adamerging import adamerge

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
        raise FwllmError("adamerging: no calibration task with a predictive distribution (all are regression)")
    return kept


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
        model = load_pool_model(pool, job.device)
        tokenizer = load_tokenizer(pool.base_dir)
        heads = pool_heads(pool, job, tasks)
        modules = head_modules(model, heads, job.device)
        encoded = []
        for task in tasks:
            enc = encode_task(task, tokenizer, p.max_length, p.batch_size, pool.kind)
            enc.head = modules.get(task.name)
            encoded.append(enc)
        names = [n for n, prm in model.named_parameters() if prm.is_floating_point() and not is_head_tensor(n)]
        result = adamerge(model, encoded, pool.candidates, names, p, job.progress)

        labels = [c.label for c in job.candidates]
        record = AdaMergingPlanRecord(
            method=self.name, base=job.base, settings=p.model_dump(), primary_head=primary_head(job, heads),
            candidates=labels, coefficients=result.coefficients,
            entropy={"initial": result.entropy[0], "final": result.entropy[-1]}, solve_seconds=time.time() - start)
        write_record(job.plan_dir, record)
        _write_json(job.plan_dir, "coefficients.json", {"candidates": labels, "coefficients": result.coefficients})
        _write_json(job.plan_dir, "trace.json", {"entropy": result.entropy, "lr": p.lr, "steps": p.steps})
        write_reproduce_recipe(job.plan_dir, job.base, labels, result.coefficients, pool.base_dir)
        if heads:
            save_heads(job.plan_dir, heads)
        mark_plan_complete(job.plan_dir)

    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, AdaMergingPlanRecord)
        return Plan(plan_dir, record, AdaMergingParams(**record.settings))

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        record: AdaMergingPlanRecord = plan.record
        coefficients = record.coefficients.get(name)
        if coefficients is None:
            return head_or_base(plan, name, base, candidates)
        check_candidates(self.name, record.candidates, candidates)
        base32 = base.float()
        taus = (candidates[lab].float() - base32 for lab in record.candidates)
        return weighted_sum(taus, coefficients, start=base32)
