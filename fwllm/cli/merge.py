"""`fwllm merge RECIPE OUT_DIR`: a drop-in for `mergekit-yaml` that also runs fwllm's methods.

Every failure ends in one `Error: ...` line and a non-zero exit: bad input (`FwllmError`),
mergekit's own complaints, a full disk, and SIGINT / SIGTERM (SIGTERM is turned into an
exception, so the staged output is cleaned up as on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, List, Optional

import click

from fwllm.cli.mergekit_options import click_options, with_merge_options
from fwllm.core.errors import FwllmError
from fwllm.core.method import DataMethod
from fwllm.core.params import AdaMergingParams, FisherParams, FWParams, RegMeanParams
from fwllm.data.calibration import load_calibration
from fwllm.mergekit_glue.recipe import check_early, read_yaml

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

# fwllm's data-informed methods: their recipe parameters and per-model parameters (fwllm.methods.registry,
# spelled out here because importing the registry loads torch; tests/cli checks the two agree)
DATA_METHODS = {
    "adamerging": (AdaMergingParams, ("task",)),
    "fisher": (FisherParams, ("weight", "task")),
    "fw_merging": (FWParams, ("weight", "task")),
    "regmean": (RegMeanParams, ("weight", "task")),
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next gets control (a KeyboardInterrupt, so cleanup is the same)."""


class _Interrupted(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text  # safetensors' writer errors


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def method_schema(name: str) -> DataMethod:
    """What the recipe checks need of one of fwllm's methods, without its solver (which loads torch)."""
    params, per_model = DATA_METHODS[name]
    schema = DataMethod()
    schema.name, schema.Params, schema.per_model = name, params, dict.fromkeys(per_model)
    return schema


def check_inputs_early(recipe: str) -> None:
    """The recipe, the model folders and calibration data it names, checked as the merge will check them,
    before mergekit, torch and transformers load (seconds): a typo in a key or a path is reported at once.

    Only the checks that need none of them, in the merge's order (`check_early`, then the calibration
    data); `load_recipe` and the preflight repeat these and do the rest."""
    _, raw = read_yaml(recipe)
    name = raw.get("merge_method")
    params = check_early(
        recipe, raw, method_schema(name) if isinstance(name, str) and name in DATA_METHODS else None
    )
    if params is not None:
        load_calibration(params.calibration, params.max_rows)


class _MergeCommand(click.Command):
    """`fwllm merge` with mergekit's options, declared without importing mergekit.options (see
    fwllm.cli.mergekit_options): that loads torch and transformers (seconds), which neither --help nor
    a recipe given first on the command line, checked before the options are parsed (`check_inputs_early`),
    waits for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(click_options())

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        recipe = _leading_recipe(args, ctx.help_option_names)
        if recipe is not None and not ctx.resilient_parsing:
            try:
                check_inputs_early(recipe)
            except FwllmError as err:
                raise click.ClickException(str(err)) from None
        return super().parse_args(ctx, args)


def _leading_recipe(args: List[str], help_names: List[str]) -> Optional[str]:
    """RECIPE when it is the first argument: before any option, nothing can be an option's value."""
    if not args or args[0].startswith("-") or any(a in help_names for a in args):
        return None
    return args[0]


@click.command("merge", cls=_MergeCommand)
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT_DIR when it holds an earlier fwllm output (it has .fwllm-output.json and "
    "nothing else); a folder of other files, an input, the current folder, $HOME or a mount "
    "point is never replaced.",
)
@click.option(
    "--no-cache",
    "no_cache",
    is_flag=True,
    help="Solve afresh: reuse no cached or `plan:` plan, statistic or merged adapter.",
)
@click.option(
    "--allow-pickle",
    "allow_pickle",
    is_flag=True,
    help="Also read models whose weights are pickles only (.bin/.pt/.pth); loading a pickle can run code.",
)
@click.option(
    "--lora-out",
    type=click.Path(),
    help="A LoRA pool's FW or RegMean merge: also write it as a peft adapter (or the recipe's lora_out).",
)
@click.option("--lora-rank", type=int, help="With --lora-out: truncate each delta to this rank (SVD).")
def merge_command(**values: Any):
    """Merge RECIPE (a mergekit-yaml recipe) into OUT_DIR; fwllm's methods included."""
    with_merge_options(_merge, values)


def _merge(
    merge_options: MergeOptions,
    recipe: str,
    out_dir: str,
    force: bool,
    no_cache: bool,
    allow_pickle: bool,
    lora_out,
    lora_rank,
):
    from fwllm.mergekit_glue.lora_out import check_lora_out, recipe_lora_out, write_lora_out
    from fwllm.mergekit_glue.merge import merge_recipe

    merge_options.apply_global_options()
    try:
        with _sigterm_raises():
            lora_out, lora_rank = recipe_lora_out(recipe, lora_out, lora_rank)  # the flags win
            if lora_out:
                check_lora_out(recipe, out_dir, lora_out, force)
            path = merge_recipe(
                recipe, out_dir, merge_options, force=force, no_cache=no_cache, allow_pickle=allow_pickle
            )
            if lora_out:
                click.echo(write_lora_out(recipe, path, lora_out, force, lora_rank))
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
    except KeyboardInterrupt as err:
        name, code = ("SIGTERM", 143) if isinstance(err, _Terminated) else ("SIGINT", 130)
        raise _Interrupted(f"interrupted ({name}); no unfinished output was left behind", code) from None
    except Exception as err:
        if os.environ.get("FWLLM_DEBUG"):
            raise
        if _disk_full(err):
            raise click.ClickException(
                f"no space left on device while writing {out_dir} ({_first_line(err)}): "
                f"free some space or choose another OUT_DIR; nothing was replaced"
            ) from None
        if not isinstance(err, (RuntimeError, ValueError, OSError)):
            raise
        # mergekit's own complaints (missing tensors, bad shapes): one line, not a traceback
        raise click.ClickException(f"{type(err).__name__}: {_first_line(err)}") from None
    click.echo(f"merged model written to {path}")
