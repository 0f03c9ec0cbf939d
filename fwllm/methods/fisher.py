"""`merge_method: fisher`: Fisher merging (Matena & Raffel, arXiv 2111.09832).

solve:  each candidate's diagonal Fisher on its *own* calibration task (per-model `task`),
        one candidate at a time (`fwllm.solvers.fisher`). Plan folder:
          plan.json                 settings; per candidate: label, task, Fisher file, mean Fisher
          fisher/<i>.safetensors    candidate i's diagonal Fisher, by parameter name
          fwllm_heads/              per-task classification heads (classifier candidates)
          merged/                   the merged tensors, streamed
merge:  per tensor, theta = sum_i w_i F_i theta_i / sum_i w_i F_i with F_i floored at `epsilon`.

The merge is over the non-base models. Head tensors are kept per task; non-float tensors
come from the base; float tensors the Fisher does not cover (buffers, tied duplicates) are
the weighted average.
"""

from __future__ import annotations

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import FisherParams
from fwllm.core.plan import Plan, StatsPlanRecord, read_record
from fwllm.io.merged_store import merged_index
from fwllm.io.stats_store import StatsCache, has_stat, read_stat
from fwllm.kernels.fisher import fisher_merge
from fwllm.kernels.weighted_sum import weighted_average
from fwllm.methods.common import (
    check_candidates, finish_streamed_plan, head_or_base, link_statistics, measured_heads, primary_head,
    stored_or_none, weights_of,
)
from fwllm.solvers.fisher import candidate_fisher
from fwllm.solvers.per_candidate import measure_candidates


class FisherMerging(DataMethod):
    name = "fisher"
    pretty_name = "Fisher merging"
    reference_url = "https://arxiv.org/abs/2111.09832"
    Params = FisherParams

    def solve(self, job: MergeJob) -> None:
        p: FisherParams = job.params  # type: ignore[assignment]
        # only what changes the Fishers keys the store; merge-time settings (epsilon, weights) do not
        settings = {k: v for k, v in p.model_dump().items() if k in ("fisher", "top_k", "max_length", "seed")}
        store = StatsCache("fisher")
        measured = measure_candidates(job, store, settings, lambda m, task, tok: candidate_fisher(m, task, tok, p),
                                      "Fisher")
        heads = measured_heads(measured)
        record = StatsPlanRecord(method=self.name, base=job.base, settings=p.model_dump(),
                                 candidates=link_statistics(job, store, measured), primary_head=primary_head(job, heads))
        finish_streamed_plan(self, job, record, heads)

    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, StatsPlanRecord)
        return Plan(plan_dir, record, FisherParams(**record.settings), merged_index(plan_dir))

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
        files = [f"{plan.folder}/{c.file}" for c in record.candidates]
        # generators: with lazily read candidates, one theta and one Fisher are alive at a time
        thetas = (candidates[lab] for lab in labels)
        if not has_stat(files[0], name):
            return weighted_average(thetas, weights)  # not a parameter the Fisher covers
        p: FisherParams = plan.params
        means = [(c.meta["mean"] or 1.0) if p.normalize_fisher else 1.0 for c in record.candidates]

        def fishers():
            for lab, path, mean in zip(labels, files, means):
                f = read_stat(path, name)  # this tensor's entry only
                if f is None:
                    raise FwllmError(f"fisher: candidate {lab} has no Fisher for {name} (plan from another model?)")
                check_finite(f"Fisher of candidate {lab}", name, f)
                yield f.to(base.device) / mean

        return fisher_merge(thetas, fishers(), weights, p.epsilon)
