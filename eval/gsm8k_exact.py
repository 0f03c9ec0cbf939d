"""GSM8K exact match by generation, for the demo's merges of the whole smol pool (N = 8).

    python eval/gsm8k_exact.py [--limit N] [--batch-size 16] [--out eval/reports/gsm8k_exact]

The quality benchmark (`eval/quality.py`) scores GSM8K by the NLL of the reference solution,
because generating an answer for every row of every merge costs more than 2 CPU cores
afford. This measures what exact match says for the few models that matter: the base, the
math expert, and the demo's tuned TA, RegMean and FW-hard merges over all 8 experts (4 of
them irrelevant). `fwllm demo` is run first (cached: seconds); TA is merged from the
recipe it wrote. Each model runs lm-eval's `fwllm_gsm8k` task (5-shot, greedy, at most 256
new tokens, the task `fwllm eval --suite math` runs), in bfloat16 where the CPU has
bfloat16 matmuls. Per row, strict (the number after ``####``) and flexible (the last
number) exact match; 95% bootstrap intervals over rows, paired between models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from fwllm.core.errors import FwllmError
from fwllm.evaluation import figures as q
from fwllm.evaluation.likelihood import scoring_dtype

TASK = "fwllm_gsm8k"
READINGS = (("strict", "exact_match,strict-match"), ("flexible", "exact_match,flexible-extract"))
# paired differences reported, (a, b): a minus b
PAIRS = (
    ("FW-hard", "RegMean"),
    ("FW-hard", "TA (tuned)"),
    ("FW-hard", "base"),
    ("RegMean", "base"),
    ("expert math", "base"),
)


def demo_models(work: str, demo_dir: str) -> dict:
    """{label: model folder}: base, math expert, and the demo's merges (TA merged here)."""
    from mergekit.options import MergeOptions

    from fwllm.demo.run import run_demo
    from fwllm.experts import build_pool
    from fwllm.mergekit_glue.merge import merge_recipe

    pool = build_pool("smol", "llama")
    run_demo(out_dir=demo_dir)
    merged = os.path.join(demo_dir, "pool8", "merged")
    ta = os.path.join(work, "task_arithmetic")
    merge_recipe(
        os.path.join(demo_dir, "pool8", "recipes", "task_arithmetic.yml"),
        ta,
        MergeOptions(quiet=True),
        force=True,
    )
    math_expert = next(e.path for e in pool.experts if e.task == "math")
    return {
        "base": pool.base,
        "expert math": math_expert,
        "TA (tuned)": ta,
        "RegMean": os.path.join(merged, "regmean"),
        "FW-hard": os.path.join(merged, "fw_hard"),
    }


def fmt(f: q.Figure) -> str:
    return f"{f.point:.1f} [{f.lo:.1f}, {f.hi:.1f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="GSM8K dev rows (default: all 319)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--demo", default=os.path.join("runs", "demo"), help="the demo's output folder (reused)")
    ap.add_argument("--out", default=os.path.join("eval", "reports", "gsm8k_exact"))
    args = ap.parse_args(argv)

    from fwllm.evaluation.runner import evaluate_models

    dtype = str(scoring_dtype("auto", "cpu")).replace("torch.", "")
    work = tempfile.mkdtemp(prefix="fwllm_gsm8k_")
    try:
        models = demo_models(work, args.demo)
        rows, seconds = {}, {}
        for label, path in models.items():
            t0 = time.time()
            res = evaluate_models(
                [path],
                suites=[TASK],
                limit=args.limit,
                dtype=dtype,
                batch_size=args.batch_size,
                use_cache=False,
                progress=False,
            )
            seconds[label] = time.time() - t0
            (entry,) = res["models"].values()
            rows[label] = {name: np.asarray(entry["tasks"][TASK]["rows"][key]) for name, key in READINGS}
            print(
                f"{label}: strict {rows[label]['strict'].mean():.1f}, flexible {rows[label]['flexible'].mean():.1f} "
                f"({seconds[label]:.0f} s)",
                flush=True,
            )
    except FwllmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(next(iter(rows.values()))["strict"])
    idx = q.Resampler(2000).indices("gsm8k_exact", n)
    figs = {
        (label, name): q.figure(r.mean(), q.RowScores(r).resampled(idx))
        for label, per in rows.items()
        for name, r in per.items()
    }
    table = ["| model | strict exact match % | flexible exact match % | seconds |", "|---|---|---|---|"]
    table += [
        f"| {label} | {fmt(figs[label, 'strict'])} | {fmt(figs[label, 'flexible'])} | {seconds[label]:.0f} |"
        for label in rows
    ]
    diffs = ["| comparison | strict | flexible |", "|---|---|---|"]
    for a, b in PAIRS:
        cells = [
            fmt(q.figure(figs[a, r].point - figs[b, r].point, figs[a, r].samples - figs[b, r].samples))
            for r, _ in READINGS
        ]
        diffs.append(f"| {a} minus {b} | {cells[0]} | {cells[1]} |")
    command = "python eval/gsm8k_exact.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        f"# GSM8K exact match of the demo's merges ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"`{command.strip()}`: {n} GSM8K dev rows, lm-eval `{TASK}` (5-shot, greedy, <= 256 new tokens), "
        f"{dtype}, {os.cpu_count()} CPU cores; the merges are `fwllm demo`'s (the smol pool, N = 8, 4 experts "
        "irrelevant). 95% bootstrap intervals over rows, paired.",
        "",
        *table,
        "",
        *diffs,
        "",
        f"Generation took {sum(seconds.values()) / 60:.1f} min for {len(rows)} models.",
        "",
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as fp:
        fp.write("\n".join(md))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(
            {
                "rows": n,
                "dtype": dtype,
                "seconds": seconds,
                "models": {k: str(v) for k, v in models.items()},
                "per_row": {
                    label: {name: r.tolist() for name, r in per.items()} for label, per in rows.items()
                },
            },
            fp,
        )
    print("\n".join(table + [""] + diffs) + f"\nreport: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
