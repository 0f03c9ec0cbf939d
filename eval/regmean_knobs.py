"""Can the local merge's knobs lift FW above RegMean? A scan on the smol pool's relevant experts.

With `refine: regmean`, `granularity: model` and uniform weights, FW's merge of the N = 8 pool is
RegMean over the support FW picked (the four relevant experts), so FW can beat RegMean there only by
merging that support better. This scans the two knobs a solver could tune on its calibration loss:
RegMean's `alpha` (off-diagonal scale of the Grams) and a scale K of the merged task vector,
theta_0 + K (M - theta_0). Every point gets FW's calibration loss (the rows every method sees) and the
quality benchmark's held-in normalized score on dev rows (95% bootstrap intervals); the table marks
the point the calibration loss would choose.

    python eval/regmean_knobs.py [--alphas 0.5 0.7 0.9 1.0] [--scales 0.8 1.0 1.2 1.5]
                                 [--work runs/quality] [--out eval/reports/regmean_knobs.md]

Shares `eval/quality.py`'s work folder and caches (scores keyed by model content). Not run in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
from mergekit.options import MergeOptions

from fwllm.core.errors import FwllmError
from fwllm.demo.dev_rows import DevBudget
from fwllm.demo.pool_quality import PoolRun
from fwllm.demo.recipes import PoolSettings
from fwllm.demo.report import fmt
from fwllm.demo.tuning import calibration_objective
from fwbench.quality_bench import SMOL_ROWS, with_method_overrides
from fwbench.quality_engine import BenchSettings, QualityBenchmark
from fwbench.quality_report import summarize
from fwllm.io.models import load_model
from fwllm.mergekit_glue.merge import merge_recipe


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scan(bench: QualityBenchmark, refs, n: int, alpha: float, scales, log) -> list:
    """RegMean@n at `alpha`, then theta_0 + K (M - theta_0) for each K: [(K, calibration loss, row)]."""
    run = PoolRun(bench, n)
    cell = run.merged("regmean")  # scores K = 1 (from the cache when they are there)
    folder = os.path.join(run.folder, "merged", "regmean")
    stamp_file = folder + ".quality_key"  # beside the output (PoolRun.merged writes it there)
    if not os.path.isfile(stamp_file) or open(stamp_file, encoding="utf-8").read() != cell.key:
        # cached scores need no merge, but the scan reads the merged model: (re)make it for this alpha
        merge_recipe(cell.info["recipe"], folder, MergeOptions(device=bench.s.device, quiet=True), force=True)
        with open(stamp_file, "w", encoding="utf-8") as fp:
            fp.write(cell.key)
    stamp = cell.key
    s = bench.s.merge
    model = load_model(bench.pool.base, torch.float32, bench.s.device).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = load_model(folder, torch.float32, bench.s.device).state_dict()
    objective = calibration_objective(
        run.calib, bench.tokenizer, model, s.max_rows, s.max_length, s.batch_size
    )
    cells, losses = [], []
    for k in scales:
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(base[name] + k * (merged[name] - base[name]))
        losses.append(objective.value(model))
        cell = run.cell(f"regmean(alpha={alpha}, K={k})", _key("scaled", "regmean", stamp, k))
        cell.scores = bench.scorer.scores(cell.key, bench.tasks_for(run.tasks), lambda: model)
        cells.append(cell)
        log(f"   alpha {alpha}, K {k}: calibration loss {losses[-1]:.4f}")
    rows = summarize(bench, refs, cells)["rows"]
    return list(zip(scales, losses, rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9, 1.0])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.8, 1.0, 1.2, 1.5])
    ap.add_argument("--n", type=int, default=4, help="pool size (the relevant experts come first)")
    ap.add_argument("--work", default=os.path.join("runs", "quality"))
    ap.add_argument("--out", default=os.path.join("eval", "reports", "regmean_knobs.md"))
    args = ap.parse_args(argv)
    import transformers

    from fwllm.experts import build_pool

    transformers.utils.logging.set_verbosity_error()
    try:
        pool = build_pool("smol", "llama")
        points = []
        for alpha in args.alphas:
            s = BenchSettings(
                sizes=(args.n,),
                methods=["regmean"],
                best_single=False,
                budget=DevBudget(rows=dict(SMOL_ROWS)),
                merge=with_method_overrides(PoolSettings(), {"regmean.alpha": alpha}),
            )
            bench = QualityBenchmark(pool, os.path.dirname(args.out) or ".", s, work_dir=args.work)
            refs = bench.references()
            points += [
                (alpha, k, loss, row) for k, loss, row in scan(bench, refs, args.n, alpha, args.scales, print)
            ]
    except FwllmError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    chosen = min(points, key=lambda p: p[2])
    tasks = list(points[0][3]["normalized"])
    lines = [
        f"# RegMean's knobs on the smol pool's {args.n} relevant experts",
        "",
        "`python eval/regmean_knobs.py` (see its docstring). alpha: RegMean's off-diagonal Gram scale "
        "(the benchmark's RegMean uses 0.9); K: the merged task vector's scale. Calibration loss: FW's "
        "objective on the rows every method sees; held-in normalized: the quality benchmark's score on dev "
        "rows, 95% bootstrap intervals. **bold**: the point the calibration loss chooses.",
        "",
        "| alpha | K | calibration loss | held-in normalized | " + " | ".join(tasks) + " |",
        "|---|---|---|---|" + "---|" * len(tasks),
    ]
    for alpha, k, loss, row in points:
        mark = "**" if (alpha, k) == chosen[:2] else ""
        lines.append(
            f"| {alpha:g} | {k:g} | {mark}{loss:.4f}{mark} | {fmt(row['held_in_normalized'])} | "
            + " | ".join(f"{row['normalized'][t].point:.1f}" for t in tasks)
            + " |"
        )
    best = max(points, key=lambda p: p[3]["held_in_normalized"].point)
    lines += [
        "",
        f"Chosen by calibration loss: alpha {chosen[0]:g}, K {chosen[1]:g}: "
        f"{fmt(chosen[3]['held_in_normalized'])}. Best on dev rows (for reference only; dev rows never choose): "
        f"alpha {best[0]:g}, K {best[1]:g}: {fmt(best[3]['held_in_normalized'])}.",
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fp:
        fp.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
