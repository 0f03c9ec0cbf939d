"""`fwllm experts` — build (or reuse) an expert pool and show how much each expert learnt."""

from __future__ import annotations

import click

from fwllm.errors import FwllmError


def own_task_table(pool, max_rows: int = 32) -> str:
    """Dev loss on each relevant expert's own task: base vs expert (lower is better)."""
    from fwllm.calibration import read_task
    from fwllm.experts.train import dev_loss
    from fwllm.heads import apply_head, head_from_model
    from fwllm.model_io import load_model, load_tokenizer

    tok = load_tokenizer(pool.base)
    lines = ["| expert | task | relevant | base dev loss | expert dev loss |", "|---|---|---|---|---|"]
    for e in pool.experts:
        if not e.task:
            lines.append(f"| {e.name} | - | no | - | - |")
            continue
        data = pool.tasks[e.task]
        rows = read_task(data.dev, max_rows=max_rows)
        expert = load_model(e.path)
        mlm = data.kind == "mlm"
        # classifiers: the base body under the expert's own head, so only the body differs
        base = load_model(pool.base, architecture=type(expert).__name__)
        if hasattr(expert, "classifier"):
            base = apply_head(base, head_from_model(expert))
        lines.append(f"| {e.name} | {e.task} | {'yes' if e.relevant else 'no'} | "
                     f"{dev_loss(base, tok, rows, mlm=mlm):.3f} | {dev_loss(expert, tok, rows, mlm=mlm):.3f} |")
    return "\n".join(lines)


@click.command("experts")
@click.option("--profile", type=click.Choice(["tiny", "smol"]), default="smol", show_default=True)
@click.option("--family", default="llama", show_default=True, help="tiny: llama, roberta, roberta-mlm; smol: llama")
@click.option("--root", default=None, help="Cache folder (default $FWLLM_CACHE or ~/.cache/fwllm).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Rebuild even if a finished pool exists.")
def experts_command(profile, family, root, seed, device, force):
    """Build a pool of really-trained experts offline (cached; a second run reuses it)."""
    from fwllm.experts import build_pool

    try:
        pool = build_pool(profile, family, root=root, seed=seed, device=device, force=force)
        click.echo(f"pool: {pool.root}  (built in {pool.build_seconds / 60:.1f} min)")
        click.echo(own_task_table(pool))
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
