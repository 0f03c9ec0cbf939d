"""`fwllm merge --lora-out DIR`: an FW-Merging LoRA pool's merge also written as a peft adapter.

FW-Merging with task-arithmetic steps over BASE+ADAPTER candidates merges to
W_0 + sum_i c_i s_i B_i A_i per tensor: a LoRA of rank sum_i r_i (fwllm.mergekit_glue.lora_adapter). The
recipe is checked before any model loads; the adapter is written from the plan once the full
merge is in OUT_DIR.
"""

from __future__ import annotations

import os
from typing import List, Optional

from fwllm.core.errors import FwllmError
from fwllm.core.plan import FWPlanRecord, read_record
from fwllm.mergekit_glue.lora_adapter import write_lora_merge
from fwllm.io.models import resolve_model_path
from fwllm.io.staged_output import check_target
from fwllm.mergekit_glue.merge import PLAN_SUBDIR
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
    return job.candidates


def check_lora_out(recipe_path: str, out_dir: str, lora_out: str, force: bool) -> None:
    """Refuse, before any model loads, a recipe whose merge is not a LoRA, or an unusable DIR."""
    _lora_candidates(recipe_path)
    lora, out = os.path.abspath(lora_out), os.path.abspath(out_dir)
    if lora == out or lora.startswith(out + os.sep) or out.startswith(lora + os.sep):
        raise FwllmError(f"--lora-out {lora_out} must be outside OUT_DIR {out_dir} (and not contain it)")
    check_target(lora, force)


def write_lora_out(
    recipe_path: str, out_dir: str, lora_out: str, force: bool, rank: Optional[int] = None
) -> str:
    """Write the merge recorded in OUT_DIR's plan as a peft adapter in `lora_out`; returns a summary line."""
    record = read_record(os.path.join(out_dir, PLAN_SUBDIR), "fw_merging", FWPlanRecord)
    if not record.adapters:
        # a solve with the full gradient records no adapter folders: take them from the recipe
        candidates = _lora_candidates(recipe_path)
        if [c.label for c in candidates] != record.candidates:
            raise FwllmError("the plan's candidates are not the recipe's: cannot find their adapters")
        adapters: List[str] = [resolve_model_path(c.lora) for c in candidates]
        record = record.model_copy(update={"adapters": adapters})
    return write_lora_merge(record, lora_out, rank=rank, force=force).summary()
