"""What scoring in bfloat16 changes against float32, on the quality benchmark's dev rows.

    python eval/score_dtype.py [--models base math sst2] [--rows task=N ...] [--out eval/reports/score_dtype.md]

`python eval/quality.py` scores every model in bfloat16 where the CPU has bfloat16 matmuls
(`--score-dtype auto`). This scores the same models on the same rows (every dev row of the
smol pool's held-in tasks, and the held-out GLUE tasks) in both dtypes and prints, per task:
the figure in each dtype, their difference, how many rows change their predicted choice
(accuracy tasks) or their NLL by more than 1% (loss tasks), and the time each dtype took.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from fwllm.core.errors import FwllmError
from fwllm.core.paths import data_root
from fwllm.evaluation import figures as q
from fwllm.demo.dev_rows import DevBudget, pool_dev_tasks
from fwllm.demo.scores import score_task
from fwllm.demo.settings import parse_overrides
from fwbench.held_out import held_out_tasks
from fwllm.io.models import load_model, load_tokenizer

DTYPES = (torch.float32, torch.bfloat16)


def task_figure(task, scores) -> float:
    if task.metric == q.ACCURACY:
        return 100.0 * float(scores.values.mean())
    return float(scores.values.sum() / scores.weights.sum())


def changed_rows(task, a, b, extra_a, extra_b) -> int:
    if task.metric == q.ACCURACY:
        return int(
            sum(
                int(np.argmax(x)) != int(np.argmax(y))
                for x, y in zip(extra_a["logprobs"], extra_b["logprobs"])
            )
        )
    return int(np.sum(np.abs(a.values - b.values) > 0.01 * np.abs(a.values)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["base"], help="base and/or expert task names of the smol pool"
    )
    ap.add_argument("--rows", action="append", default=[], metavar="TASK=N", help="dev rows of a task")
    ap.add_argument("--held-out", nargs="*", default=["rte", "cola"])
    ap.add_argument("--out", default=os.path.join("eval", "reports", "score_dtype.md"))
    args = ap.parse_args(argv)

    from fwllm.experts import build_pool

    try:
        pool = build_pool("smol", "llama")
        root = data_root(required=True)
        budget = DevBudget(rows={t: int(n) for t, n in parse_overrides(args.rows).items()})
        relevant = [e.task for e in pool.experts if e.relevant and e.task]
        tasks = pool_dev_tasks(pool, relevant, budget, root) + held_out_tasks(args.held_out, budget, root)
        experts = {e.task: e.path for e in pool.experts if e.relevant and e.task}
        unknown = [m for m in args.models if m != "base" and m not in experts]
        if unknown:
            raise FwllmError(f"unknown model(s) {unknown}; choose base or one of {', '.join(experts)}")
    except FwllmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    tok = load_tokenizer(pool.base)
    lines = [
        "| model | task | rows | float32 | bfloat16 | difference | rows changed | seconds fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {d: 0.0 for d in DTYPES}
    for name in args.models:
        path = pool.base if name == "base" else experts[name]
        runs = {}
        for dtype in DTYPES:
            model = load_model(path, torch.float32, "cpu").to(dtype).eval()
            for task in tasks:
                t0 = time.time()
                scores, extra = score_task(model, tok, task, budget, 1024)
                runs[dtype, task.name] = (scores, extra, time.time() - t0)
                totals[dtype] += runs[dtype, task.name][2]
                print(f"{name} {task.name} {str(dtype)[6:]}: {runs[dtype, task.name][2]:.1f} s", flush=True)
            del model
        for task in tasks:
            (a, ea, ta), (b, eb, tb) = runs[DTYPES[0], task.name], runs[DTYPES[1], task.name]
            fa, fb = task_figure(task, a), task_figure(task, b)
            unit = "acc. %" if task.metric == q.ACCURACY else "NLL/token"
            lines.append(
                f"| {name} | {task.name} ({unit}) | {len(task.rows)} | {fa:.4g} | {fb:.4g} | {fb - fa:+.3g} | "
                f"{changed_rows(task, a, b, ea, eb)} | {ta:.1f} / {tb:.1f} |"
            )
    ratio = totals[DTYPES[0]] / max(totals[DTYPES[1]], 1e-9)
    summary = (
        f"Scoring time float32 / bfloat16: {totals[DTYPES[0]]:.0f} s / {totals[DTYPES[1]]:.0f} s = "
        f"**{ratio:.2f}x** ({os.cpu_count()} CPU cores, one run). Rows changed: accuracy tasks, rows whose "
        "predicted choice differs; loss tasks, rows whose NLL moves by more than 1%."
    )
    md = [
        f"# Scoring dtype: bfloat16 against float32 ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "`python eval/score_dtype.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`",
        "",
        *lines,
        "",
        summary,
        "",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fp:
        fp.write("\n".join(md))
    print("\n".join(lines) + "\n\n" + summary + f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
