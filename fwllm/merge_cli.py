"""`fwllm merge RECIPE OUT_DIR` — a drop-in for `mergekit-yaml` that also runs fwllm's methods.

Same options as mergekit-yaml (taken from mergekit itself), plus `--force`. For
data-informed methods it solves first (the plan lands in OUT_DIR/fwllm_plan), then lets
mergekit's own executor write the tensors. Output is staged and renamed at the end.
"""

from __future__ import annotations

import logging
import os
import shutil

import click
from mergekit.options import MergeOptions, add_merge_options

from fwllm.encoder_pool import classifier_arch, register_body_architecture, with_body_architecture
from fwllm.errors import FwllmError
from fwllm.paths import cache_root

PLAN_SUBDIR = "fwllm_plan"


def run_fwllm_merge(recipe_path: str, out_dir: str, options: MergeOptions, force: bool = False) -> str:
    """Library entry point: merge `recipe_path` into `out_dir`; returns out_dir."""
    from mergekit.merge import run_merge

    from fwllm.data_methods import plan_is_complete
    from fwllm.output import staged_output
    from fwllm.plugin import forget_plans, install_plan, register_all
    from fwllm.recipe import load_recipe, merge_job

    register_all()
    recipe = load_recipe(recipe_path)
    config = recipe.config
    encoder_arch = None
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
            params = dict(config.parameters or {})
            params["plan"] = job.plan_dir
            update = {"parameters": params}
            if isinstance(plan, dict) and plan.get("_merged"):
                # the plan already holds the merged tensors: mergekit needs no candidate inputs
                update["models"] = [m for m in config.models if m.model == config.base_model] or [
                    type(config.models[0])(model=config.base_model)]
            config = config.model_copy(update=update)
            encoder_arch = classifier_arch([c.model for c in job.candidates if not c.lora and os.path.isdir(c.model)])
            if encoder_arch:
                config = with_body_architecture(config, register_body_architecture(encoder_arch))
        run_merge(config, staging, options=options, config_source=recipe.source)
        heads = os.path.join(staging, PLAN_SUBDIR, "fwllm_heads")
        if os.path.isdir(heads):
            shutil.copytree(heads, os.path.join(staging, "fwllm_heads"))
            if recipe.method is not None and encoder_arch:
                _attach_first_head(staging, job)
    return os.path.abspath(out_dir)


def _attach_first_head(out_dir: str, job) -> None:
    """The merged checkpoint carries the head of the first candidate (in recipe order) with a task."""
    from fwllm.encoder_pool import attach_primary_head
    from fwllm.heads import load_heads

    tasks = load_heads(out_dir)
    first = next((c for c in job.candidates if c.params.get("task") in tasks), None)
    if first is not None:
        attach_primary_head(out_dir, first.params["task"], first.model)


@click.command("merge")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@add_merge_options
def merge_command(merge_options: MergeOptions, recipe: str, out_dir: str, force: bool):
    """Merge RECIPE (a mergekit-yaml recipe) into OUT_DIR; fwllm's methods included."""
    merge_options.apply_global_options()
    try:
        path = run_fwllm_merge(recipe, out_dir, merge_options, force=force)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
    except (RuntimeError, ValueError, OSError) as err:
        # mergekit's own complaints (missing tensors, bad shapes): one line, not a traceback
        if os.environ.get("FWLLM_DEBUG"):
            raise
        raise click.ClickException(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else err}") from None
    click.echo(f"merged model written to {path}")
