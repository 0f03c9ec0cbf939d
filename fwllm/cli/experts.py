"""`fwllm experts` — build (or reuse) an expert pool and show how much each expert learnt."""

from __future__ import annotations

import click

from fwllm.core.errors import FwllmError


@click.command("experts")
@click.option(
    "--profile",
    type=click.Choice(["tiny", "smol"]),
    default="smol",
    show_default=True,
    help="smol: SmolLM2-135M + LoRA experts on real data (about 10 min on 2 cores); tiny: seconds.",
)
@click.option(
    "--family", default="llama", show_default=True, help="tiny: llama, roberta, roberta-mlm; smol: llama"
)
@click.option("--root", default=None, help="Cache folder (default $FWLLM_CACHE or ~/.cache/fwllm).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if a finished pool exists.")
@click.option("--dev-rows", default=32, show_default=True, help="Dev rows per task for the summary table.")
def experts_command(profile, family, root, seed, device, force, dev_rows):
    """Build a pool of really-trained experts offline (cached; a second run reuses it)."""
    from fwllm.experts import build_pool
    from fwllm.experts.report import format_table, own_task_table

    try:
        pool = build_pool(profile, family, root=root, seed=seed, device=device, force=force)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"pool: {pool.root}")
    click.echo(
        f"{len(pool.experts)} experts ({sum(e.relevant for e in pool.experts)} relevant), "
        f"built in {pool.build_seconds / 60:.1f} min"
    )
    click.echo(format_table(own_task_table(pool, dev_rows, device)))
