"""FW-Merging vs mergekit `ties` on SmolLM2-135M-sized candidates: peak RSS, wall time, bytes read.

Each (method, N) runs in its own child process (so peak RSS is that run's alone); the
child counts the candidate bytes each side reads: mergekit's loader for tensors handed
to merge methods, fwllm's readers for the FW solve. Candidates are the SmolLM2 base plus
distinct random low-rank task vectors (bf16, sharded), i.e. real-size inputs.

    python eval/bench_fw.py --base DIR [--n 2 4 8 16] [--iterations 10] [--minibatches 1] [--repeat 1] [--out eval/reports]

DIR defaults to the base of the `smol` expert pool (`fwllm experts --profile smol`).
`fw_full` and `fw_layerwise` differentiate every calibration row at every iteration;
`fw_full_mb{K}` is stochastic FW (`batches_per_iteration: K`, K micro-batches of the
calibration set per iteration; the rows below make two micro-batches).
Prints one table and writes it as markdown + JSON. Ratios matter, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
import mergekit.io.lazy_tensor_loader as lazy
counted = {"bytes": 0}
original = lazy.LazyTensorLoader.get_tensor
def counting(self, *a, **k):
    t = original(self, *a, **k)
    if t is not None:
        counted["bytes"] += t.numel() * t.element_size()
    return t
lazy.LazyTensorLoader.get_tensor = counting
from mergekit.options import MergeOptions
from fwllm.mergekit_glue.merge import merge_recipe
recipe, out = sys.argv[1], sys.argv[2]
start = time.time()
merge_recipe(recipe, out, MergeOptions(quiet=True))
wall = time.time() - start
solve_bytes, gradient = 0, None
plan = os.path.join(out, "fwllm_plan", "plan.json")
if os.path.exists(plan):
    plan = json.load(open(plan))
    solve_bytes, gradient = plan["candidate_bytes_read"], plan.get("gradient")
print("RESULT " + json.dumps({
    "wall_s": wall,
    # VmHWM, not ru_maxrss: exec carries the parent's peak over into a child's ru_maxrss
    "peak_rss_mb": next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) / 1024,
    "bytes_read": counted["bytes"] + solve_bytes,
    "gradient": gradient,
}))
"""


def make_candidates(base_dir: str, n: int, root: str, rank: int = 8, scale: float = 0.02) -> list:
    """N candidates = base + distinct random low-rank deltas on every 2-D weight (bf16 shards)."""
    import torch

    from fwllm.io.models import load_model, load_tokenizer

    paths = []
    for i in range(n):
        path = os.path.join(root, f"cand{i:02d}")
        paths.append(path)
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        model = load_model(base_dir, torch.bfloat16)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    a = torch.randn(p.shape[0], rank, generator=g) * scale / rank**0.5
                    b = torch.randn(rank, p.shape[1], generator=g)
                    p += (a @ b * p.float().std()).to(p.dtype)
        model.save_pretrained(path, max_shard_size="100MB")
        load_tokenizer(base_dir).save_pretrained(path)
        del model
    return paths


def write_recipe(path, method, base, models, params):
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": base,
        "dtype": "bfloat16",
        "models": [
            {"model": m, "parameters": ({"weight": 1.0, "density": 0.2} if method == "ties" else {})}
            for m in models
        ],
    }
    if params:
        recipe["parameters"] = params
    with open(path, "w") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)


def run_child(recipe: str, out: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, recipe, out],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def calibration_file(root: str, rows: int) -> str:
    from fwllm.core.paths import data_root

    src = os.path.join(data_root(), "calibration", "code.jsonl")
    dst = os.path.join(root, "calib.jsonl")
    with open(src) as fi, open(dst, "w") as fo:
        for i, line in enumerate(fi):
            if i >= rows:
                break
            fo.write(line)
    return dst


def render_table(rows, sizes, labels) -> str:
    """One line per N: wall time and peak RSS of each run, as ratios to ties and to the smallest N."""
    by = {(r["method"], r["n"]): r for r in rows}
    n0, fws = min(sizes), [lab for lab in labels if lab != "ties"]
    head = ["N", "ties wall s"] + [f"{f} wall s" for f in fws] + [f"{f} / ties wall" for f in fws]
    head += ["ties RSS MB"] + [f"{f} RSS MB" for f in fws] + [f"{f} RSS / N={n0}" for f in fws]
    head += ["ties GiB read"] + [f"{f} GiB read" for f in fws]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sizes:
        t = by[("ties", n)]
        cells = [str(n), f"{t['wall_s']:.1f}"]
        cells += [f"{by[(f, n)]['wall_s']:.1f}" for f in fws]
        cells += [f"{by[(f, n)]['wall_s'] / t['wall_s']:.2f}" for f in fws]
        cells += [f"{t['peak_rss_mb']:.0f}"] + [f"{by[(f, n)]['peak_rss_mb']:.0f}" for f in fws]
        cells += [f"{by[(f, n)]['peak_rss_mb'] / by[(f, n0)]['peak_rss_mb']:.2f}" for f in fws]
        cells += [f"{t['bytes_read'] / 2**30:.2f}"] + [f"{by[(f, n)]['bytes_read'] / 2**30:.2f}" for f in fws]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(runs_done: list) -> list:
    """One row per (method, N): the median wall time and the largest peak RSS of its repeats."""
    import statistics

    groups: dict = {}
    for r in runs_done:
        groups.setdefault((r["method"], r["n"]), []).append(r)
    rows = []
    for (method, n), group in groups.items():
        walls = [r["wall_s"] for r in group]
        rows.append(
            {
                **group[0],
                "wall_s": statistics.median(walls),
                "wall_runs_s": walls,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
            }
        )
        rows[-1].pop("rep", None)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="base model folder (default: the smol pool's base)")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--rows", type=int, default=8, help="calibration rows (code prompts)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--fw-gradient",
        nargs="+",
        default=["full", "layerwise"],
        choices=["full", "layerwise"],
        help="FW gradient modes to run (layerwise: one layer on the solve device at a time)",
    )
    ap.add_argument(
        "--minibatches",
        type=int,
        nargs="*",
        default=[1],
        help="stochastic FW runs (gradient: full) with this many micro-batches per iteration",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per (method, N), interleaved; the table shows the median wall time and the max RSS",
    )
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fwllm-bench"))
    ap.add_argument("--out", default=os.path.join("eval", "reports"))
    args = ap.parse_args(argv)
    base = args.base
    if base is None:
        from fwllm.experts import build_pool

        base = build_pool("smol", "llama").base
    os.makedirs(args.work, exist_ok=True)
    cands = make_candidates(base, max(args.n), os.path.join(args.work, "candidates"))
    calib = calibration_file(args.work, args.rows)
    # the paper's open-loop FW (fw_merging's default adds a line search and a RegMean refine)
    fw_params = {
        "calibration": calib,
        "preset": "paper",
        "iterations": args.iterations,
        "max_length": args.max_length,
        "batch_size": 4,
        "scaling": 1.0,
    }
    runs = [("ties", "ties", None)] + [
        (f"fw_{mode}", "fw_merging", {**fw_params, "gradient": mode}) for mode in args.fw_gradient
    ]
    runs += [
        (f"fw_full_mb{k}", "fw_merging", {**fw_params, "gradient": "full", "batches_per_iteration": k})
        for k in args.minibatches
    ]
    runs_done = []
    for rep in range(args.repeat):  # interleaved, so a slow spell of the machine hits every method
        for n in args.n:
            for label, method, params in runs:
                recipe = os.path.join(args.work, f"{label}-{n}.yml")
                out = os.path.join(args.work, f"out-{label}-{n}")
                subprocess.run(["rm", "-rf", out])
                write_recipe(recipe, method, base, cands[:n], params)
                r = run_child(recipe, out)
                r.update(method=label, n=n, rep=rep)
                runs_done.append(r)
                print(
                    f"{label:>13} N={n:<3} wall {r['wall_s']:7.1f}s  peak RSS {r['peak_rss_mb']:8.0f} MB  "
                    f"read {r['bytes_read'] / 2**30:6.2f} GiB",
                    flush=True,
                )
                subprocess.run(["rm", "-rf", out])
    rows = summarise(runs_done)
    table = render_table(rows, args.n, [label for label, *_ in runs])
    layered = next(
        (r["gradient"] for r in rows if (r.get("gradient") or {}).get("device_weight_bytes")), None
    )
    if layered:
        table += (
            f"\n\nfw_layerwise keeps {layered['device_weight_bytes'] / 2**20:.0f} MiB of the "
            f"{layered['model_weight_bytes'] / 2**20:.0f} MiB fp32 weights on the solve device "
            f"(the modules outside the layer stack plus one layer; "
            f"{layered['device_weight_bytes'] / layered['model_weight_bytes']:.0%})."
        )
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = {
        "base": base,
        "iterations": args.iterations,
        "rows": args.rows,
        "max_length": args.max_length,
        "cpu_count": os.cpu_count(),
        "fw_gradient": args.fw_gradient,
        "minibatches": args.minibatches,
        "batch_size": fw_params["batch_size"],
        "repeat": args.repeat,
    }
    with open(os.path.join(args.out, "bench_fw.md"), "w") as fp:
        fp.write(
            f"# FW-Merging vs mergekit ties ({stamp})\n\nSettings: `{json.dumps(settings)}`\n\n{table}\n"
        )
    with open(os.path.join(args.out, "bench_fw.json"), "w") as fp:
        json.dump({"settings": settings, "rows": rows, "runs": runs_done}, fp, indent=2)


if __name__ == "__main__":
    main()
