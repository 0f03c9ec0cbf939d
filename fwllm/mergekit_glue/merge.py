"""`merge_recipe`: the library entry point behind `fwllm merge`.

Same recipe language and options as `mergekit-yaml`. For fwllm's data-informed methods it
solves first (the plan lands in OUT_DIR/fwllm_plan), then lets mergekit's own executor
write the tensors. Output is staged and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil

from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from fwllm.arch.encoder_pool import (
    attach_first_task_head, classifier_arch, register_body_architecture, with_body_architecture,
)
from fwllm.arch.heads import HEADS_DIR
from fwllm.core.paths import cache_root
from fwllm.core.plan import plan_is_complete
from fwllm.io.staged_output import staged_output
from fwllm.mergekit_glue.adapter import forget_plans, install_plan, register_all
from fwllm.mergekit_glue.recipe import load_recipe, merge_job

PLAN_SUBDIR = "fwllm_plan"


def merge_recipe(recipe_path: str, out_dir: str, options: MergeOptions, force: bool = False) -> str:
    """Merge `recipe_path` into `out_dir`; returns out_dir."""
    register_all()
    recipe = load_recipe(recipe_path)
    config = recipe.config
    encoder_arch, job = None, None
    if options.lora_merge_cache is None and any(ref.lora for ref in config.referenced_models()):
        # mergekit refuses BASE+ADAPTER references without a folder for the merged copies
        options = options.model_copy(update={"lora_merge_cache": os.path.join(cache_root(), "lora_merged")})
    with staged_output(out_dir, force=force) as staging:
        if recipe.method is not None:
            job = merge_job(recipe, os.path.join(staging, PLAN_SUBDIR), options.device or "cpu", not options.quiet)
            user_plan = job.params.plan
            if user_plan and plan_is_complete(user_plan):
                logging.info("reusing plan %s", user_plan)
                shutil.copytree(user_plan, job.plan_dir)
            else:
                recipe.method.solve(job)
                if user_plan:
                    shutil.copytree(job.plan_dir, user_plan, dirs_exist_ok=True)
            forget_plans()
            plan = recipe.method.load_plan(job.plan_dir)
            install_plan(job.plan_dir, plan)
            update = {"parameters": dict(config.parameters or {}, plan=job.plan_dir)}
            if plan.merged is not None:
                # the plan already holds the merged tensors: mergekit needs no candidate inputs
                update["models"] = [m for m in config.models if m.model == config.base_model] or [
                    type(config.models[0])(model=config.base_model)]
            config = config.model_copy(update=update)
            encoder_arch = classifier_arch([c.model for c in job.candidates if not c.lora and os.path.isdir(c.model)])
            if encoder_arch:
                config = with_body_architecture(config, register_body_architecture(encoder_arch))
        run_merge(config, staging, options=options, config_source=recipe.source)
        heads = os.path.join(staging, PLAN_SUBDIR, HEADS_DIR)
        if os.path.isdir(heads):
            shutil.copytree(heads, os.path.join(staging, HEADS_DIR))
            if encoder_arch:
                attach_first_task_head(staging, job.candidates)
    return os.path.abspath(out_dir)
