"""Every data-informed method, in RAM and layer by layer, at a real model size: the same merge?

The tests check `gradient: layerwise` against `gradient: full` on tiny models; this checks it where the
numbers are those of a real model: a SmolLM2-135M-shaped base (random bf16 weights of the real shapes, as
`eval/bench_scale.py` writes them) with LoRA adapters of its pool, merged by `regmean`, `fisher` (empirical),
`adamerging` and `fw_merging` (its defaults) once with each gradient. Prints, per method, the largest
relative difference max|a - b| / max|b| over the merged tensors that differ from the base, and whether
every tensor is within rtol 1e-5 (plus atol 1e-6 x the tensor's scale).

    python eval/layerwise_equality.py --pool WORK/smol-135m --calibration WORK/calib_2x4x64 [--adapters 4]
                                      [--out eval/reports/layerwise_equality.md]

WORK is `eval/bench_scale.py --work` (it writes the pool and the calibration files).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import yaml
from safetensors import safe_open

METHODS = {
    "regmean": {},
    "fisher": {"fisher": "empirical"},
    "adamerging": {"steps": 2},
    "fw_merging": {"iterations": 2},
}


def recipe(path, method, base, adapters, calibration, gradient, tasks):
    models = [
        {"model": f"{base}+{a}", "parameters": {"task": tasks[i % len(tasks)]}}
        for i, a in enumerate(adapters)
    ]
    params = {
        "calibration": calibration,
        "max_length": 64,
        "batch_size": 4,
        "gradient": gradient,
        **METHODS[method],
    }
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": base,
                "models": models,
                "parameters": params,
                "dtype": "float32",
            },
            fp,
            sort_keys=False,
        )


def tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as fp:
                out.update({k: fp.get_tensor(k) for k in fp.keys()})
    return out


def compare(a, b, base):
    worst, moved, close = 0.0, 0, True
    for name, x in a.items():
        y = b[name].float()
        x = x.float()
        if name in base and torch.equal(y, base[name].float()) and torch.equal(x, y):
            continue
        moved += 1
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / scale)
        close = close and torch.allclose(x, y, rtol=1e-5, atol=1e-6 * scale)
    return worst, moved, close


def main():
    from mergekit.options import MergeOptions

    from fwllm.mergekit_glue.merge import merge_recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True, help="bench_scale's model folder (base/ and adapters/)")
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = os.path.join(args.pool, "base")
    adapters = [
        os.path.join(args.pool, "adapters", a)
        for a in sorted(os.listdir(os.path.join(args.pool, "adapters")))
    ]
    adapters = adapters[: args.adapters]
    tasks = sorted(os.path.splitext(f)[0] for f in os.listdir(args.calibration) if f.endswith(".jsonl"))
    base_tensors = {k: v.float() for k, v in tensors(base).items()}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("FWLLM_CACHE", os.path.join(work, "cache"))
        for method in args.methods:
            outs, seconds = {}, {}
            for gradient in ("full", "layerwise"):
                path = os.path.join(work, f"{method}-{gradient}.yml")
                recipe(path, method, base, adapters, args.calibration, gradient, tasks)
                t0 = time.time()
                outs[gradient] = merge_recipe(
                    path, os.path.join(work, f"{method}-{gradient}"), MergeOptions(quiet=True)
                )
                seconds[gradient] = time.time() - t0
            worst, moved, close = compare(tensors(outs["layerwise"]), tensors(outs["full"]), base_tensors)
            rows.append(
                f"| {method} | {moved} | {worst:.2e} | {'yes' if close else 'NO'} | "
                f"{seconds['full']:.0f} / {seconds['layerwise']:.0f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"# `gradient: layerwise` against `gradient: full` ({time.strftime('%Y-%m-%d')})",
            "",
            f"Command: `python {' '.join(sys.argv)}`; {len(adapters)} LoRA adapters of the pool, tasks {tasks}.",
            "",
            "| method | merged tensors that moved | max relative difference | within rtol 1e-5 | seconds full / layerwise |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fp:
            fp.write(table)


if __name__ == "__main__":
    main()
