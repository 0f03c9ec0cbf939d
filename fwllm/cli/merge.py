"""`fwllm merge RECIPE OUT_DIR`: a drop-in for `mergekit-yaml` that also runs fwllm's methods."""

from __future__ import annotations

import os

import click
from mergekit.options import MergeOptions, add_merge_options

from fwllm.core.errors import FwllmError


@click.command("merge")
@click.argument("recipe", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@add_merge_options
def merge_command(merge_options: MergeOptions, recipe: str, out_dir: str, force: bool):
    """Merge RECIPE (a mergekit-yaml recipe) into OUT_DIR; fwllm's methods included."""
    from fwllm.mergekit_glue.merge import merge_recipe

    merge_options.apply_global_options()
    try:
        path = merge_recipe(recipe, out_dir, merge_options, force=force)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
    except (RuntimeError, ValueError, OSError) as err:
        # mergekit's own complaints (missing tensors, bad shapes): one line, not a traceback
        if os.environ.get("FWLLM_DEBUG"):
            raise
        raise click.ClickException(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else err}") from None
    click.echo(f"merged model written to {path}")
