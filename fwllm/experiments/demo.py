"""The main job on an embedded default, end to end (`fwllm demo`).

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

from mergekit.options import MergeOptions

from fwllm.experiments.dev_losses import dev_losses
from fwllm.experiments.pool_recipes import Member, PoolSettings, recipe_for
from fwllm.experts import build_pool
from fwllm.mergekit_glue.merge import merge_recipe

METHODS = ("task_arithmetic", "ties", "fw_hard")  # fwllm.experiments.pool_recipes names


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
        merge_recipe(path, target, MergeOptions(device=device, quiet=True), force=True)
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
        from fwllm.evaluation.runner import evaluate_models  # lm-eval loads only when asked for

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
