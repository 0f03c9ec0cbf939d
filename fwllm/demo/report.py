"""The demo's figures and report: per-row scores -> held-in normalized scores with 95% bootstrap
intervals (`fwllm.evaluation.figures`), one table, and a short report.md / results.json.

The benchmark's long report (per-task and per-task normalized tables, paired differences, the plot,
held-out tasks) is eval/fwbench/quality_report.py; it builds on `summarize`, `main_table` and
`results` here."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fwllm.demo.settings import with_fw_overrides
from fwllm.evaluation import figures as q

# method -> its name in tables (the benchmark adds its own methods' names)
NAMES = {
    "task_arithmetic": "TA (tuned)",
    "regmean": "RegMean",
    "fisher": "Fisher",
    "fw_hard": "FW-hard",
    "fw_soft": "FW-soft",
    "base": "base",
}
HOW_SCORED = {
    q.ACCURACY: "multiple-choice accuracy by continuation log-likelihood",
    q.LOSS: "token-mean NLL of the reference response",
}


def task_indices(bench) -> Dict[str, np.ndarray]:
    """Bootstrap row indices per scored task, the same for every model (paired figures)."""
    rs = q.Resampler(bench.s.resamples, bench.s.merge.seed)
    return {t.name: rs.indices(t.name, len(t.rows)) for t in bench.scored_tasks()}


def summarize(bench, refs: Dict[str, Dict[str, q.RowScores]], cells) -> dict:
    """{"rows": per cell its per-task figures, normalized figures and their mean over the pool's
    held-in tasks; "references": the base's and the experts' per-task figures}."""
    tasks = bench.scored_tasks()
    idx = task_indices(bench)
    base = refs["base"]
    expert = {t: refs[f"expert:{e.name}"][t] for t, e in bench.expert_of.items()}
    scale = {t.name: (100.0 if t.metric == q.ACCURACY else 1.0) for t in tasks}
    rows = []
    for cell in cells:
        norm = {
            t: q.normalized_figure(bench.dev[t].metric, cell.scores[t], expert[t], base[t], idx[t])
            for t in cell.held_in
        }
        rows.append(
            {
                "label": cell.label,
                "method": cell.method,
                "n": cell.n,
                "n_irrelevant": cell.n_irrelevant,
                "held_in": cell.held_in,
                "task": {t: q.task_figure(cell.scores[t], idx[t], scale[t]) for t in cell.held_in},
                "normalized": norm,
                "held_in_normalized": q.mean_figure(list(norm.values())),
            }
        )
    references = {
        label: {t: q.task_figure(s, idx[t], scale[t]) for t, s in scores.items()}
        for label, scores in refs.items()
    }
    return {"rows": rows, "references": references}


def fmt(f: Optional[q.Figure], digits: int = 1) -> str:
    if f is None or not np.isfinite(f.point):
        return "-"
    return f"{f.point:.{digits}f} [{f.lo:.{digits}f}, {f.hi:.{digits}f}]"


Column = Tuple[str, Callable[[dict], str]]  # header, a summary row -> its cell


def main_table(summary: dict, names: Dict[str, str] = NAMES, columns: Sequence[Column] = ()) -> str:
    """One line per cell: pool, method, held-in normalized score (and `columns`)."""
    head = "| pool | method | held-in normalized |" + "".join(f" {h} |" for h, _ in columns)
    lines = [head, "|---|---|---|" + "---|" * len(columns)]
    for r in summary["rows"]:
        cells = [
            f"{r['n']} ({r['n_irrelevant']} irrelevant)",
            names.get(r["method"], r["method"]),
            fmt(r["held_in_normalized"]),
        ]
        cells += [cell(r) for _, cell in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fig_json(obj):
    if isinstance(obj, q.Figure):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {k: fig_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [fig_json(v) for v in obj]
    return obj


def results(bench, cells, summary: dict, seconds: float, phases: Dict[str, float]) -> dict:
    """What results.json holds: settings, tasks, timings, cells and their figures."""
    s, pool = bench.s, bench.pool
    task_info = [
        {
            "name": t.name,
            "metric": t.metric,
            "rows": len(t.rows),
            "available": t.available,
            "held_in": t.held_in,
            "source": t.source,
        }
        for t in bench.scored_tasks()
    ]
    return {
        "profile": pool.profile,
        "pool": pool.root,
        "seconds": round(seconds, 1),
        "cores": os.cpu_count(),
        "phases": {k: round(v, 1) for k, v in phases.items()},
        "settings": {k: v for k, v in asdict(s).items() if k not in ("merge", "budget")},
        "merge_settings": asdict(with_fw_overrides(s.merge, s.fw)),
        "budget": asdict(s.budget),
        "tasks": task_info,
        "calibration_rows_checked": bench.calibration_rows_checked,
        "scoring": {"seconds": round(bench.scorer.seconds, 1), "dtype": str(bench.scorer.dtype)},
        "cells": [{"label": c.label, "key": c.key, "info": c.info, "seconds": c.seconds} for c in cells],
        "summary": fig_json(summary["rows"]),
        "references": fig_json(summary["references"]),
    }


def task_lines(result: dict) -> List[str]:
    return [
        f"- **{t['name']}** ({'held-in' if t['held_in'] else 'held-out'}, {HOW_SCORED[t['metric']]}): "
        f"{t['rows']} of {t['available']} rows, `{t['source']}`"
        for t in result["tasks"]
    ]


def write_json(folder: str, result: dict) -> None:
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=2, default=str)


def write_report(bench, cells, summary: dict, seconds: float, phases: Dict[str, float]) -> dict:
    """The demo's results.json and short report.md in the output folder; returns the results with
    the printed table under "table"."""
    result = results(bench, cells, summary, seconds, phases)
    table = main_table(summary)
    write_json(bench.out_dir, result)
    with open(os.path.join(bench.out_dir, "report.md"), "w", encoding="utf-8") as fp:
        fp.write(report_markdown(bench, cells, result, table))
    result["table"] = table
    return result


def report_markdown(bench, cells, result: dict, table: str) -> str:
    s, pool = bench.s, bench.pool
    rel = [e.name for e in pool.experts if e.relevant]
    irr = [e.name for e in pool.experts if not e.relevant]
    tuned = ["| cell | lambda | calibration loss |", "|---|---|---|"] + [
        f"| {c.label} | {c.info['lambda']} | {c.info['calibration_loss']:.4f} |"
        for c in cells
        if "lambda" in c.info
    ]
    merge = result["merge_settings"]
    md = [
        f"# fwllm demo ({pool.profile} pool, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Pool: `{pool.root}`: {len(pool.experts)} experts, relevant first ({', '.join(rel)}), "
        f"then irrelevant ({', '.join(irr) or 'none'}). Pools: the first N = {', '.join(map(str, s.sizes))}. "
        f"Wall time: {result['seconds'] / 60:.1f} min on {result['cores']} CPU cores.",
        "",
        "## Held-in normalized score (95% bootstrap intervals over dev rows)",
        "",
        "Per held-in task: accuracy tasks merged / expert x 100; loss tasks the share of the expert's NLL "
        "gain over the base that the merge keeps, (base - merged) / (base - expert) x 100. The figure is the "
        "mean over the pool's held-in tasks.",
        "",
        table,
        "",
        f"Task arithmetic's lambda, chosen on the calibration loss (grid {list(s.ta_scales)}):",
        "",
        *tuned,
        "",
        "## Rows and settings",
        "",
        *task_lines(result),
        "",
        f"Calibration: the first {merge['max_rows']} rows of each held-in task's calibration file, the same "
        f"rows for every data-informed method and for the tuning; {result['calibration_rows_checked']} "
        "calibration prompts checked: none is a dev prompt. Recipes of every merge: "
        f"`{os.path.join(bench.work_dir, 'pool<N>', 'recipes')}`.",
        "",
        f"FW overrides: `{json.dumps(s.fw)}`",
        "",
        "The full quality benchmark (tuned TIES and DARE, Fisher, FW-soft, the best single expert, held-out "
        "tasks, paired differences, per-task tables): `python eval/quality.py`.",
        "",
    ]
    return "\n".join(md)
