"""`merge_method: regmean`: RegMean (Jin et al., arXiv 2212.09849).

solve:  each candidate's Gram matrices on its own calibration task (per-model `task`), one
        candidate at a time (`fwllm.solvers.grams`). Plan folder:
          plan.json               settings; per candidate: label, task, Gram file, token count
          gram/<i>.safetensors    candidate i's Gram per linear weight name ([in, in], float32)
          fwllm_heads/            per-task classification heads (classifier candidates)
          merged/                 the merged tensors, streamed
        `gradient: layerwise` (auto when the in-RAM measurement would not fit in half the free RAM)
        measures the Grams one decoder layer at a time over a meta-device skeleton and reduces them as
        they come (`fwllm.solvers.streamed_grams`): no Gram file; each candidate's file in plan.json is
        merged/, which holds the merge.
merge:  linear weights in closed form (`fwllm.kernels.regmean`), reading that layer's Grams
        one at a time; everything else is the weighted average. A singular Gram sum gets a
        ridge towards the weighted average, and each such layer is logged.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from fwllm.arch.heads import is_head_tensor, save_heads
from fwllm.arch.weight_layout import transposed_weights_of
from fwllm.core.errors import FwllmError, check_finite_gram
from fwllm.core.job import MergeJob
from fwllm.core.method import DataMethod
from fwllm.core.params import RegMeanParams
from fwllm.core.footprint import ModelSizes
from fwllm.core.plan import (
    CandidateStats,
    Plan,
    StatsPlanRecord,
    mark_plan_complete,
    read_record,
    write_record,
)
from fwllm.data.calibration import load_calibration, micro_batch_shape
from fwllm.data.encoding import encode_task
from fwllm.io.iterate_store import check_free_space
from fwllm.io.merged_store import MERGED_DIR, merged_index, write_merged
from fwllm.io.models import load_tokenizer, read_config, resolve_model_path
from fwllm.io.tensors import TensorReader
from fwllm.io.stats_store import StatsCache, has_stat, read_stat
from fwllm.kernels.regmean import regmean_merge
from fwllm.kernels.weighted_sum import weighted_average
from fwllm.methods.common import (
    check_candidates,
    finish_streamed_plan,
    head_or_base,
    link_statistics,
    measured_heads,
    open_pool,
    pool_heads,
    primary_head,
    storable,
    stored_or_none,
    weights_of,
)
from fwllm.methods.fw_merging import choose_gradient
from fwllm.methods.statistics import measure_candidates
from fwllm.solvers.grams import GRAM_LAYERS, candidate_grams
from fwllm.solvers.per_candidate import candidate_task
from fwllm.solvers.streamed_grams import SCRATCH_DIR, StreamedRegMean, check_streamable

LOG = logging.getLogger(__name__)


def in_ram_bytes(job: MergeJob) -> int:
    """What measuring one candidate in RAM holds: the model in float32, its Grams (one [in, in] per
    linear weight), and one micro-batch's activations and logits."""
    if job.params.gradient != "auto":
        return 0  # not asked for: no need to read the calibration data here
    base_dir = resolve_model_path(job.base)
    reader = TensorReader(base_dir)
    shapes = [reader.shape(n) for n in reader.names()]
    weights = sum(int(torch.Size(s).numel()) for s in shapes)
    grams = sum(int(s[1]) ** 2 for s in shapes if len(s) == 2)
    sizes = ModelSizes.from_config(read_config(base_dir))
    rows, tokens = micro_batch_shape(
        load_calibration(job.params.calibration, job.params.max_rows),
        job.params.batch_size,
        job.params.max_length,
    )
    return 4 * (weights + grams) + sizes.activation_bytes(rows, tokens) + sizes.logits_bytes(rows, tokens)


class RegMean(DataMethod):
    name = "regmean"
    pretty_name = "RegMean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    Params = RegMeanParams

    def merged_recomputable(self, plan: Plan) -> bool:
        # a streamed solve keeps no Gram: its stored merge is the only record of it
        return not any(c.file == MERGED_DIR for c in plan.record.candidates)

    def solve(self, job: MergeJob) -> None:
        p: RegMeanParams = job.params  # type: ignore[assignment]
        mode, reason = choose_gradient(p, in_ram_bytes(job))
        LOG.info("regmean: gradient %s (%s)", mode, reason)
        if mode == "layerwise":
            self._solve_streamed(job)
            return
        settings = {k: v for k, v in p.model_dump().items() if k in ("max_length", "batch_size")}
        settings["layers"] = GRAM_LAYERS
        store = StatsCache("gram")
        measured = measure_candidates(
            job, store, settings, lambda m, task, tok: candidate_grams(m, task, tok, p), "Gram"
        )
        heads = measured_heads(measured)
        record = StatsPlanRecord(
            method=self.name,
            base=job.base,
            settings=p.model_dump(),
            candidates=link_statistics(job, store, measured),
            primary_head=primary_head(job, heads),
        )
        finish_streamed_plan(self, job, record, heads)

    def _solve_streamed(self, job: MergeJob) -> None:
        """Grams layer by layer, reduced as they come; the plan stores the merged tensors."""
        p: RegMeanParams = job.params  # type: ignore[assignment]
        pool = open_pool(job)
        check_streamable(pool.candidates, self.name)
        labels = [spec.label for spec in job.candidates]
        weights = weights_of(self.name, labels, {spec.label: spec.params for spec in job.candidates})
        tasks = [candidate_task(self.name, spec, pool.tasks) for spec in job.candidates]
        tokenizer = load_tokenizer(pool.base_dir)
        batches = [encode_task(t, tokenizer, p.max_length, p.batch_size).batches for t in tasks]
        torch.manual_seed(p.seed)
        scratch = os.path.join(job.plan_dir, SCRATCH_DIR)
        solver = StreamedRegMean.for_candidates(
            pool.base_dir,
            pool.candidates,
            weights,
            batches,
            p.alpha,
            p.ridge,
            job.device,
            architecture=pool.architecture,  # an encoder pool runs its experts' classifier class
            spill_dir=scratch,
        )
        if all(c.adapter is not None for c in pool.candidates):
            # a LoRA pool's merge is W_0 + B A with B A of rank sum r_i: the plan keeps the factors
            factors = (f for c in pool.candidates for f in c.adapter.factors.values())
            kept, what = 4 * sum(f.a.numel() + f.b.numel() for f in factors), "the merge's factors"
        else:
            reader = TensorReader(pool.base_dir)
            kept = 4 * sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
            what = "the merged model"
        check_free_space(job.plan_dir, kept + solver.held_bytes(batches), f"{what} and the hidden states")
        solver.keep_factors = True
        heads = pool_heads(pool, job, tasks)  # an encoder pool: each task keeps its expert's head
        try:
            write_merged(job.plan_dir, storable(solver.merged()))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if heads:
            save_heads(job.plan_dir, heads)
        # no Gram file: the statistic lives on only reduced, in the merged tensors
        stats = [
            CandidateStats(
                label=lab,
                task=t.name,
                file=MERGED_DIR,
                cached=False,
                meta={"tokens": run.tokens, "gram": "streamed"},
            )
            for lab, t, run in zip(labels, tasks, solver.runs)
        ]
        write_record(
            job.plan_dir,
            StatsPlanRecord(
                method=self.name,
                base=job.base,
                settings=p.model_dump(),
                candidates=stats,
                primary_head=primary_head(job, heads),
                timings={"closed_form_s": solver.closed_form_s},
            ),
        )
        mark_plan_complete(job.plan_dir)

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
                    raise FwllmError(
                        f"regmean: candidate {lab} has no Gram for {name} (plan from another model?)"
                    )
                check_finite_gram(f"Gram of candidate {lab}", name, gram)
                theta = candidates[lab]  # read once: candidates may be read from disk on each access
                yield (theta.T if transposed else theta), gram.to(theta.device), c
                del theta, gram  # before the next one is read

        p: RegMeanParams = plan.params
        merged, lam = regmean_merge(layers(), p.alpha, p.ridge)
        merged = merged.T.contiguous() if transposed else merged
        if lam == float("inf"):
            LOG.warning("regmean: %s saw no input on any candidate; using the weighted average", name)
        elif lam:
            LOG.warning(
                "regmean: the Gram sum of %s is singular; added ridge %.3g*I (unseen input "
                "directions keep the weighted average)",
                name,
                lam,
            )
        return merged
