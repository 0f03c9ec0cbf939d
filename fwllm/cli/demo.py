"""`fwllm demo`: experts -> merges -> evaluation -> one table."""

from __future__ import annotations

import click

from fwllm.core.errors import FwllmError


@click.command("demo")
@click.option("--profile", type=click.Choice(["smol", "tiny"]), default="smol", show_default=True,
              help="smol: real SmolLM2-135M LoRA experts; tiny: seconds-sized synthetic experts.")
@click.option("--out", "out_dir", default="runs/demo", show_default=True)
@click.option("--root", default=None, help="Expert cache folder (default $FWLLM_CACHE or ~/.cache/fwllm).")
@click.option("--limit", default=20, show_default=True, help="lm-eval documents per task.")
@click.option("--suites", default="pubmedqa,glue", show_default=True)
@click.option("--iterations", default=8, show_default=True, help="FW iterations.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--skip-lm-eval", is_flag=True, help="Only the dev-loss columns.")
def demo_command(profile, out_dir, root, limit, suites, iterations, device, skip_lm_eval):
    """Build experts, merge them (TA, TIES, FW-Merging), evaluate, print one table."""
    from fwllm.experiments.demo import run_demo  # torch and mergekit load only when the verb runs

    try:
        run_demo(profile, out_dir, root, limit, suites, iterations, device, skip_lm_eval=skip_lm_eval)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
