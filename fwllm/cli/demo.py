"""`fwllm demo`: experts -> merges -> task-metric evaluation -> one table."""

from __future__ import annotations

import click

from fwllm.core.errors import FwllmError


@click.command("demo")
@click.option(
    "--profile",
    type=click.Choice(["smol", "tiny"]),
    default="smol",
    show_default=True,
    help="smol: real SmolLM2-135M LoRA experts; tiny: seconds-sized synthetic experts.",
)
@click.option("--out", "out_dir", default="runs/demo", show_default=True, help="Report and cache folder.")
@click.option("--root", default=None, help="Expert cache folder (default $FWLLM_CACHE or ~/.cache/fwllm).")
@click.option(
    "--sizes", default=None, help="Pool sizes, comma separated (default: the whole pool; tiny 4,7)."
)
@click.option("--fw", "fw", multiple=True, metavar="KEY=VALUE", help="FW-Merging recipe parameter override.")
@click.option("--iterations", default=None, type=int, help="FW iterations (same as --fw iterations=N).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-cache", is_flag=True, help="Redo every merge and score.")
def demo_command(profile, out_dir, root, sizes, fw, iterations, device, no_cache):
    """Build experts, merge them (tuned TA, RegMean, FW-Merging), score them with task metrics, print one table."""
    from fwllm.demo.settings import parse_overrides  # torch and mergekit load only when the verb runs
    from fwllm.demo.run import run_demo

    try:
        size_list = [int(n) for n in sizes.split(",")] if sizes else None
    except ValueError:
        raise click.BadParameter(
            f"{sizes!r} is not a comma-separated list of integers", param_hint="--sizes"
        ) from None
    try:
        overrides = parse_overrides(fw)
        if iterations is not None:
            overrides["iterations"] = iterations
        run_demo(profile, out_dir, root, size_list, overrides, device, cache=not no_cache)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
