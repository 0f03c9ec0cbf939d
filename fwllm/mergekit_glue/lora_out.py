"""`fwllm merge --lora-out DIR`: a LoRA pool's merge also written as a peft adapter.

Over BASE+ADAPTER candidates every merge fwllm keeps low-rank is a LoRA of rank sum_i r_i
(fwllm.mergekit_glue.lora_adapter):
* FW-Merging with task-arithmetic steps and `refine: none`: W_0 + sum_i c_i s_i B_i A_i, from the
  plan's coefficients and the adapters;
* RegMean, and FW-Merging with `refine: regmean` (the default), on `gradient: layerwise`: the plan
  stores each weight's merge as its factors (fwllm.io.merged_store), written as they are;
* AdaMerging on `gradient: layerwise` over plain LoRA adapters: W_0 + sum_i lambda_i s_i B_i A_i,
  stored the same way.
The recipe is checked before any model loads; the adapter is written from the plan once the full
merge is in OUT_DIR.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from fwllm.core.errors import FwllmError
from fwllm.mergekit_glue.lora_adapter import write_lora_merge
from fwllm.io.adapters import AdapterReader
from fwllm.io.merged_store import merged_factors, stored_names
from fwllm.io.models import resolve_model_path
from fwllm.kernels.low_rank import LowRank
from fwllm.io.staged_output import check_target, refuse_overlap
from fwllm.mergekit_glue.merge import PLAN_SUBDIR, recipe_inputs
from fwllm.mergekit_glue.recipe import load_recipe, merge_job
from fwllm.solvers.lora_terms import pool_is_low_rank


def _lora_candidates(recipe_path: str):
    recipe = load_recipe(recipe_path)
    method = recipe.raw.get("merge_method")
    if method not in ("fw_merging", "regmean", "adamerging"):
        raise FwllmError(f"--lora-out needs merge_method fw_merging, regmean or adamerging (got {method!r})")
    job = merge_job(recipe, "", "cpu", False)
    p = job.params
    if method == "fw_merging" and p.local_merge != "task_arithmetic":
        raise FwllmError(
            f"--lora-out needs local_merge task_arithmetic (got {p.local_merge!r}): "
            f"the plan stores other local merges as dense tensors"
        )
    stored = method in ("regmean", "adamerging") or p.refined  # the plan keeps the merge as factors
    if stored and p.gradient != "layerwise":
        what = method if method != "fw_merging" else "fw_merging with refine: regmean"
        raise FwllmError(
            f"--lora-out of {what} needs gradient: layerwise (got {p.gradient}): that path keeps the "
            f"merge as LoRA factors, the in-RAM one forms dense tensors"
        )
    full = [c.label for c in job.candidates if not c.lora]
    if full:
        raise FwllmError(
            f"--lora-out needs a pool of LoRA adapters (BASE+ADAPTER); {full[0]} is a full model"
        )
    if method == "adamerging" and not pool_is_low_rank(
        [AdapterReader(resolve_model_path(c.lora), lazy=True) for c in job.candidates]
    ):
        raise FwllmError(
            "--lora-out of adamerging needs plain LoRA adapters (no DoRA, modules_to_save or "
            "fan_in_fan_out): only then is its merge kept as LoRA factors"
        )
    return recipe, job


def recipe_lora_out(recipe_path: str, lora_out: Optional[str], rank: Optional[int]) -> tuple:
    """(DIR, rank) of the LoRA output: the command line's, else the recipe's `lora_out` / `lora_rank`."""
    if lora_out or not os.path.isfile(recipe_path):
        return lora_out, rank
    recipe = load_recipe(recipe_path)
    if recipe.method is None:  # mergekit's own method: check_lora_out names the methods that can
        return (recipe.config.parameters or {}).get("lora_out"), rank
    p = recipe.method.validate_params(recipe.config.parameters or {})  # types and ranges: the params'
    return p.lora_out, rank if rank is not None else p.lora_rank


def check_lora_out(recipe_path: str, out_dir: str, lora_out: str, force: bool) -> None:
    """Refuse, before any model loads, a recipe whose merge is not a LoRA, or an unusable DIR."""
    recipe, job = _lora_candidates(recipe_path)
    # the rule OUT_DIR follows: never an input, OUT_DIR itself, the working folder, $HOME or a mount point
    refuse_overlap(
        lora_out, [out_dir, *recipe_inputs(recipe_path, recipe.config, job)], what="--lora-out DIR"
    )
    check_target(os.path.abspath(lora_out), force)


def write_lora_out(
    recipe_path: str, out_dir: str, lora_out: str, force: bool, rank: Optional[int] = None
) -> str:
    """Write the merge recorded in OUT_DIR's plan as a peft adapter in `lora_out`; returns a summary line."""
    from fwllm.methods.registry import METHODS

    # the adapters the recipe names, matched to the plan's candidates by label (as a merge binds them)
    recipe, job = _lora_candidates(recipe_path)
    method = METHODS.get(job.method)
    plan = method.load_plan(os.path.join(out_dir, PLAN_SUBDIR))
    dtype = output_dtype(recipe)
    if plan.merged is not None:  # RegMean or a refined FW: the plan stores the merge itself
        return write_lora_merge(
            stored_factors(plan.merged),
            lora_out,
            rank=rank,
            base_model=plan.record.base,
            dtype=dtype,
            force=force,
        ).summary()
    record = method.bind(plan, job).record
    if not record.adapters:
        # a solve with the full gradient records no adapter folders: the recipe's, in the plan's order
        by_label = {c.label: c.lora for c in job.candidates}
        if list(by_label) != record.candidates:
            raise FwllmError("the plan's candidates are not the recipe's: cannot find their adapters")
        record = record.model_copy(
            update={"adapters": [resolve_model_path(by_label[x]) for x in record.candidates]}
        )
    return write_lora_merge(record, lora_out, rank=rank, dtype=dtype, force=force).summary()


def output_dtype(recipe) -> torch.dtype:
    """The dtype the dense output is written in (mergekit's out_dtype, else dtype; float32 when neither):
    the adapter's factors take it too, so B A is no coarser than the dense merge it stands for."""
    name = recipe.config.out_dtype or recipe.config.dtype or "float32"
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise FwllmError(f"--lora-out: unknown dtype {name!r} in the recipe")
    return value


def stored_factors(index: Dict[str, str]) -> Dict[str, LowRank]:
    """{weight: Delta W} of a plan that stores its merge; one with a dense tensor is not a LoRA."""
    dense, low = stored_names(index)
    if dense:
        raise FwllmError(
            f"the plan stores {sorted(dense)[0]} as a dense tensor (its merge is not low-rank), so it "
            f"cannot be written as a LoRA adapter; write the full merged model instead"
        )
    return {name: LowRank(*merged_factors(index, name)) for name in sorted(low)}
