"""`merge_method: regmean`: RegMean (Jin et al., arXiv 2212.09849).

solve:  each candidate's Gram matrices on its own calibration task (per-model `task`), one
        candidate at a time (`fwllm.solvers.grams`). Plan folder:
          plan.json               settings; per candidate: label, task, Gram file, token count
          gram/<i>.safetensors    candidate i's Gram per linear weight name ([in, in], float32)
          fwllm_heads/            per-task classification heads (classifier candidates)
          merged/                 the merged tensors, streamed
merge:  linear weights in closed form (`fwllm.kernels.regmean`), reading that layer's Grams
        one at a time; everything else is the weighted average. A singular Gram sum gets a
        ridge towards the weighted average, and each such layer is logged.
"""

from __future__ import annotations

import logging

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.arch.weight_layout import transposed_weights_of
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import RegMeanParams
from fwllm.core.plan import Plan, StatsPlanRecord, read_record
from fwllm.io.merged_store import merged_index
from fwllm.io.models import resolve_model_path
from fwllm.io.stats_store import StatsCache, has_stat, read_stat
from fwllm.kernels.regmean import regmean_merge
from fwllm.kernels.weighted_sum import weighted_average
from fwllm.methods.common import (
    check_candidates, finish_streamed_plan, head_or_base, link_statistics, measured_heads, primary_head,
    stored_or_none, weights_of,
)
from fwllm.solvers.grams import GRAM_LAYERS, candidate_grams
from fwllm.solvers.per_candidate import measure_candidates

LOG = logging.getLogger(__name__)


class RegMean(DataMethod):
    name = "regmean"
    pretty_name = "RegMean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    Params = RegMeanParams

    def solve(self, job: MergeJob) -> None:
        p: RegMeanParams = job.params  # type: ignore[assignment]
        settings = {k: v for k, v in p.model_dump().items() if k in ("max_length", "batch_size")}
        settings["layers"] = GRAM_LAYERS
        store = StatsCache("gram")
        measured = measure_candidates(job, store, settings, lambda m, task, tok: candidate_grams(m, task, tok, p),
                                      "Gram")
        heads = measured_heads(measured)
        record = StatsPlanRecord(method=self.name, base=job.base, settings=p.model_dump(),
                                 candidates=link_statistics(job, store, measured), primary_head=primary_head(job, heads))
        finish_streamed_plan(self, job, record, heads)

    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, StatsPlanRecord)
        return Plan(plan_dir, record, RegMeanParams(**record.settings), merged_index(plan_dir))

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        stored = stored_or_none(plan, name, base)
        if stored is not None:
            return stored
        if not base.is_floating_point():
            return base
        if is_head_tensor(name):
            return head_or_base(plan, name, base, candidates)
        record: StatsPlanRecord = plan.record
        labels = record.labels
        check_candidates(self.name, labels, candidates)
        weights = weights_of(self.name, labels, per_model)
        files = {c.label: f"{plan.folder}/{c.file}" for c in record.candidates}
        if base.dim() != 2 or not has_stat(files[labels[0]], name):
            return weighted_average((candidates[lab] for lab in labels), weights)

        # GPT-2's Conv1D weights are [in, out]: the closed form takes [out, in]
        transposed = name in transposed_weights_of(resolve_model_path(record.base))

        def layers():  # one Gram in memory at a time
            for lab, c in zip(labels, weights):
                gram = read_stat(files[lab], name)
                if gram is None:
                    raise FwllmError(f"regmean: candidate {lab} has no Gram for {name} (plan from another model?)")
                check_finite(f"Gram of candidate {lab}", name, gram)
                theta = candidates[lab]  # read once: candidates may be read from disk on each access
                yield (theta.T if transposed else theta), gram.to(theta.device), c
                del theta, gram  # before the next one is read

        p: RegMeanParams = plan.params
        merged, lam = regmean_merge(layers(), p.alpha, p.ridge)
        merged = merged.T.contiguous() if transposed else merged
        if lam == float("inf"):
            LOG.warning("regmean: %s saw no input on any candidate; using the weighted average", name)
        elif lam:
            LOG.warning("regmean: the Gram sum of %s is singular; added ridge %.3g*I (unseen input "
                        "directions keep the weighted average)", name, lam)
        return merged
