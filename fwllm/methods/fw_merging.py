"""`merge_method: fw_merging`: FW-Merging (arXiv 2503.12649).

solve:  open the pool, pick where the solve runs (`gradient`), run the FW solver, write
        the plan folder:
          plan.json       settings, candidates, weights, per-tensor atoms (the exact merge)
          trace.json      objective, gamma and chosen vertex per block, per iteration
          trace.png       the objective curve, and the share of blocks choosing each vertex
          reproduce.yml   a plain mergekit `task_arithmetic` recipe with per-tensor weights
                          (when every step is task arithmetic)
          fwllm_heads/    per-task classification heads (encoder pools)
          merged/         the merged tensors of a dense solve (a LoRA pool's merge is its
                          coefficients: each tensor is formed from the adapters when written)
merge:  the stored tensor, or base + sum_a beta_a * atom_a(taus).

`gradient`:
  full       the model in RAM (float32), one backward per evaluation;
  layerwise  the bounded path: a meta-device skeleton, one layer materialised at a time from
             the base's shards; a LoRA pool's iterate is implicit (base weight plus low-rank
             terms), a full-checkpoint pool's iterate lives in an on-disk store;
  auto       full when the in-RAM solve (weights, and one micro-batch's activations and logits,
             `fwllm.core.footprint`) fits comfortably in the free memory, else layerwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fwllm.arch.heads import is_head_tensor, save_heads
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.arch.weight_layout import transposed_weights_of
from fwllm.core.errors import FwllmError
from fwllm.core.footprint import ModelSizes
from fwllm.core.job import MergeJob
from fwllm.core.memory import available_memory
from fwllm.core.method import DataMethod
from fwllm.core.params import FWParams
from fwllm.core.plan import FWPlanRecord, Plan, mark_plan_complete, read_record, write_record
from fwllm.data.calibration import micro_batch_shape
from fwllm.data.objective import encode_tasks
from fwllm.io.adapters import AdapterReader
from fwllm.io.iterate_store import IterateStore, check_free_space
from fwllm.io.merged_store import merged_index, write_merged
from fwllm.io.models import load_tokenizer, read_config, resolve_model_path
from fwllm.io.sketch_store import SketchStore
from fwllm.io.stats_store import read_stat
from fwllm.io.tensors import TensorReader
from fwllm.io.trace_plot import plot_trace
from fwllm.kernels.atoms import block_delta, ta_coefficients
from fwllm.kernels.sketch import CountSketch
from fwllm.methods.common import (
    Pool,
    head_modules,
    load_pool_model,
    open_pool,
    pool_heads,
    primary_head,
    storable,
    stored_or_none,
    write_reproduce_recipe,
)
from fwllm.methods.statistics import measure_grams
from fwllm.solvers.frank_wolfe import FrankWolfe, FWResult
from fwllm.solvers.gradients import FullGradient
from fwllm.solvers.iterates import LoraIterate, ModelIterate, StoreIterate
from fwllm.solvers.lora_terms import LoraTerms, pool_is_low_rank
from fwllm.solvers.plan_atoms import atom_settings, kernel_atoms
from fwllm.solvers.regmean_refine import own_tasks, refine, refine_streamed
from fwllm.solvers.streamed_gradient import StreamedGradient
from fwllm.solvers.streamed_grams import SCRATCH_DIR as REFINE_SCRATCH_DIR, check_streamable

LOG = logging.getLogger(__name__)
ITERATE_DIR, SKETCH_DIR = ".iterate", ".sketches"  # scratch folders of a bounded solve, removed at its end
# `gradient: auto` keeps the model in RAM only while the in-RAM solve needs at most this share
# of the memory that is free now.
AUTO_RAM_SHARE = 0.5


def compact_copy(x: torch.Tensor) -> torch.Tensor:
    """A CPU copy of x, in bfloat16 when that round-trips exactly (a bf16 checkpoint's base)."""
    x = x.detach().to("cpu", torch.float32)
    small = x.to(torch.bfloat16)
    return small if torch.equal(small.float(), x) else x.clone()


def trainable_blocks(pool: Pool, shapes: Dict[str, tuple], names: Sequence[str]) -> List[str]:
    """The model's tensors (`names`, in its order) that some candidate changes: all of them for
    full checkpoints, an adapter's targets for LoRA candidates (embeddings, norms and heads then
    need no gradient). Task heads are never merged."""
    changed = set()
    for c in pool.candidates:
        changed |= set(shapes) if c.adapter is None else set(c.adapter.targets())
    return [n for n in names if n in changed and n in shapes and not is_head_tensor(n)]


def in_ram_bytes(shapes: Dict[str, tuple], blocks: Sequence[str], n: int, ratio: float) -> int:
    """What `gradient: full` holds: theta_t and theta_0 in float32, the gradient of the blocks,
    and their sketches."""
    numel = lambda names: sum(int(torch.Size(shapes[x]).numel()) for x in names)  # noqa: E731
    return 4 * (2 * numel(shapes) + numel(blocks) + int(n * numel(blocks) / ratio))


def choose_gradient(p: FWParams, need: int) -> Tuple[str, str]:
    if p.gradient != "auto":
        return p.gradient, "set in the recipe"
    free = available_memory()
    if need <= AUTO_RAM_SHARE * free:
        return "full", f"the in-RAM solve needs {need / 2**30:.2f} GiB of {free / 2**30:.1f} GiB free"
    return "layerwise", f"the in-RAM solve would need {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free"


class FWMerging(DataMethod):
    name = "fw_merging"
    pretty_name = "FW-Merging (Frank-Wolfe)"
    reference_url = "https://arxiv.org/abs/2503.12649"
    Params = FWParams

    def __init__(self):
        self._adapters: Dict[str, AdapterReader] = {}  # adapter folder -> reader, for merges from factors

    def validate_params(self, raw) -> FWParams:
        p = super().validate_params(raw)
        if p.pairwise and (p.variant != "hard" or p.granularity != "tensor"):
            raise FwllmError("fw_merging: pairwise steps need variant: hard and granularity: tensor")
        if p.hull == "adaptive" and (p.step == "open_loop" or p.pairwise):
            raise FwllmError(
                "fw_merging: hull: adaptive needs step: line_search or adaptive (and no pairwise steps)"
            )
        if p.refined and p.local_merge != "task_arithmetic":
            raise FwllmError(
                f"fw_merging: refine: regmean needs local_merge: task_arithmetic (FW's coefficients "
                f"pick the support); got local_merge: {p.local_merge}"
            )
        return p

    # -- solve ---------------------------------------------------------------------------
    def solve(self, job: MergeJob) -> None:
        p: FWParams = job.params  # type: ignore[assignment]
        torch.manual_seed(p.seed)
        pool = open_pool(job)
        reader = TensorReader(pool.base_dir)
        shapes = {n: reader.shape(n) for n in reader.names()}
        names = [n for n, _ in skeleton(pool.base_dir, pool.architecture).named_parameters()]
        blocks = trainable_blocks(pool, shapes, names)
        weights = [float(c.params.get("weight", 1.0)) for c in job.candidates]
        rows, tokens = micro_batch_shape(pool.tasks, p.batch_size, p.max_length)
        sizes = ModelSizes.from_config(read_config(pool.base_dir))  # + one micro-batch's backward
        need = (
            in_ram_bytes(shapes, blocks, len(pool.candidates), p.sketch_ratio)
            + sizes.activation_bytes(rows, tokens)
            + sizes.logits_bytes(rows, tokens)
        )
        mode, reason = choose_gradient(p, need)
        LOG.info("fw_merging: gradient %s (%s)", mode, reason)
        refine_tasks = self._check_refine(job, pool, mode) if p.refined else None
        heads = pool_heads(pool, job, pool.tasks)
        tokenizer = load_tokenizer(pool.base_dir)
        if mode == "full":
            fw, info = self._in_ram(job, pool, blocks, weights, heads, tokenizer)
        else:
            fw, info = self._streamed(job, pool, blocks, shapes, weights, heads, tokenizer)
        result = fw.run()
        info.update(mode=mode, reason=reason, device=job.device)
        if isinstance(fw.gradient, StreamedGradient):
            meta = fw.gradient.meta
            info.update(
                layer_fetches=meta.fetches,
                peak_resident_bytes=meta.peak_resident_bytes,
                checkpoint_groups=fw.gradient.groups_last,
            )
        self._write_plan(job, pool, fw, result, weights, heads, info, refine_tasks)

    @staticmethod
    def _check_refine(job: MergeJob, pool: Pool, mode: str):
        """What the RegMean refine needs, checked before FW's iterations: each candidate's data, and on
        the bounded path a pool the streamed Gram measurement runs (plain LoRA)."""
        if mode == "layerwise":
            check_streamable(pool.candidates, "fw_merging refine: regmean")
        return own_tasks(job)

    def _in_ram(self, job, pool, blocks, weights, heads, tokenizer):
        p = job.params
        model = load_pool_model(pool, job.device)
        for n, prm in model.named_parameters():
            prm.requires_grad_(n in blocks)
        objective = encode_tasks(
            pool.tasks, tokenizer, model, p.max_length, p.batch_size, head_modules(model, heads, job.device)
        )
        params = dict(model.named_parameters())
        base = {n: compact_copy(params[n]) for n in blocks}
        fw = FrankWolfe(
            ModelIterate({n: params[n] for n in blocks}),
            FullGradient(model, objective, blocks),
            objective,
            pool.candidates,
            weights,
            blocks,
            p,
            lambda n: base[n].to(torch.float32, copy=True),
            job.progress,
            sketches=SketchStore(),
        )
        return fw, {"model_weight_bytes": 4 * sum(x.numel() for x in model.parameters())}

    def _streamed(self, job, pool, blocks, shapes, weights, heads, tokenizer):
        p = job.params
        model = skeleton(pool.base_dir, pool.architecture)
        base_map = base_weights(pool.base_dir)
        objective = encode_tasks(
            pool.tasks, tokenizer, model, p.max_length, p.batch_size, head_modules(model, heads, job.device)
        )

        def base(name: str) -> torch.Tensor:
            return base_map[name].to(torch.float32, copy=True)

        adapters = [c.adapter for c in pool.candidates]
        lora = None
        if p.local_merge == "task_arithmetic" and pool_is_low_rank(adapters):
            lora = LoraTerms(adapters)
            lora.weights = torch.tensor(weights)
            lora.attach(model)
            iterate, dense = LoraIterate(lora, weights, p.scaling, base), []
        else:
            store = IterateStore(os.path.join(job.plan_dir, ITERATE_DIR), {n: shapes[n] for n in blocks})
            iterate, dense = StoreIterate(store), blocks
        meta = MetaModel(model, base_map, job.device, trainable=dense, optional=is_head_tensor)
        gradient = StreamedGradient(
            meta, objective, dense, iterate.view, lora, checkpoint_bytes=int(p.checkpoint_memory * 2**30)
        )
        sketch_dir = (
            None if lora else self._sketch_folder(job, [shapes[n] for n in blocks], len(pool.candidates))
        )
        fw = FrankWolfe(
            iterate,
            gradient,
            objective,
            pool.candidates,
            weights,
            lora.names() if lora else blocks,
            p,
            base,
            job.progress,
            lora,
            sketches=SketchStore(sketch_dir),
        )
        info = {
            "model_weight_bytes": 4 * sum(int(torch.Size(s).numel()) for s in shapes.values()),
            "iterate": "lora coefficients" if lora else "on-disk store",
            "lora_factor_bytes": lora.nbytes if lora else None,
            "sketches": None if lora else ("on disk, read per block" if sketch_dir else "in RAM"),
        }
        return fw, info

    @staticmethod
    def _sketch_folder(job: MergeJob, shapes: Sequence[tuple], n: int) -> Optional[str]:
        """Where the sketches go when they exceed `sketch_memory` GiB of RAM (None: they fit)."""
        sketch = CountSketch(job.params.sketch_ratio)
        need = 4 * n * sum(sketch.buckets(int(torch.Size(s).numel())) for s in shapes)
        if need <= job.params.sketch_memory * 2**30:
            return None
        folder = os.path.join(job.plan_dir, SKETCH_DIR)
        check_free_space(folder, need, "the LMO sketches")
        LOG.info(
            "fw_merging: %.2f GiB of sketches (over sketch_memory = %g GiB) go to %s and are read per block",
            need / 2**30,
            job.params.sketch_memory,
            folder,
        )
        return folder

    def _write_plan(
        self,
        job: MergeJob,
        pool: Pool,
        fw: FrankWolfe,
        result: FWResult,
        weights: List[float],
        heads,
        info: dict,
        refine_tasks=None,
    ) -> None:
        p = job.params
        labels = [c.label for c in job.candidates]
        coefficients = {
            n: ta_coefficients(kernel_atoms(a), weights, p.scaling) for n, a in result.atoms.items()
        }
        refined = p.refined
        streamed_refine = refined and info["mode"] == "layerwise"
        # a LoRA pool's streamed refine is low-rank everywhere: the plan keeps factors, not tensors
        merged = fw.merged_state(factors=streamed_refine and fw.iterate.implicit)
        # a refined LoRA solve stores its merge: the refine is not FW's coefficients on the factors
        implicit = fw.iterate.implicit and not refined
        if streamed_refine:  # the Grams streamed: none kept, no candidate loaded whole
            closed, solved = refine_streamed(
                job,
                pool.candidates,
                refine_tasks,
                pool.base_dir,
                coefficients,
                fw.base,
                pool.architecture,
                check_space=lambda need: check_free_space(
                    job.plan_dir, need, "refine regmean's hidden states"
                ),
            )
            rest = (
                (n, v) for n, v in merged if n not in solved
            )  # runs after `closed`: `solved` is full then
            merged = itertools.chain(closed, rest)
            info["refine"] = "streamed grams"
        elif refined:  # FW chose the support; RegMean merges each linear weight over it
            used = sorted({i for c in coefficients.values() for i, x in enumerate(c) if x > 0})
            gram_files = measure_grams(job, used) if used else {}

            def raw_tau(name):
                base = fw.base(name)
                return lambda i: pool.candidates[i].task_vector(name, base)

            merged = refine(
                merged,
                coefficients,
                lambda i, n: read_stat(gram_files[i], n) if i in gram_files else None,
                raw_tau,
                fw.base,
                p.regmean_alpha,
                weights=p.regmean_weights,
                transposed=transposed_weights_of(pool.base_dir),
            )
            info["refine"] = "gram files"
        all_ta = not refined and all(c is not None for c in coefficients.values())
        record = FWPlanRecord(
            method=self.name,
            base=job.base,
            settings=p.model_dump(),
            primary_head=primary_head(job, heads),
            candidates=labels,
            weights=weights,
            atoms=result.atoms,
            coefficients=coefficients if all_ta else None,
            adapters=[c.adapter.adapter_dir for c in pool.candidates] if implicit else None,
            objective={"initial": result.initial_objective, "final": result.final_objective},
            stochastic=bool(result.trace and result.trace[0].get("minibatch")),
            selected_iteration=result.selected_iteration,
            candidate_bytes_read=result.bytes_read,
            lmo_rescored_tensors=result.rescored,
            solve_seconds=result.seconds,
            gradient=info,
        )
        write_record(job.plan_dir, record)
        with open(os.path.join(job.plan_dir, "trace.json"), "w", encoding="utf-8") as fp:
            json.dump({"trace": result.trace, "final_objective": result.final_objective}, fp)
        plot_trace(
            result.trace,
            labels,
            os.path.join(job.plan_dir, "trace.png"),
            result.selected_iteration,
            result.final_objective,
            result.initial_objective,
        )
        if all_ta:
            write_reproduce_recipe(job.plan_dir, job.base, labels, coefficients, pool.base_dir)
        if heads:
            save_heads(job.plan_dir, heads)
        if not implicit:
            # the solve ends holding the merged blocks: keep them, so executing the plan needs no
            # second pass over the candidates
            write_merged(job.plan_dir, storable(merged))
        for scratch in (ITERATE_DIR, SKETCH_DIR, REFINE_SCRATCH_DIR):
            shutil.rmtree(os.path.join(job.plan_dir, scratch), ignore_errors=True)
        mark_plan_complete(job.plan_dir)

    # -- execute -------------------------------------------------------------------------
    def load_plan(self, plan_dir: str) -> Plan:
        record = read_record(plan_dir, self.name, FWPlanRecord)
        return Plan(plan_dir, record, FWParams(**record.settings), merged_index(plan_dir))

    def bind(self, plan: Plan, job: MergeJob) -> Plan:
        """A LoRA plan's adapters become the job's adapter folders, matched by candidate label."""
        record: FWPlanRecord = plan.record
        if not record.adapters:
            return plan
        by_label = {c.label: c.lora for c in job.candidates}
        missing = [label for label in record.candidates if not by_label.get(label)]
        if missing:
            raise FwllmError(
                f"plan {plan.folder} needs the adapters of {missing}, which the recipe does not give"
            )
        folders = [resolve_model_path(by_label[label]) for label in record.candidates]
        return dataclasses.replace(plan, record=record.model_copy(update={"adapters": folders}))

    def needs_candidates(self, plan: Plan) -> bool:
        return plan.merged is None and not plan.record.adapters

    def merged_recomputable(self, plan: Plan) -> bool:
        return not plan.params.refined  # the refine's Grams are not kept in the plan

    def _adapter(self, folder: str) -> AdapterReader:
        if folder not in self._adapters:
            self._adapters[folder] = AdapterReader(
                folder, lazy=True
            )  # each target is read once: keep nothing
        return self._adapters[folder]

    def merge_tensor(self, plan, name, base, candidates, per_model) -> torch.Tensor:
        record: FWPlanRecord = plan.record
        if name in record.atoms:
            if plan.merged is not None:
                return stored_or_none(plan, name, base)
            if not self.merged_recomputable(plan):
                raise FwllmError(
                    f"plan {plan.folder} stores no merged tensors, and a refine: regmean plan "
                    f"cannot form them again; solve again (--no-cache)"
                )
            base32 = base.float()
            if record.adapters:  # a LoRA pool: theta_0 + sum_i c_i s_i B_i A_i, from the adapters' factors
                out = base32.clone()
                for folder, c in zip(record.adapters, record.coefficients[name]):
                    delta = self._adapter(folder).delta(name, base32) if c else None
                    if delta is not None:
                        out += c * delta
                return out
            labels = record.candidates
            missing = [lab for lab in labels if lab not in candidates]
            if missing:
                raise FwllmError(
                    f"{name}: the plan needs candidates {missing}, which the recipe does not give"
                )
            tau = lambda i: (candidates[labels[i]].float() - base32) * record.weights[i]  # noqa: E731
            return base32 + block_delta(
                kernel_atoms(record.atoms[name]), name, tau, labels, base32, atom_settings(plan.params)
            )
        if is_head_tensor(name) and record.primary_head in candidates:
            return candidates[record.primary_head]  # the loadable checkpoint carries task 1's head
        return base
