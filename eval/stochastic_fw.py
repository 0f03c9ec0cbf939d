"""Stochastic FW (`batches_per_iteration`) against full-batch FW on the `smol` expert pool.

    python eval/stochastic_fw.py [--iterations 8] [--rows 6] [--out eval/reports]

Every run merges the same 8 SmolLM2-135M experts (4 relevant, 4 irrelevant) with
`fw_merging` (hard, tensor granularity), as `fwllm demo` does, and is scored on held-out dev
rows of the relevant tasks (mean response loss, lower is better). The runs:

* full        T iterations, every calibration row at every iteration (the default)
* minibatch   T iterations, one micro-batch per task per iteration (half the rows here)
* minibatch   2T iterations: the same number of row gradients as `full`
* minibatch   2T iterations over twice the calibration rows, a quarter per iteration:
              the same compute as `full`, twice the data

"row passes" counts the calibration rows differentiated per task over the solve (the
cost that dominates on CPU). Prints one table and writes it as markdown + JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--rows", type=int, default=6, help="calibration rows per task of the full-batch run")
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--root", default=None, help="expert cache folder")
    ap.add_argument("--work", default=os.path.join("runs", "stochastic_fw"))
    ap.add_argument("--out", default=os.path.join("eval", "reports"))
    args = ap.parse_args(argv)

    from mergekit.options import MergeOptions

    from fwbench.dev_losses import dev_losses
    from fwllm.experts import build_pool
    from fwllm.mergekit_glue.merge import merge_recipe
    from fwllm.demo.recipes import Member, PoolSettings, recipe_for
    import yaml

    pool = build_pool("smol", "llama", root=args.root)
    relevant = [e.task for e in pool.experts if e.relevant and e.task]
    members = [Member(e.path, e.task) for e in pool.experts]
    t, rows, bs = args.iterations, args.rows, args.batch_size
    runs = [  # label, rows per task, micro-batches per task and iteration (0 = all), iterations
        ("full", rows, 0, t),
        ("minibatch", rows, 1, t),
        ("minibatch", rows, 1, 2 * t),
        ("minibatch", 2 * rows, 1, 2 * t),
    ]
    results = []
    os.makedirs(args.work, exist_ok=True)
    for label, n_rows, k, iters in runs:
        name = f"{label}-r{n_rows}-k{k}-t{iters}"
        settings = PoolSettings(
            iterations=iters,
            max_rows=n_rows,
            batch_size=bs,
            extra={"fw_hard": {"batches_per_iteration": k, "preset": "paper"}},
        )
        recipe = recipe_for("fw_hard", pool.base, members, pool.calibration_dir(), settings)
        path = os.path.join(args.work, f"{name}.yml")
        with open(path, "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe, fp, sort_keys=False)
        target = os.path.join(args.work, name)
        print(f"== {name}", flush=True)
        start = time.time()
        merge_recipe(path, target, MergeOptions(quiet=True), force=True)
        wall = time.time() - start
        plan = json.load(open(os.path.join(target, "fwllm_plan", "plan.json")))
        losses = dev_losses(target, pool, relevant, 12, settings.max_length * 2)
        per_iter = n_rows if k == 0 else min(n_rows, k * bs)
        results.append(
            {
                "run": label,
                "rows_per_task": n_rows,
                "batches_per_iteration": k,
                "iterations": iters,
                "row_passes_per_task": per_iter * iters,
                "solve_s": plan["solve_seconds"],
                "wall_s": wall,
                "selected_iteration": plan["selected_iteration"],
                "dev": losses,
                "mean_dev": sum(losses.values()) / len(losses),
            }
        )
        print(json.dumps(results[-1]), flush=True)

    head = (
        [
            "run",
            "rows/task",
            "micro-batches/iter",
            "T",
            "row passes/task",
            "solve s",
            "solve / full",
            "returned iterate",
        ]
        + [f"{task} dev" for task in relevant]
        + ["mean dev"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results[0]["solve_s"]
    for r in results:
        cells = [
            r["run"],
            str(r["rows_per_task"]),
            str(r["batches_per_iteration"] or "all"),
            str(r["iterations"]),
            str(r["row_passes_per_task"]),
            f"{r['solve_s']:.0f}",
            f"{r['solve_s'] / ref:.2f}",
            str(r["selected_iteration"]),
        ]
        cells += [f"{r['dev'][task]:.3f}" for task in relevant] + [f"{r['mean_dev']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "stochastic_fw.md"), "w", encoding="utf-8") as fp:
        fp.write(
            f"# Stochastic vs full-batch FW on the smol pool ({time.strftime('%Y%m%d-%H%M%S')})\n\n"
            f"8 experts (4 relevant), hard FW, micro-batches of {bs} rows, dev loss on 12 held-out rows "
            f"per task (lower is better).\n\n{table}\n"
        )
    with open(os.path.join(args.out, "stochastic_fw.json"), "w", encoding="utf-8") as fp:
        json.dump(results, fp, indent=2)


if __name__ == "__main__":
    main()
