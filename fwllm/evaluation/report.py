"""Tables and plots of `evaluate_models` results (JSON, CSV, markdown, PNG).

Plots use matplotlib's Agg backend so they render on headless machines.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fwllm.io.plotting import pyplot

_GLUE_PREFIX = "fwllm_glue_"


def short_task(task: str) -> str:
    """Column name for a task: GLUE tasks by their GLUE name, others without 'fwllm_'."""
    if task.startswith(_GLUE_PREFIX):
        return task[len(_GLUE_PREFIX) :]
    return task.removeprefix("fwllm_")


def score_matrix(
    results: dict, field: str = "score"
) -> Tuple[List[str], List[Tuple[str, List[Optional[float]]]]]:
    """(column names, [(model label, values)]) for `field` (score or normalized).

    A `glue_avg` column is added when any model has GLUE scores.
    """
    tasks = list(results["tasks"])
    avg_key = "glue" if field == "score" else "glue_normalized"
    with_avg = any(avg_key in m.get("averages", {}) for m in results["models"].values())
    columns = [short_task(t) for t in tasks] + (["glue_avg"] if with_avg else [])
    rows = []
    for label, model in results["models"].items():
        values = [model["tasks"].get(t, {}).get(field) for t in tasks]
        if field == "normalized" and all(v is None for v in values):
            continue  # no expert reference for this model: nothing to show
        if with_avg:
            values.append(model.get("averages", {}).get(avg_key))
        rows.append((label, values))
    return columns, rows


def has_normalized(results: dict) -> bool:
    return any(
        r.get("normalized") is not None for m in results["models"].values() for r in m["tasks"].values()
    )


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def format_table(results: dict, field: str = "score") -> str:
    """Plain-text table, models x tasks, for the terminal."""
    columns, rows = score_matrix(results, field)
    header = ["model"] + columns
    body = [[label] + [_fmt(v) for v in values] for label, values in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in [header] + body
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict, field: str = "score") -> str:
    columns, rows = score_matrix(results, field)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines)


def write_reports(results: dict, out_dir: str) -> Dict[str, str]:
    """results.json, results.csv (long format), results.md and scores.png in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "markdown": out / "results.md",
        "plot": out / "scores.png",
    }
    payload = {k: v for k, v in results.items() if k != "files"}
    files["json"].write_text(json.dumps(payload, indent=2, sort_keys=False), encoding="utf-8")

    with open(files["csv"], "w", newline="", encoding="utf-8") as fp:
        writer = csv.writer(fp)
        writer.writerow(["model", "kind", "task", "metric", "value", "n"])
        for label, model in results["models"].items():
            for task, r in model["tasks"].items():
                writer.writerow([label, model["kind"], task, "score", r["score"], r["n"]])
                if r.get("normalized") is not None:
                    writer.writerow([label, model["kind"], task, "normalized", r["normalized"], r["n"]])
                for metric, value in sorted(r["metrics"].items()):
                    writer.writerow([label, model["kind"], task, metric, value, r["n"]])

    settings = results.get("settings", {})
    md = [
        "# fwllm eval",
        "",
        f"Settings: `{json.dumps(settings, sort_keys=True)}`",
        "",
        "## Scores (x100)",
        "",
        markdown_table(results, "score"),
    ]
    if has_normalized(results):
        md += [
            "",
            "## Normalized scores (% of the expert's score)",
            "",
            markdown_table(results, "normalized"),
        ]
    md += [
        "",
        "Primary metrics: GSM8K strict-match exact match, PubMedQA accuracy, HumanEval pass@1, "
        "CoLA MCC, MRPC/QQP mean(acc, F1), STS-B mean(Pearson, Spearman), other GLUE accuracy.",
        "",
    ]
    files["markdown"].write_text("\n".join(md), encoding="utf-8")

    plot_scores(results, str(files["plot"]))
    if has_normalized(results):
        files["normalized_plot"] = out / "normalized.png"
        plot_scores(results, str(files["normalized_plot"]), field="normalized")
    return {k: str(v) for k, v in files.items()}


def plot_scores(results: dict, path: str, field: str = "score") -> str:
    """Grouped bars: one group per task, one bar per model."""
    plt = pyplot()
    columns, rows = score_matrix(results, field)
    n_models = max(len(rows), 1)
    width = 0.8 / n_models
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) + 2), 4.5))
    for i, (label, values) in enumerate(rows):
        xs = [j + (i - (n_models - 1) / 2) * width for j in range(len(columns))]
        heights = [float("nan") if v is None else v for v in values]  # NaN draws no bar
        ax.bar(xs, heights, width=width, label=label)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right")
    ax.set_ylabel("normalized score (%)" if field == "normalized" else "score (x100)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title("fwllm eval: " + ("normalized scores" if field == "normalized" else "scores by task"))
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_normalized_vs_candidates(
    records: Sequence[dict], path: str, title: Optional[str] = None, ylabel: str = "normalized score (%)"
) -> str:
    """Normalized score against the number of candidate models, one line per method.

    `records`: dicts with method, n_candidates, n_irrelevant, normalized_score. When
    several n_irrelevant values occur, each gets its own panel, so lines never mix
    pools with different shares of irrelevant models.
    """
    if not records:
        raise ValueError("no records to plot")
    plt = pyplot()
    panels: Dict[int, Dict[str, List[Tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        panels[int(r.get("n_irrelevant", 0))][str(r["method"])].append(
            (float(r["n_candidates"]), float(r["normalized_score"]))
        )
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 4.0), squeeze=False, sharey=True)
    for ax, n_irr in zip(axes[0], keys):
        for method, points in sorted(panels[n_irr].items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xlabel("number of candidate models")
        ax.set_title(f"{n_irr} irrelevant" if len(keys) > 1 else (title or f"{n_irr} irrelevant"))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize="small", loc="best")
    if title and len(keys) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "format_table",
    "markdown_table",
    "plot_normalized_vs_candidates",
    "plot_scores",
    "score_matrix",
    "write_reports",
]
