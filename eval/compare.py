"""The merge matrix on the `smol` experts: methods x pools, held-in vs held-out, one report.

    python eval/compare.py [--methods average task_arithmetic ties ...] [--sizes 4 8]
                           [--suites pubmedqa,glue] [--limit 20] [--out eval/reports/compare]
                           [--profile smol|tiny] [--device cpu|cuda]

Builds (or reuses) the expert pool, merges the first N experts (relevant first) with
every method through `fwllm merge`, scores each merge on the relevant tasks' dev rows
(loss) and on fwllm's lm-eval suites, and writes report.md, results.json and
vs_candidates.png under --out. Defaults take about 2 h on 2 CPU cores; a GPU
(--device cuda) is much faster. `--suites ""` keeps the dev losses only.
For task metrics on hundreds of dev rows with bootstrap intervals and tuned baselines,
see eval/quality.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from fwllm.core.errors import FwllmError
from fwbench.matrix import MATRIX_METHODS, MatrixSettings, run_matrix
from fwllm.demo.recipes import RECIPE_METHODS, PoolSettings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(MATRIX_METHODS), choices=list(RECIPE_METHODS))
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[4, 8], help="pool sizes N (relevant experts first)"
    )
    ap.add_argument("--suites", default="pubmedqa,glue", help='lm-eval suites or tasks; "" = dev losses only')
    ap.add_argument("--limit", type=int, default=20, help="lm-eval documents per task")
    ap.add_argument("--profile", default="smol", choices=["smol", "tiny"])
    ap.add_argument("--root", default=None, help="expert cache folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=8, help="FW iterations")
    ap.add_argument("--max-rows", type=int, default=6, help="calibration rows per task")
    ap.add_argument("--confirm-run-unsafe-code", action="store_true", help="allow the code suite")
    ap.add_argument("--out", default=os.path.join("eval", "reports", "compare"))
    args = ap.parse_args(argv)

    from fwllm.experts import build_pool

    try:
        pool = build_pool(args.profile, "llama", root=args.root, device=args.device)
        merge = PoolSettings(iterations=args.iterations, max_rows=args.max_rows)
        if args.profile == "tiny":
            merge = PoolSettings(
                iterations=args.iterations,
                max_rows=args.max_rows,
                step_size=0.5,
                max_length=64,
                batch_size=8,
                dtype="float32",
            )
        settings = MatrixSettings(
            methods=args.methods,
            sizes=args.sizes,
            suites="" if args.profile == "tiny" else args.suites,
            limit=args.limit,
            device=args.device,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
            merge=merge,
        )
        report = run_matrix(pool, args.out, settings)
    except FwllmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    print("\n" + report["table"])
    print(f"\nreport: {os.path.join(args.out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
