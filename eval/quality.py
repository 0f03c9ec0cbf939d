"""The quality benchmark on the `smol` experts: merges scored with task metrics on held-out
dev rows, 95% bootstrap intervals, tuned baselines.

    python eval/quality.py [--sizes 2 4 8] [--methods task_arithmetic ties ...]
                           [--fw key=value ...] [--set regmean.alpha=0.7 ...] [--rows task=N ...] [--out eval/reports/quality]
                           [--profile smol|tiny] [--score-dtype auto|float32|bfloat16] [--no-cache]

Builds (or reuses) the expert pool; for N = 2, 4, 8 (relevant experts first, then the
irrelevant ones) merges the first N experts with every method; scores base, experts and
merges on the relevant tasks' dev rows (PubMedQA / SST-2 choice accuracy, GSM8K / code
response NLL) and on held-out GLUE tasks; writes report.md, results.json and
vs_candidates.png under --out. `--fw iterations=12 --fw hard.step_size=0.5` overrides
fw_merging recipe parameters (both variants, or the one named) on top of the smol
benchmark's FW settings (`SMOL_FW`: line search, adaptive hull, T = 12, the support chosen for the whole
model and merged by RegMean with equal weights). Scores and merges are
cached under --work (runs/quality): a rerun recomputes only what changed.
"""

from __future__ import annotations

import argparse
import os
import sys

from fwllm.core.errors import FwllmError
from fwllm.demo.dev_rows import DevBudget
from fwllm.demo.pool_quality import RECIPE_ONLY
from fwllm.demo.recipes import PoolSettings
from fwllm.demo.settings import SMOL_FW, parse_overrides
from fwllm.demo.tuning import TUNED_METHODS
from fwllm.evaluation.likelihood import SCORE_DTYPES
from fwbench.quality_engine import BenchSettings
from fwbench.quality_bench import HELD_OUT, QUALITY_METHODS, SMOL_ROWS, run_benchmark, with_method_overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="smol", choices=["smol", "tiny"])
    ap.add_argument("--root", default=None, help="expert cache folder")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=None, help="pool sizes N (default 2 4 8; tiny 2 4 7)"
    )
    ap.add_argument(
        "--methods", nargs="+", default=list(QUALITY_METHODS), choices=list(TUNED_METHODS + RECIPE_ONLY)
    )
    ap.add_argument(
        "--fw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fw_merging recipe parameter override (hard.KEY / soft.KEY for one variant)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        dest="method_params",
        help="recipe parameter of regmean / fisher (e.g. regmean.alpha=0.7)",
    )
    ap.add_argument(
        "--rows", action="append", default=[], metavar="TASK=N", help="dev rows of a task (all: -1)"
    )
    ap.add_argument("--held-out", nargs="*", default=list(HELD_OUT), help="held-out GLUE tasks")
    ap.add_argument("--max-rows", type=int, default=None, help="calibration rows per task (every method)")
    ap.add_argument("--no-best-expert", action="store_true", help="skip the best-single-expert baseline")
    ap.add_argument("--no-cache", action="store_true", help="recompute every merge and score")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--score-dtype",
        default="auto",
        choices=list(SCORE_DTYPES),
        help="dtype models are scored in (auto: bfloat16 where the hardware has it)",
    )
    ap.add_argument("--out", default=os.path.join("eval", "reports", "quality"), help="report folder")
    ap.add_argument("--work", default=os.path.join("runs", "quality"), help="merges, recipes and score cache")
    args = ap.parse_args(argv)

    from fwllm.experts import build_pool

    if not os.environ.get(
        "FWLLM_VERBOSE"
    ):  # transformers' per-load bars drown the benchmark's progress lines
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

    try:
        pool = build_pool(args.profile, "llama", root=args.root, device=args.device)
        tiny = args.profile == "tiny"
        merge = (
            PoolSettings(step_size=0.5, max_rows=16, max_length=64, batch_size=8, dtype="float32")
            if tiny
            else PoolSettings()
        )
        if args.max_rows:
            merge.max_rows = args.max_rows
        merge = with_method_overrides(merge, parse_overrides(args.method_params))
        rows = {} if tiny else dict(SMOL_ROWS)
        for task, n in parse_overrides(args.rows).items():
            rows[task] = None if int(n) < 0 else int(n)
        s = BenchSettings(
            sizes=args.sizes or ((2, 4, 7) if tiny else (2, 4, 8)),
            methods=args.methods,
            budget=DevBudget(rows=rows),
            merge=merge,
            fw=parse_overrides(args.fw) if tiny else {**SMOL_FW, **parse_overrides(args.fw)},
            best_single=not args.no_best_expert,
            device=args.device,
            cache=not args.no_cache,
            score_dtype=args.score_dtype,
        )
        report = run_benchmark(pool, args.out, s, args.held_out, work_dir=args.work)
    except FwllmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print("\n" + report["table"])
    print(f"\nreport: {os.path.join(args.out, 'report.md')} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
