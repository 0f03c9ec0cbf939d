"""The quality benchmark's figures and long report, on top of the demo's (`fwllm.demo.report`):
held-out figures per cell, paired differences between methods, per-task and per-task normalized
tables, the tuned baselines' grids, and the normalized score against the number of candidates."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Sequence

from fwllm.demo import report as demo
from fwllm.demo.report import fmt, main_table, task_lines
from fwllm.demo.tuning import TUNED_METHODS
from fwllm.evaluation import figures as q

NAMES = {
    **demo.NAMES,
    "ties": "TIES (tuned)",
    "dare_ties": "DARE (tuned)",
    "best_expert": "best single expert",
}
HELD_OUT_COLUMNS = (
    ("held-out acc. %", lambda r: fmt(r.get("held_out"))),
    ("held-out vs base", lambda r: fmt(r.get("held_out_vs_base"))),
)


def summarize(bench, refs: Dict[str, Dict[str, q.RowScores]], cells) -> dict:
    """The demo's summary, with each cell's held-out accuracy (and its paired difference to the
    base's) and the paired differences between methods."""
    summary = demo.summarize(bench, refs, cells)
    if bench.held_out:
        idx = demo.task_indices(bench)
        base = refs["base"]
        base_out = q.mean_figure([q.task_figure(base[t.name], idx[t.name], 100.0) for t in bench.held_out])
        for row, cell in zip(summary["rows"], cells):
            out = {t.name: q.task_figure(cell.scores[t.name], idx[t.name], 100.0) for t in bench.held_out}
            row["held_out_task"] = out
            row["held_out"] = q.mean_figure(list(out.values()))
            row["held_out_vs_base"] = q.difference(row["held_out"], base_out)
    summary["differences"] = differences(summary["rows"])
    return summary


def differences(rows: Sequence[dict]) -> List[dict]:
    """Paired differences of held-in normalized scores: each FW variant against every other
    method in the same pool, and each method's drift from the all-relevant pool to the largest."""
    out = []
    by = {(r["method"], r["n"]): r for r in rows}
    sizes = sorted({r["n"] for r in rows})
    for fw in ("fw_hard", "fw_soft"):
        for n in sizes:
            if (fw, n) not in by:
                continue
            for (method, m), other in by.items():
                if m == n and method != fw:
                    out.append(
                        {
                            "kind": "vs",
                            "a": f"{fw}@{n}",
                            "b": other["label"],
                            "figure": q.difference(
                                by[(fw, n)]["held_in_normalized"], other["held_in_normalized"]
                            ),
                        }
                    )
    clean = [r for r in rows if r["n_irrelevant"] == 0]
    n_clean = max((r["n"] for r in clean), default=None)
    if n_clean is not None and sizes[-1] != n_clean:
        for method in sorted({r["method"] for r in rows}):
            a, b = by.get((method, sizes[-1])), by.get((method, n_clean))
            if a and b and a["held_in"] == b["held_in"]:
                out.append(
                    {
                        "kind": "drift",
                        "a": a["label"],
                        "b": b["label"],
                        "figure": q.difference(a["held_in_normalized"], b["held_in_normalized"]),
                    }
                )
    return out


def plot(summary: dict, path: str, n_relevant: int) -> str:
    from fwllm.io.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = []
    for r in summary["rows"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    for method in methods:
        pts = sorted((r["n"], r["held_in_normalized"]) for r in summary["rows"] if r["method"] == method)
        xs = [p[0] for p in pts]
        ys = [p[1].point for p in pts]
        err = [[p[1].point - p[1].lo for p in pts], [p[1].hi - p[1].point for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=NAMES.get(method, method))
    ax.axvline(n_relevant + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"number of candidates (beyond {n_relevant}: irrelevant experts)")
    ax.set_ylabel("held-in normalized score (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(bench, cells, summary: dict, seconds: float, phases: Dict[str, float]) -> dict:
    """results.json, report.md and (with several pool sizes) vs_candidates.png in the report folder."""
    s, pool, out = bench.s, bench.pool, bench.out_dir
    n_rel = sum(1 for e in pool.experts if e.relevant)
    plot_path = plot(summary, os.path.join(out, "vs_candidates.png"), n_rel) if len(s.sizes) > 1 else None
    table = main_table(summary, NAMES, HELD_OUT_COLUMNS if bench.held_out else ())
    result = demo.results(bench, cells, summary, seconds, phases)
    result["differences"] = demo.fig_json(summary["differences"])
    result["plot"] = plot_path
    demo.write_json(out, result)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as fp:
        fp.write(report_markdown(bench, cells, summary, result, table))
    result["table"] = table
    return result


def _task_table(bench, summary: dict) -> List[str]:
    tasks = bench.scored_tasks()
    unit = {q.ACCURACY: "acc. %", q.LOSS: "NLL"}
    head = "| model | " + " | ".join(f"{t.name} ({unit[t.metric]})" for t in tasks) + " |"
    lines = [head, "|---|" + "---|" * len(tasks)]
    for label, figs in summary["references"].items():
        lines.append(
            f"| {label} | "
            + " | ".join(fmt(figs.get(t.name), 3 if t.metric == q.LOSS else 1) for t in tasks)
            + " |"
        )
    for r in summary["rows"]:
        if r["method"] == "base":
            continue
        figs = {**r["task"], **r.get("held_out_task", {})}
        lines.append(
            f"| {r['label']} | "
            + " | ".join(fmt(figs.get(t.name), 3 if t.metric == q.LOSS else 1) for t in tasks)
            + " |"
        )
    return lines


def _norm_table(summary: dict, held_in: Sequence[str]) -> List[str]:
    lines = ["| cell | " + " | ".join(held_in) + " | mean |", "|---|" + "---|" * (len(held_in) + 1)]
    for r in summary["rows"]:
        lines.append(
            f"| {r['label']} | "
            + " | ".join(fmt(r["normalized"].get(t)) for t in held_in)
            + f" | {fmt(r['held_in_normalized'])} |"
        )
    return lines


def report_markdown(bench, cells, summary: dict, result: dict, table: str) -> str:
    s, pool = bench.s, bench.pool
    rel = [e.name for e in pool.experts if e.relevant]
    irr = [e.name for e in pool.experts if not e.relevant]
    tuned_lines = ["| cell | lambda | density | calibration loss |", "|---|---|---|---|"]
    for c in cells:
        if c.method in TUNED_METHODS:
            tuned_lines.append(
                f"| {c.label} | {c.info['lambda']} | {c.info['density']} | {c.info['calibration_loss']:.4f} |"
            )
        if c.method == "best_expert":
            tuned_lines.append(
                f"| {c.label} | expert `{c.info['expert']}` | - | {c.info['calibration_loss']:.4f} |"
            )
    diff_lines = ["| comparison | difference in held-in normalized score |", "|---|---|"]
    for d in summary["differences"]:
        word = "minus" if d["kind"] == "vs" else "drift: minus"
        diff_lines.append(f"| {d['a']} {word} {d['b']} | {fmt(d['figure'])} |")
    phases = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result["phases"].items())
    merge = result["merge_settings"]
    md = [
        f"# Quality benchmark ({pool.profile} pool, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Pool: `{pool.root}`: {len(pool.experts)} experts, relevant first ({', '.join(rel)}), then "
        "irrelevant "
        f"({', '.join(irr) or 'none'}). Pools: the first N = {', '.join(map(str, s.sizes))}.",
        "",
        f"Wall time: **{result['seconds'] / 60:.1f} min** on {result['cores']} CPU cores ({phases}; "
        f"scoring {result['scoring']['seconds'] / 60:.1f} min). Cached steps cost nothing and are not "
        "counted in "
        f"their phase's time.",
        "",
        "## Held-in normalized score (95% bootstrap intervals over dev rows)",
        "",
        "Per held-in task: accuracy tasks merged / expert x 100; loss tasks the share of the expert's "
        "NLL gain over "
        "the base that the merge keeps, (base - merged) / (base - expert) x 100. The figure is the mean "
        "over the "
        "pool's held-in tasks; the base and each expert are resampled with the merge (paired). "
        "Held-out: mean "
        "accuracy (x100) on tasks no expert trained on, and its paired difference to the base.",
        "",
        table,
        "",
    ]
    if result.get("plot"):
        md += ["![normalized score vs number of candidates](vs_candidates.png)", ""]
    md += [
        "## Paired differences",
        "",
        *diff_lines,
        "",
        "## Per-task figures",
        "",
        *_task_table(bench, summary),
        "",
        "## Normalized score per held-in task",
        "",
        *_norm_table(summary, list(bench.dev)),
        "",
        "## Tuned baselines (chosen on the calibration loss only)",
        "",
        *tuned_lines,
        "",
        f"Grids: TA lambda {list(s.ta_scales)}; TIES lambda {list(s.ties_scales)} x density "
        f"{list(s.ties_densities)}; DARE lambda {list(s.dare_scales)} x density {list(s.dare_densities)}. "
        "TA, TIES and DARE are mergekit's own "
        "per-tensor merges (weights 1, the methods' normalize/rescale defaults), computed in memory in "
        "float32; "
        f"`{os.path.join(bench.work_dir, 'pool<N>', 'recipes')}` holds the equivalent recipes.",
        "",
        "## Rows and settings",
        "",
        *task_lines(result),
        "",
        f"Calibration: the first {merge['max_rows']} rows of each held-in task's calibration file (up to "
        f"{merge['max_length']} tokens), the same rows for every data-informed method and for every "
        "tuning step. "
        f"{result['calibration_rows_checked']} calibration prompts checked: none is a dev prompt.",
        "",
        f"Models are scored in {result['scoring']['dtype'].replace('torch.', '')} (`--score-dtype`; "
        "eval/reports/score_dtype.md compares it with float32). "
        f"Multiple-choice prompts keep their last {s.budget.max_prompt_tokens} tokens; response rows at most "
        f"{s.budget.max_length} tokens. GSM8K and code are scored by the NLL of the reference answer "
        "only: greedy "
        "generation of ~200-token solutions for every row and model (exact match) is not affordable on "
        "2 CPU cores.",
        "",
        f"Merge settings: `{json.dumps(merge)}`",
        "",
        f"FW overrides: `{json.dumps(s.fw)}`",
        "",
        "Seconds per cell: " + ", ".join(f"{c.label} {c.seconds}" for c in cells if c.seconds),
        "",
    ]
    return "\n".join(md)
