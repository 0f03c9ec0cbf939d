"""The merge matrix: merge methods x pools of an expert pool, evaluated on held-in and
held-out tasks, written as one report (what eval/compare.py runs).

Pools are prefixes of the expert list ordered relevant-first, so with the `smol` pool
(4 relevant, 4 irrelevant experts) `sizes=(4, 8)` compares "the relevant experts" with
"the same plus 4 irrelevant ones"; more sizes make the N-growing curve.

Two kinds of evidence, kept apart as in "What Matters for Model Merging at Scale?"
(arXiv 2410.03617):
* held-in: the tasks of the relevant experts in that pool. Dev loss on each task's
  held-out dev rows (every profile), and, for real models, the lm-eval task of that
  expert (`HELD_IN`), with the normalized score merged / expert x 100;
* held-out: lm-eval tasks none of the experts trained on (raw scores x100).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

from mergekit.options import MergeOptions

from fwllm.core.errors import FwllmError
from fwllm.evaluation.report import plot_normalized_vs_candidates
from fwbench.dev_losses import dev_losses
from fwllm.demo.recipes import (
    FALLBACK_TASK,
    RECIPE_METHODS,
    PoolSettings,
    ordered_members,
    recipe_for,
    write_pool_calibration,
)
from fwllm.mergekit_glue.merge import merge_recipe

# an expert's task (pool task name) -> the lm-eval task that scores it
HELD_IN = {
    "math": "fwllm_gsm8k",
    "pubmedqa": "fwllm_pubmedqa",
    "code": "fwllm_humaneval",
    "sst2": "fwllm_glue_sst2",
}
MATRIX_METHODS = (
    "average",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "fisher",
    "regmean",
    "adamerging",
    "fw_hard",
    "fw_soft",
)


@dataclass
class MatrixSettings:
    methods: Sequence[str] = MATRIX_METHODS
    sizes: Sequence[int] = (4, 8)
    suites: str = "pubmedqa,glue"  # "" = dev losses only
    limit: Optional[int] = 20
    dev_rows: int = 12
    device: str = "cpu"
    confirm_run_unsafe_code: bool = False
    merge: PoolSettings = field(default_factory=PoolSettings)


def summarize(
    cells: List[dict], scores: Dict[str, Dict[str, float]], experts: Dict[str, str], held_out: Sequence[str]
) -> List[dict]:
    """Per merged cell: mean dev loss, held-in normalized score, held-out mean score.

    `scores[label][lm_eval_task]` are x100 scores; `experts[task]` is the label of that
    task's expert. A held-in task counts only when its expert was scored.
    """
    out = []
    for cell in cells:
        label = cell["label"]
        row = {k: cell[k] for k in ("method", "n_candidates", "n_irrelevant", "label")}
        row["mean_dev_loss"] = sum(cell["dev_loss"].values()) / len(cell["dev_loss"])
        normalized = []
        for task in cell["held_in"]:
            lm_task = HELD_IN.get(task)
            expert = scores.get(experts.get(task, ""), {}).get(lm_task)
            mine = scores.get(label, {}).get(lm_task)
            if expert is not None and mine is not None and expert > 0:
                normalized.append(100.0 * mine / expert)
        row["held_in_normalized"] = sum(normalized) / len(normalized) if normalized else None
        outs = [scores.get(label, {}).get(t) for t in held_out]
        outs = [v for v in outs if v is not None]
        row["held_out_mean"] = sum(outs) / len(outs) if outs else None
        out.append(row)
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.1f}"


def summary_table(rows: List[dict]) -> str:
    lines = [
        "| pool | method | mean dev loss (held-in) | held-in normalized % | held-out mean score |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        pool = f"{r['n_candidates']} ({r['n_irrelevant']} irrelevant)"
        lines.append(
            f"| {pool} | {r['method']} | {_fmt(r['mean_dev_loss'])} | {_fmt(r['held_in_normalized'])} | "
            f"{_fmt(r['held_out_mean'])} |"
        )
    return "\n".join(lines)


def run_matrix(pool, out_dir: str, s: MatrixSettings, progress: bool = True) -> dict:
    """Merge every (size, method) cell, evaluate, write report.md/results.json/plots."""
    unknown = [m for m in s.methods if m not in RECIPE_METHODS]
    if unknown:
        raise FwllmError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPE_METHODS)}")
    members = ordered_members(pool)
    if not s.sizes or any(n < 1 or n > len(members) for n in s.sizes):
        raise FwllmError(f"pool sizes must be in 1..{len(members)} (the pool has {len(members)} experts)")
    start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    cells = []
    for n in s.sizes:
        chosen = members[:n]
        tasks = [m.task for m in chosen if m.task]
        if not tasks:
            raise FwllmError(f"a pool of {n} has no relevant expert: nothing is held in")
        calib = write_pool_calibration(pool, tasks, os.path.join(out_dir, f"pool{n}", "calibration"), False)
        calib_mix = write_pool_calibration(
            pool, tasks, os.path.join(out_dir, f"pool{n}", "calibration_per_model"), True
        )
        for method in s.methods:
            label = f"{method}@{n}"
            folder = calib_mix if method in ("fisher", "regmean") else calib
            recipe = recipe_for(method, pool.base, chosen, folder, s.merge, fallback_task=FALLBACK_TASK)
            recipe_path = os.path.join(out_dir, f"pool{n}", "recipes", f"{method}.yml")
            os.makedirs(os.path.dirname(recipe_path), exist_ok=True)
            with open(recipe_path, "w", encoding="utf-8") as fp:
                yaml.safe_dump(recipe, fp, sort_keys=False)
            target = os.path.join(out_dir, f"pool{n}", "merged", method)
            if progress:
                print(f"== {label}: merging {n} experts", flush=True)
            t0 = time.time()
            merge_recipe(recipe_path, target, MergeOptions(device=s.device, quiet=True), force=True)
            merge_s = time.time() - t0
            losses = dev_losses(target, pool, tasks, s.dev_rows, s.merge.max_length * 2)
            cells.append(
                {
                    "label": label,
                    "method": method,
                    "n_candidates": n,
                    "n_irrelevant": sum(1 for m in chosen if not m.task),
                    "held_in": tasks,
                    "path": target,
                    "merge_seconds": round(merge_s, 1),
                    "dev_loss": losses,
                }
            )

    relevant = sorted({t for c in cells for t in c["held_in"]})
    references = {"base": pool.base, **{f"expert:{e.name}": e.path for e in pool.experts if e.relevant}}
    reference_losses = {
        lab: dev_losses(p, pool, relevant, s.dev_rows, s.merge.max_length * 2)
        for lab, p in references.items()
    }
    scores: Dict[str, Dict[str, float]] = {}
    held_out: List[str] = []
    experts = {e.task: f"expert:{e.name}" for e in pool.experts if e.relevant}
    if s.suites:
        from fwllm.evaluation.runner import evaluate_models  # lm-eval loads only when asked for

        labelled = {**references, **{c["label"]: c["path"] for c in cells}}
        ev = evaluate_models(
            list(labelled.values()),
            suites=s.suites.split(","),
            limit=s.limit,
            device=s.device,
            out_dir=os.path.join(out_dir, "lm_eval"),
            confirm_run_unsafe_code=s.confirm_run_unsafe_code,
            progress=progress,
        )
        by_path = {os.path.realpath(p): lab for lab, p in labelled.items()}
        for entry in ev["models"].values():
            scores[by_path[os.path.realpath(entry["path"])]] = {
                t: r["score"] for t, r in entry["tasks"].items()
            }
        trained_on = {HELD_IN[t] for t in relevant if t in HELD_IN}
        held_out = [t for t in ev["tasks"] if t not in trained_on]

    rows = summarize(cells, scores, experts, held_out)
    report = _write_report(
        out_dir, pool, s, cells, rows, scores, reference_losses, relevant, held_out, time.time() - start
    )
    return report


def _write_report(
    out_dir, pool, s, cells, rows, scores, reference_losses, relevant, held_out, seconds
) -> dict:
    table = summary_table(rows)
    loss_lines = ["| model | " + " | ".join(relevant) + " |", "|---|" + "---|" * len(relevant)]
    for lab, losses in {**reference_losses, **{c["label"]: c["dev_loss"] for c in cells}}.items():
        loss_lines.append(f"| {lab} | " + " | ".join(_fmt(losses.get(t)) for t in relevant) + " |")
    score_tasks = sorted({t for v in scores.values() for t in v})
    score_lines = []
    if score_tasks:
        score_lines = ["| model | " + " | ".join(score_tasks) + " |", "|---|" + "---|" * len(score_tasks)]
        for lab, v in scores.items():
            score_lines.append(f"| {lab} | " + " | ".join(_fmt(v.get(t)) for t in score_tasks) + " |")
    plots = {}
    metric, ylabel = (
        ("held_in_normalized", "held-in normalized score (%)")
        if scores
        else ("mean_dev_loss", "mean held-in dev loss (lower is better)")
    )
    points = [dict(r, normalized_score=r[metric]) for r in rows if r[metric] is not None]
    if points and len(s.sizes) > 1:
        n_rel = sum(1 for e in pool.experts if e.relevant)
        path = os.path.join(out_dir, "vs_candidates.png")
        plot_normalized_vs_candidates(
            [{k: v for k, v in p.items() if k != "n_irrelevant"} for p in points],
            path,
            title=f"candidates beyond the first {n_rel} are irrelevant",
            ylabel=ylabel,
        )
        plots["vs_candidates"] = path
    settings = {k: v for k, v in asdict(s).items() if k != "merge"}
    md = [
        f"# Merge matrix ({pool.profile} pool, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Pool: `{pool.root}` ({len(pool.experts)} experts, relevant first: "
        f"{', '.join(e.name for e in pool.experts if e.relevant)}; irrelevant: "
        f"{', '.join(e.name for e in pool.experts if not e.relevant) or 'none'}).",
        f"Matrix settings: `{json.dumps(settings)}`",
        "",
        f"Merge settings: `{json.dumps(asdict(s.merge))}`",
        "",
        f"Wall time: {seconds / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        "## Summary",
        "",
        "Held-in = the tasks of the relevant experts in the pool; held-out = lm-eval tasks none of them trained on.",
        "",
        table,
        "",
        "## Held-in dev loss per task (lower is better)",
        "",
        *loss_lines,
        "",
    ]
    if score_lines:
        md += [
            f"## lm-eval scores x100 (limit {s.limit} per task)",
            "",
            *score_lines,
            "",
            f"Held-out tasks: {', '.join(held_out) or 'none'}.",
            "",
        ]
    if plots:
        md += [f"![vs candidates]({os.path.basename(plots['vs_candidates'])})", ""]
    md += ["Merge seconds per cell: " + ", ".join(f"{c['label']} {c['merge_seconds']}" for c in cells), ""]
    report = {
        "settings": settings,
        "merge_settings": asdict(s.merge),
        "cells": cells,
        "summary": rows,
        "scores": scores,
        "reference_dev_loss": reference_losses,
        "held_out": held_out,
        "plots": plots,
        "seconds": seconds,
    }
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(report, fp, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fp:
        fp.write("\n".join(md))
    report["table"] = table
    return report
