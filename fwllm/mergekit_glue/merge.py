"""`merge_recipe`: the library entry point behind `fwllm merge`.

Same recipe language and options as `mergekit-yaml`. For fwllm's data-informed methods it
checks every input first (`preflight`: the calibration rows, the pool's tensors, adapters,
labels; before any model is loaded), solves (the plan lands in OUT_DIR/fwllm_plan, with the
identities of what it was made from in `inputs.json`), then lets mergekit's own executor
write the tensors (through `StreamingTensorWriter`, so `--out-shard-size` costs no memory).
Output is staged and renamed into place at the end, under OUT_DIR's lock.

Caches are keyed by content (`fwllm.io.identity`): a `plan:` folder is reused only when its
recorded inputs match, and the LoRA merge cache (mergekit's `--lora-merge-cache`, which
mergekit itself keys by folder name) gets a sub-folder per content key. `no_cache` solves
and merges adapters afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Iterator, Optional

from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from fwllm.arch.encoder_pool import (
    attach_first_task_head,
    classifier_arch,
    register_body_architecture,
    with_body_architecture,
)
from fwllm.arch.heads import HEADS_DIR
from fwllm.core.paths import cache_root
from fwllm.core.plan import plan_is_complete
from fwllm.core.trust import check_trusted
from fwllm.io.identity import digest, model_identity
from fwllm.io.staged_output import (
    PLAN_WAIT,
    check_plan_folder,
    folder_lock,
    is_plan_folder,
    lock_timeout,
    refuse_overlap,
    staged_output,
)
from fwllm.mergekit_glue.adapter import forget_plans, install_plan, register_all, start_run
from fwllm.mergekit_glue.finish import finish_output
from fwllm.mergekit_glue.inputs import check_plan_inputs, job_inputs, solve_recorded
from fwllm.mergekit_glue.preflight import check_job
from fwllm.mergekit_glue.recipe import load_recipe, merge_job
from fwllm.mergekit_glue.streaming_writer import streaming_output
from fwllm.mergekit_glue.weight_files import check_recipe_weights

PLAN_SUBDIR = "fwllm_plan"
LORA_DONE = "COMPLETE"  # written once mergekit has merged every adapter of the folder


def _lora_key(config, options: MergeOptions) -> str:
    refs = sorted(
        {
            (str(r), r.model.path, r.model.revision, r.lora.path, r.lora.revision)
            for r in config.referenced_models()
            if r.lora
        },
        key=lambda r: r[0],
    )
    parts = {ref: model_identity(m, mr) + "+" + model_identity(a, ar) for ref, m, mr, a, ar in refs}
    parts["dtype"] = str(options.lora_merge_dtype)
    return digest(parts)[len("sha256:") :][:24]


@contextlib.contextmanager
def lora_merge_cache(config, options: MergeOptions, no_cache: bool) -> Iterator[MergeOptions]:
    """The options with a content-keyed LoRA merge cache (when the recipe names adapters).

    mergekit reuses `<cache>/<model name>_<adapter name>` whatever it now holds, and keeps a
    half-written one after an interrupt. The key folder is complete only once marked so."""
    if not any(ref.lora for ref in config.referenced_models()):
        yield options
        return
    root = options.lora_merge_cache or os.path.join(cache_root(), "lora_merged")
    folder = os.path.join(root, _lora_key(config, options))
    with folder_lock(folder, "LoRA merge cache", lock_timeout(PLAN_WAIT)):
        if os.path.isfile(os.path.join(folder, LORA_DONE)):
            check_trusted("LoRA merge cache", folder)  # merged weights another account could have written
        if no_cache or not os.path.isfile(os.path.join(folder, LORA_DONE)):
            shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        yield options.model_copy(update={"lora_merge_cache": folder})
        with open(os.path.join(folder, LORA_DONE), "w", encoding="utf-8") as fp:
            fp.write("ok\n")


def _plan_lock(user_plan: Optional[str]):
    if not user_plan:
        return contextlib.nullcontext()
    return folder_lock(user_plan, "plan folder", lock_timeout(PLAN_WAIT))


def recipe_inputs(recipe_path: str, config, job=None) -> list:
    """Every local path the merge reads: the recipe, its models and adapters, calibration, plan."""
    paths = [recipe_path]
    for ref in config.referenced_models():
        paths += [ref.model.path, ref.lora.path if ref.lora else None]
    paths = [p for p in paths if p and os.path.exists(p)]  # a Hub id names no local folder
    if job is not None:
        paths += [p for p in (job.params.calibration, job.params.plan) if p]  # the plan may be yet to come
    return paths


def merge_recipe(
    recipe_path: str,
    out_dir: str,
    options: MergeOptions,
    force: bool = False,
    no_cache: bool = False,
    allow_pickle: bool = False,
) -> str:
    """Merge `recipe_path` into `out_dir`; returns out_dir. `no_cache` reuses no plan or statistic;
    `allow_pickle` lets a model with pickle weights only be read.

    `force` replaces an earlier fwllm output only; OUT_DIR may never be, hold or lie inside an
    input, be or hold the current folder or $HOME, or be a mount point (checked before any model
    loads, as is the `plan:` folder: missing, empty, or one holding a plan)."""
    register_all()
    recipe = load_recipe(recipe_path)
    config = recipe.config
    check_recipe_weights(config.referenced_models(), allow_pickle)
    encoder_arch, job, inputs, user_plan = None, None, None, None
    if recipe.method is not None:
        job = merge_job(recipe, "", options.device or "cpu", not options.quiet)
        job.no_cache = no_cache or job.params.no_cache
        check_job(job)
        inputs = job_inputs(job)
        user_plan = job.params.plan
        if user_plan:
            check_plan_folder(user_plan)
    refuse_overlap(out_dir, recipe_inputs(recipe_path, config, job))
    with _plan_lock(user_plan):
        reuse = bool(user_plan) and plan_is_complete(user_plan) and not job.no_cache
        if reuse:
            check_plan_inputs(user_plan, inputs)
        fresh = no_cache or bool(job and job.no_cache)
        with (
            lora_merge_cache(config, options, fresh) as options,
            staged_output(out_dir, force=force) as staging,
        ):
            if recipe.method is not None:
                job.plan_dir = os.path.join(staging, PLAN_SUBDIR)
                if reuse:
                    logging.info("reusing plan %s", user_plan)
                    shutil.copytree(user_plan, job.plan_dir)
                else:
                    solve_recorded(recipe.method, job, inputs)
                    if user_plan:
                        with staged_output(
                            user_plan, force=True, lock=False, what="plan folder", replaceable=is_plan_folder
                        ) as kept:
                            shutil.copytree(job.plan_dir, kept, dirs_exist_ok=True)
                forget_plans()
                plan = recipe.method.bind(recipe.method.load_plan(job.plan_dir), job)
                install_plan(job.plan_dir, plan)
                update = {"parameters": dict(config.parameters or {}, plan=job.plan_dir)}
                if not recipe.method.needs_candidates(plan):
                    # the plan already holds the merged tensors: mergekit needs no candidate inputs
                    update["models"] = [m for m in config.models if m.model == config.base_model] or [
                        type(config.models[0])(model=config.base_model)
                    ]
                config = config.model_copy(update=update)
                full = [c.model for c in job.candidates if not c.lora and os.path.isdir(c.model)]
                encoder_arch = classifier_arch(full)
                if encoder_arch:
                    config = with_body_architecture(config, register_body_architecture(encoder_arch))
            start_run()  # (the startup hook does this too, when it is installed)
            with streaming_output():  # no output shard is ever held whole in memory
                run_merge(config, staging, options=options, config_source=recipe.source)
            finish_output(staging, out_dir, recipe, job, options, None if reuse else user_plan)
            heads = os.path.join(staging, PLAN_SUBDIR, HEADS_DIR)
            if os.path.isdir(heads):
                shutil.copytree(heads, os.path.join(staging, HEADS_DIR))
                if encoder_arch:
                    attach_first_task_head(staging, job.candidates)
    return os.path.abspath(out_dir)
