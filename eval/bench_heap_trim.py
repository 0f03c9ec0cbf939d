"""What handing freed heap pages back costs and saves: the layer-by-layer floor (one forward+backward
of the bench_scale calibration rows through a 16-LoRA pool), with the heap trim of `fwllm.core.memory`
off, after every released layer, and once per evaluation (`fwbench.heap_trim`).

    python eval/bench_heap_trim.py [--model tinyllama-1.1b] [--evaluations 2] [--repeats 2] [--out eval/reports]

Each run is a child process (`eval/bench_scale.py`'s floor) that evaluates `--evaluations` times: the
heap's fragmentation shows from the second evaluation on. Prints one table (medians over the repeats)
and writes bench_heap_trim.md / .json. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scale  # noqa: E402
import scale_models  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinyllama-1.1b", choices=sorted(scale_models.SHAPES))
    ap.add_argument("--evaluations", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "fwllm", "bench_scale"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports"))
    args = ap.parse_args(argv)
    from fwllm.core.paths import data_root

    tokenizer = scale_models.write_tokenizer(
        os.path.join(args.work, "tokenizer"), os.path.join(data_root(), "calibration", "code.jsonl")
    )
    calib = bench_scale.calibration(os.path.join(args.work, "calib"))
    base = scale_models.write_model(os.path.join(args.work, args.model, "base"), args.model, tokenizer)
    adapters = scale_models.paper_pool(
        os.path.join(args.work, args.model, "adapters"), scale_models.config_of(args.model)
    )
    variants = [
        ("off", "off"),
        ("after every released layer", "layer"),
        ("once per evaluation", "evaluation"),
    ]
    runs = {label: [] for label, _ in variants}
    for _ in range(args.repeats):  # variants interleaved, so a slow spell of the machine hits them alike
        for label, trim in variants:
            runs[label].append(
                bench_scale.run_child(
                    "floor",
                    {
                        "base": base,
                        "adapters": adapters,
                        "calibration": calib,
                        "max_length": 64,
                        "batch_size": 4,
                        "trim": trim,
                        "evaluations": args.evaluations,
                    },
                )
            )
            print(label, json.dumps(runs[label][-1]), flush=True)
    rows = [
        {
            "variant": label,
            "trim": trim,
            "runs": runs[label],
            "evaluation_s": statistics.median(statistics.mean(r["evaluations_s"]) for r in runs[label]),
            "peak_anon_gib": statistics.median(r["peak_anon_gib"] for r in runs[label]),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in runs[label]),
        }
        for label, trim in variants
    ]
    off = rows[0]
    lines = [
        f"# Heap trim on the layer-by-layer floor ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores)",
        "",
        f"{args.model} + 16 LoRA adapters, {args.evaluations} forward+backward evaluations per run, medians of "
        f"{args.repeats} runs.",
        "",
        "| trim | s per evaluation | vs off | peak anon GiB | vs off | peak RSS GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['evaluation_s']:.1f} | {r['evaluation_s'] / off['evaluation_s']:.2f} | "
            f"{r['peak_anon_gib']:.2f} | {r['peak_anon_gib'] / off['peak_anon_gib']:.2f} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_heap_trim.md"), "w", encoding="utf-8") as fp:
        fp.write(table)
    with open(os.path.join(args.out, "bench_heap_trim.json"), "w", encoding="utf-8") as fp:
        json.dump(rows, fp, indent=1)
    print(table)


if __name__ == "__main__":
    main()
