"""`fwllm demo` — the main job on an embedded default, end to end.

1. build (or reuse) a pool of real, really-trained experts (`fwllm.experts`): relevant
   experts on distinct tasks plus irrelevant ones;
2. merge the whole pool with mergekit's `task_arithmetic` and `ties` and with fwllm's
   `fw_merging`, all through `fwllm merge` recipes written into the output folder;
3. evaluate base, experts and merges on held-out dev rows of every relevant task
   (mean response loss, lower is better) and, for real models, on fwllm's lm-eval
   suites with a small --limit;
4. print one table and write it as JSON and markdown.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import click
import yaml

from fwllm.errors import FwllmError

METHODS = ("task_arithmetic", "ties", "fw_hard")  # fwllm.pool_recipes names


def dev_losses(model_dir: str, pool, tasks: List[str], max_rows: int, max_length: int) -> Dict[str, float]:
    """Mean dev loss per task (the same objective as calibration, on held-out rows)."""
    import torch

    from fwllm.calibration import read_task
    from fwllm.model_io import load_model, load_tokenizer
    from fwllm.objectives import encode_tasks

    model, tok = load_model(model_dir, torch.float32), load_tokenizer(model_dir)
    rows = [read_task(pool.tasks[t].dev, name=t, max_rows=max_rows) for t in tasks]
    return encode_tasks(rows, tok, model, max_length=max_length).per_task(model)


def _table(results: Dict[str, Dict[str, float]], columns: List[str]) -> str:
    head = "| model | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for model, row in results.items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), (int, float)) else "-" for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(profile: str = "smol", out_dir: str = "runs/demo", root: Optional[str] = None,
             limit: int = 20, suites: str = "pubmedqa,glue", iterations: int = 8, device: str = "cpu",
             force: bool = False, skip_lm_eval: bool = False) -> Dict:
    from mergekit.options import MergeOptions

    from fwllm.experts import build_pool
    from fwllm.merge_cli import run_fwllm_merge
    from fwllm.pool_recipes import Member, PoolSettings, recipe_for

    start = time.time()
    pool = build_pool(profile, "llama", root=root, device=device)
    tiny = profile == "tiny"
    settings = PoolSettings(step_size=0.5, max_rows=16, max_length=64, batch_size=8, dtype="float32",
                            iterations=iterations) if tiny else PoolSettings(iterations=iterations)
    os.makedirs(out_dir, exist_ok=True)
    calib = pool.calibration_dir()
    relevant = [e.task for e in pool.experts if e.relevant and e.task]
    members = [Member(e.path, e.task) for e in pool.experts]
    merged = {}
    for method in METHODS:
        recipe = recipe_for(method, pool.base, members, calib, settings)
        path = os.path.join(out_dir, "recipes", f"{method}.yml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe, fp, sort_keys=False)
        target = os.path.join(out_dir, "merged", method)
        click.echo(f"== merging {len(pool.experts)} experts with {method}")
        run_fwllm_merge(path, target, MergeOptions(device=device, quiet=True), force=True)
        merged[method] = target

    models = {"base": pool.base, **{f"expert:{e.name}": e.path for e in pool.experts if e.relevant}, **merged}
    results: Dict[str, Dict[str, float]] = {}
    for label, path in models.items():
        click.echo(f"== dev loss: {label}")
        losses = dev_losses(path, pool, relevant, 16 if tiny else 12, settings.max_length * 2)
        results[label] = {f"{t} loss": v for t, v in losses.items()}
        results[label]["mean loss"] = sum(losses.values()) / len(losses)
    columns = [f"{t} loss" for t in relevant] + ["mean loss"]

    if not tiny and not skip_lm_eval:
        from fwllm.evaluation.runner import evaluate_models

        click.echo(f"== lm-eval suites {suites} (limit {limit})")
        ev = evaluate_models(list(models.values()), suites=suites.split(","), limit=limit, device=device,
                             out_dir=os.path.join(out_dir, "lm_eval"))
        labels = {os.path.abspath(p): lab for lab, p in models.items()}
        for entry in ev["models"].values():
            label = labels.get(os.path.abspath(entry["path"]))
            for task, score in entry["tasks"].items():
                results[label][task] = score["score"]
                if task not in columns:
                    columns.append(task)

    table = _table(results, columns)
    summary = {"profile": profile, "pool": pool.root, "experts": [e.name for e in pool.experts],
               "relevant_tasks": relevant, "settings": asdict(settings), "results": results,
               "seconds": time.time() - start}
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(summary, fp, indent=2)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fp:
        fp.write(f"# fwllm demo ({profile})\n\nPool: {len(pool.experts)} experts "
                 f"({len(relevant)} relevant). Dev losses: lower is better; lm-eval scores x100.\n\n{table}\n")
    click.echo("\n" + table)
    click.echo(f"\nwritten to {os.path.abspath(out_dir)} ({summary['seconds'] / 60:.1f} min)")
    return summary


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
    try:
        run_demo(profile, out_dir, root, limit, suites, iterations, device, skip_lm_eval=skip_lm_eval)
    except FwllmError as err:
        raise click.ClickException(str(err)) from None
