"""`fwllm merge --lora-out DIR`: an FW-Merging LoRA pool's merge also written as a peft adapter.

FW-Merging with task-arithmetic steps over BASE+ADAPTER candidates merges to
W_0 + sum_i c_i s_i B_i A_i per tensor: a LoRA of rank sum_i r_i (fwllm.mergekit_glue.lora_adapter). The
recipe is checked before any model loads; the adapter is written from the plan once the full
merge is in OUT_DIR.
"""

from __future__ import annotations

import os
from typing import Optional

from fwllm.core.errors import FwllmError
from fwllm.mergekit_glue.lora_adapter import write_lora_merge
from fwllm.io.models import resolve_model_path
from fwllm.io.staged_output import check_target, refuse_overlap
from fwllm.mergekit_glue.merge import PLAN_SUBDIR, recipe_inputs
from fwllm.mergekit_glue.recipe import load_recipe, merge_job


def _lora_candidates(recipe_path: str):
    recipe = load_recipe(recipe_path)
    if recipe.raw.get("merge_method") != "fw_merging":
        raise FwllmError(f"--lora-out needs merge_method fw_merging (got {recipe.raw.get('merge_method')!r})")
    job = merge_job(recipe, "", "cpu", False)
    if job.params.local_merge != "task_arithmetic":
        raise FwllmError(
            f"--lora-out needs local_merge task_arithmetic (got {job.params.local_merge!r}): "
            f"the plan stores other local merges as dense tensors"
        )
    if job.params.refined:
        raise FwllmError(
            "--lora-out needs refine: none (the default is refine: regmean; or write preset: paper): "
            "the plan stores the RegMean refine as dense tensors"
        )
    full = [c.label for c in job.candidates if not c.lora]
    if full:
        raise FwllmError(
            f"--lora-out needs a pool of LoRA adapters (BASE+ADAPTER); {full[0]} is a full model"
        )
    return recipe, job


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
    _, job = _lora_candidates(recipe_path)
    method = METHODS.get("fw_merging")
    record = method.bind(method.load_plan(os.path.join(out_dir, PLAN_SUBDIR)), job).record
    if not record.adapters:
        # a solve with the full gradient records no adapter folders: the recipe's, in the plan's order
        by_label = {c.label: c.lora for c in job.candidates}
        if list(by_label) != record.candidates:
            raise FwllmError("the plan's candidates are not the recipe's: cannot find their adapters")
        record = record.model_copy(
            update={"adapters": [resolve_model_path(by_label[x]) for x in record.candidates]}
        )
    return write_lora_merge(record, lora_out, rank=rank, force=force).summary()
