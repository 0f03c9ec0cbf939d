"""What `fwllm merge` does to its staged output once mergekit has written it.

* the model card gets the output's name and the recipe's candidates (`card.write_card`);
* tied embeddings that LoRA adapters save in full are untied as peft does
  (`fwllm.arch.tied_weights`);
* the plan's stored merged tensors are deleted (a float32 copy of the whole merge, 2x a bf16
  model: 27 GB at 7B) unless the recipe says `keep_merged: true`, or the plan cannot form
  them again (FW-Merging's `refine: regmean` and the layerwise RegMean and Fisher keep no statistic; a LoRA
  pool's RegMean or refine is stored as LoRA factors, which is what `--lora-out` writes). A plan
  without them is still reusable: mergekit is then handed the candidates and each method
  merges from the plan's statistics or atoms.
"""

from __future__ import annotations

import logging
from typing import Optional

from mergekit.options import MergeOptions

from fwllm.arch.tied_weights import untie_saved_heads
from fwllm.core.job import MergeJob
from fwllm.io.candidates import open_candidate
from fwllm.io.merged_store import drop_merged
from fwllm.io.models import resolve_model_path
from fwllm.mergekit_glue.card import write_card
from fwllm.mergekit_glue.recipe import Recipe

LOG = logging.getLogger(__name__)


def finish_output(
    staging: str,
    out_dir: str,
    recipe: Recipe,
    job: Optional[MergeJob],
    options: MergeOptions,
    written_plan: Optional[str] = None,
) -> None:
    """`written_plan`: the user's `plan:` folder when this run solved into it (its copy of the
    merged tensors goes too); None when the plan was reused or not kept."""
    if options.write_model_card:
        write_card(staging, out_dir, recipe.config, recipe.source)
    if job is None:
        return
    untie_saved_heads(
        staging,
        resolve_model_path(job.base),
        [open_candidate(c.model, c.lora).adapter for c in job.candidates],
    )
    plan = recipe.method.load_plan(job.plan_dir)
    if plan.merged is None or job.params.keep_merged:
        return
    if not recipe.method.merged_recomputable(plan):
        LOG.info(
            "%s: the plan keeps its merged tensors (they cannot be formed again from it)", recipe.method.name
        )
        return
    for folder in (job.plan_dir, written_plan):
        if folder:
            drop_merged(folder)
