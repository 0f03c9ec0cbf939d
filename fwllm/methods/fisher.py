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

`gradient`: full loads each candidate whole (float32) and keeps each candidate's Fisher in the
statistics cache; layerwise runs the candidates one layer at a time (encoders: disk sums only), nothing
cached per candidate, epsilon and the weights applied at solve time, in one of two orders:
  layer-major   every candidate through each layer together, the layer's merge finished before
                the next (`fwllm.solvers.layer_major_fisher`): no statistic on disk, only merged/;
                RAM holds every candidate's layer inputs and per-term gradients (priced first);
  disk sums     candidate after candidate, its Fisher folded into two running sums on disk
                (`fwllm.solvers.streamed_fisher`: the plan folder's .fisher_sums and a scratch sum,
                3 models in float32, removed once merged/ is written): for normalize_fisher (a
                candidate's whole Fisher is needed first) and where layer-major's held state is over
                a quarter of the free RAM (the exact Fisher's per-term gradients on long rows).
auto picks layerwise when the in-RAM solve would need more than half the free memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from typing import Dict, Iterator, Optional, Tuple

import torch

from fwllm.arch.encoder_pool import classifier_arch
from fwllm.arch.heads import checkpoint_head, is_head_tensor
from fwllm.arch.kinds import CAUSAL_MODEL, architecture_kind
from fwllm.core.footprint import ModelSizes
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.job import MergeJob
from fwllm.core.memory import available_memory
from fwllm.core.method import DataMethod
from fwllm.core.params import FisherParams
from fwllm.core.plan import (
    CandidateStats,
    Plan,
    StatsPlanRecord,
    mark_plan_complete,
    read_record,
    write_record,
)
from fwllm.data.calibration import load_calibration, micro_batch_shape
from fwllm.data.encoding import check_rows_fit
from fwllm.io.candidates import LazyCandidates, open_candidate
from fwllm.io.iterate_store import IterateStore, check_free_space
from fwllm.io.merged_store import MERGED_DIR, merged_index, write_merged
from fwllm.io.models import is_adapter_dir, load_tokenizer, read_config, resolve_model_path
from fwllm.io.stats_store import StatsCache, has_stat, read_stat
from fwllm.kernels.fisher import fisher_merge
from fwllm.kernels.weighted_sum import weighted_average
from fwllm.methods.common import (
    check_candidates,
    finish_streamed_plan,
    head_or_base,
    link_statistics,
    measured_heads,
    primary_head,
    stored_or_none,
    weights_of,
)
from fwllm.io.tensors import TensorReader
from fwllm.methods.fw_merging import choose_gradient
from fwllm.methods.statistics import measure_candidates
from fwllm.solvers.fisher import candidate_fisher
from fwllm.solvers.per_candidate import candidate_architecture, candidate_task
from fwllm.solvers.layer_major_fisher import LayerMajorFisher, held_bytes
from fwllm.solvers.streamed_fisher import CandidateRun, FisherSums, covered_parameters, fisher_sums

LOG = logging.getLogger(__name__)
SUMS_DIR, SCRATCH_DIR = ".fisher_sums", ".fisher_scratch"  # scratch folders of the plan, removed at its end
LAYER_MAJOR, DISK_SUMS = "layer-major", "disk sums"  # the two orders of a layerwise solve
LAYER_MAJOR_RAM_SHARE = 0.25  # of the free RAM, the most the layer-major order may hold between layers


class DiskSum:
    """A model-sized float32 sum on disk (the layerwise solve's `RunningSum`): `add(name, x)` adds
    x into that tensor's entry. A new one starts empty: it replaces what `folder` held."""

    def __init__(self, folder: str, shapes: Dict[str, Tuple[int, ...]]):
        shutil.rmtree(folder, ignore_errors=True)
        self.store = IterateStore(folder, shapes)

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float32)
        self.store.write(name, value if name not in self.store.index else self.store.read(name) + value)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.store.index:
            return torch.zeros(self.store.shapes[name])
        return self.store.read(name)


def read_sums(plan_dir: str, name: str) -> Optional[torch.Tensor]:
    """The layerwise merge of one tensor: num / den from the running sums (None: not covered)."""
    folder = os.path.join(plan_dir, SUMS_DIR)
    num, den = (os.path.join(folder, part) for part in ("num", "den"))
    if not os.path.isfile(os.path.join(num, "index.json")):
        raise FwllmError(f"fisher: {folder} holds no running sums: the plan is incomplete; solve again")
    from accelerate.utils import OffloadedWeightsLoader

    loaders = [OffloadedWeightsLoader(save_folder=f) for f in (num, den)]
    if name not in loaders[0].index:
        return None
    return loaders[0][name].clone() / loaders[1][name].clone()


def layerwise_order(p: FisherParams, base_dir: str, runs, tokenizer, kind=CAUSAL_MODEL) -> Tuple[str, str]:
    """(order, why) of a layerwise solve: layer-major (no statistic on disk) where it can, else the
    candidate-major order with its disk sums."""
    if kind != CAUSAL_MODEL:
        return DISK_SUMS, f"layer-major covers causal LMs; these candidates are {kind} models"
    if p.normalize_fisher:
        return DISK_SUMS, "normalize_fisher needs each candidate's whole-model Fisher mean before folding"
    need, free = held_bytes(base_dir, runs, tokenizer, p), available_memory()
    if need > free * LAYER_MAJOR_RAM_SHARE:
        return DISK_SUMS, (
            f"layer-major would hold {need / 2**30:.2f} GiB of checkpoints and gradients, over "
            f"{LAYER_MAJOR_RAM_SHARE:.0%} of the {free / 2**30:.1f} GiB free"
        )
    return (
        LAYER_MAJOR,
        f"holds {need / 2**30:.2f} GiB of checkpoints and gradients of {free / 2**30:.1f} GiB free",
    )


def _averaged(base_dir: str, candidates, labels, weights, covered) -> Iterator[Tuple[str, torch.Tensor]]:
    """The float tensors the Fisher does not cover (buffers, tied duplicates): the weighted average
    (as `merge_tensor` gives them); non-float and head tensors stay the base's (not stored)."""
    base = TensorReader(base_dir)
    full = [c.reader for c in candidates.values() if c.adapter is None]
    for name in base.names():
        if name in covered or not all(name in r for r in full) or is_head_tensor(name):
            continue
        b = base.get(name, dtype=None)
        if b.is_floating_point():
            lazy = LazyCandidates(candidates, name, b)
            yield name, weighted_average((lazy[lab] for lab in labels), weights).float()


class FisherMerging(DataMethod):
    name = "fisher"
    pretty_name = "Fisher merging"
    reference_url = "https://arxiv.org/abs/2111.09832"
    Params = FisherParams

    def solve(self, job: MergeJob) -> None:
        p: FisherParams = job.params  # type: ignore[assignment]
        mode, reason = self._gradient_mode(job)
        LOG.info("fisher: gradient %s (%s)", mode, reason)
        if mode == "layerwise":
            self._streamed(job, reason)
            return
        # only what changes the Fishers keys the store; merge-time settings (epsilon, weights) do not
        settings = {k: v for k, v in p.model_dump().items() if k in ("fisher", "top_k", "max_length", "seed")}
        store = StatsCache("fisher")
        measured = measure_candidates(
            job, store, settings, lambda m, task, tok: candidate_fisher(m, task, tok, p), "Fisher"
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

    @staticmethod
    def _gradient_mode(job: MergeJob):
        p: FisherParams = job.params  # type: ignore[assignment]
        base_dir = resolve_model_path(job.base)
        kinds = {architecture_kind(candidate_architecture(spec, base_dir)) for spec in job.candidates}
        if len(kinds) != 1:
            if p.gradient == "layerwise":
                raise FwllmError(
                    f"fisher: gradient: layerwise runs one kind of model; these candidates are "
                    f"{sorted(kinds)} (use gradient: full)"
                )
            return "full", "the candidates are of several kinds"
        if p.gradient != "auto":
            return p.gradient, "set in the recipe"
        reader = TensorReader(base_dir)
        numel = sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
        sizes = ModelSizes.from_config(read_config(base_dir))
        _, tokens = micro_batch_shape(load_calibration(p.calibration, p.max_rows), 1, p.max_length)
        # one candidate in float32, its Fisher and its gradient; one example's backward
        need = 3 * 4 * numel + sizes.activation_bytes(1, tokens) + sizes.logits_bytes(1, tokens)
        return choose_gradient(p, need)

    def _streamed(self, job: MergeJob, reason: str) -> None:
        p: FisherParams = job.params  # type: ignore[assignment]
        base_dir = resolve_model_path(job.base)
        tasks = load_calibration(p.calibration, p.max_rows)
        own = [candidate_task(self.name, spec, tasks) for spec in job.candidates]
        archs = {candidate_architecture(spec, base_dir) for spec in job.candidates}
        kind = architecture_kind(archs.pop())  # one kind (`_gradient_mode`)
        for task in own:
            check_rows_fit(task, kind)
        labels = [spec.label for spec in job.candidates]
        weights = weights_of(self.name, labels, {spec.label: spec.params for spec in job.candidates})
        runs = []
        for spec, task, w in zip(job.candidates, own, weights):
            path = resolve_model_path(spec.model)
            model_dir = base_dir if is_adapter_dir(path) else path  # as load_candidate_model
            runs.append(CandidateRun(open_candidate(spec.model, spec.lora), task, model_dir, w))
        # an encoder pool: each task keeps its expert's head; the body is its classifier class's
        heads = {
            r.task.name: h
            for r in runs
            if r.candidate.adapter is None and (h := checkpoint_head(r.model_dir))
        }
        covered = covered_parameters(base_dir, classifier_arch([r.model_dir for r in runs]))
        numel = sum(int(torch.Size(s).numel()) for s in covered.values())
        tokenizer = load_tokenizer(base_dir)
        order, why = layerwise_order(p, base_dir, runs, tokenizer, kind)
        (LOG.info if order == LAYER_MAJOR else LOG.warning)("fisher: layerwise, %s (%s)", order, why)
        if order == LAYER_MAJOR:
            self._layer_major(job, reason, runs, covered, tokenizer, labels, weights, own, why)
            return
        check_free_space(
            job.plan_dir,
            3 * 4 * numel,
            "fisher: gradient: layerwise (its scratch store and two running sums)",
        )
        sums = os.path.join(job.plan_dir, SUMS_DIR)
        scratch = os.path.join(job.plan_dir, SCRATCH_DIR)
        stores = FisherSums(
            DiskSum(os.path.join(sums, "num"), covered),
            DiskSum(os.path.join(sums, "den"), covered),
            lambda: DiskSum(scratch, covered),  # replaces the last candidate's
        )
        metas = fisher_sums(base_dir, runs, covered, tokenizer, p, job.device, stores)
        shutil.rmtree(scratch, ignore_errors=True)
        record = self._layerwise_record(job, labels, own, metas, SUMS_DIR, reason, order, why, heads)
        finish_streamed_plan(self, job, record, heads)
        shutil.rmtree(os.path.join(job.plan_dir, SUMS_DIR), ignore_errors=True)

    def _layer_major(
        self, job: MergeJob, reason, runs, covered, tokenizer, labels, weights, own, why
    ) -> None:
        """Every candidate through the model together, each layer's merge finished before the next:
        the plan folder holds only the merged tensors (`fwllm.solvers.layer_major_fisher`)."""
        p: FisherParams = job.params  # type: ignore[assignment]
        base_dir = resolve_model_path(job.base)
        reader = TensorReader(base_dir)
        # the checkpoints go to file-backed pages in the plan's scratch folder (`fwllm.io.spill`)
        check_free_space(
            job.plan_dir,
            4 * sum(int(torch.Size(reader.shape(n)).numel()) for n in reader.names())
            + held_bytes(base_dir, runs, tokenizer, p),
            "fisher: the merged model and its checkpoints",
        )
        scratch = os.path.join(job.plan_dir, SCRATCH_DIR)
        solver = LayerMajorFisher(base_dir, runs, covered, tokenizer, p, job.device, spill_dir=scratch)
        candidates = {spec.label: run.candidate for spec, run in zip(job.candidates, runs)}
        rest = _averaged(base_dir, candidates, labels, weights, set(covered))
        try:
            write_merged(job.plan_dir, itertools.chain(solver.merged(), rest))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        # no statistic on disk: the Fisher lives on only folded, in the merged tensors
        record = self._layerwise_record(job, labels, own, solver.metas, MERGED_DIR, reason, LAYER_MAJOR, why)
        record.timings = {k: round(v, 3) for k, v in solver.timings.items()}
        write_record(job.plan_dir, record)
        mark_plan_complete(job.plan_dir)

    def _layerwise_record(
        self, job, labels, own, metas, file, reason, order, why, heads=None
    ) -> StatsPlanRecord:
        """The plan record of a layerwise solve: the resolved mode (not auto), each candidate's meta
        and the order it ran in (`file`: where its statistic lives on, the sums or the merged tensors)."""
        p: FisherParams = job.params  # type: ignore[assignment]
        return StatsPlanRecord(
            method=self.name,
            base=job.base,
            settings={**p.model_dump(), "gradient": "layerwise"},
            candidates=[
                CandidateStats(
                    label=lab,
                    task=t.name,
                    file=file,
                    meta={**m, "reason": reason, "order": order, "order_reason": why},
                    cached=False,
                )
                for lab, t, m in zip(labels, own, metas)
            ],
            primary_head=primary_head(job, heads or {}),
        )

    def merged_recomputable(self, plan: Plan) -> bool:
        # a layerwise solve deletes its running sums: its stored merge is the only record of it
        return plan.record.settings.get("gradient") != "layerwise"

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
        if plan.params.gradient == "layerwise":  # the solve's running sums (weights applied there)
            merged = read_sums(plan.folder, name)
            if merged is not None:
                return merged
            return weighted_average((candidates[lab] for lab in labels), weights)
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
                    raise FwllmError(
                        f"fisher: candidate {lab} has no Fisher for {name} (plan from another model?)"
                    )
                check_finite(f"Fisher of candidate {lab}", name, f)
                yield f.to(base.device) / mean

        return fisher_merge(thetas, fishers(), weights, p.epsilon)
