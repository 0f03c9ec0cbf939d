"""The main job on an embedded default, end to end (`fwllm demo`).

1. build (or reuse) a pool of real, really-trained experts (`fwllm.experts`): relevant
   experts on distinct tasks plus irrelevant ones;
2. merge the first N experts with tuned task arithmetic (lambda chosen on the calibration loss),
   RegMean and FW-Merging with the defaults (`fwllm.demo.pool_quality`), and score every merge
   with task metrics on held-out dev rows, 95% bootstrap intervals (the full quality benchmark,
   with more methods and held-out tasks, is `python eval/quality.py`, outside the package);
3. print the table and write report.md / results.json into the output folder.

Merges and scores are cached in the output folder, so a second run prints the table again
in seconds and a run with other FW settings (`--fw`) only redoes the FW merge.
"""

from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import click

from fwllm.demo.dev_rows import DevBudget
from fwllm.demo.pool_quality import run_quality
from fwllm.demo.recipes import PoolSettings
from fwllm.demo.settings import DEMO_METHODS, SMOL_FW, QualitySettings
from fwllm.experts import build_pool

# dev rows per task: the benchmark's tasks, cut to what a first run affords on 2 CPU cores
# (the full benchmark scores every row: fwbench.quality_bench.SMOL_ROWS)
SMOL_DEMO_ROWS = {"math": 24, "pubmedqa": 48, "sst2": 96, "code": 16}
TINY_DEMO_ROWS = {"copy": 32, "rev": 32, "sort": 32, "inc": 32}
# The tiny experts map one prompt format to conflicting outputs (copy vs reverse), which no least-squares
# merge can serve: RegMean's closed form, and so the default FW's refine, lands below the base there
# (-47 held-in points at N = 4, tuned TA +3.8). The tiny profile is a seconds-long smoke run of the
# pipeline, so it runs the paper's FW, which needs no Gram pass; `--fw preset=default` runs the default.
TINY_FW = {"preset": "paper"}


def demo_settings(
    profile: str, sizes: Optional[Sequence[int]], fw: Dict[str, object], device: str, cache: bool = True
) -> QualitySettings:
    tiny = profile == "tiny"
    merge = (
        PoolSettings(step_size=0.5, max_rows=16, max_length=64, batch_size=8, dtype="float32")
        if tiny
        else PoolSettings()
    )
    return QualitySettings(
        sizes=tuple(sizes or ((4, 7) if tiny else (8,))),
        methods=DEMO_METHODS,
        budget=DevBudget(rows=dict(TINY_DEMO_ROWS if tiny else SMOL_DEMO_ROWS)),
        merge=merge,
        fw={**TINY_FW, **fw} if tiny else {**SMOL_FW, **fw},
        resamples=1000,
        device=device,
        cache=cache,
    )


def run_demo(
    profile: str = "smol",
    out_dir: str = "runs/demo",
    root: Optional[str] = None,
    sizes: Optional[Sequence[int]] = None,
    fw: Optional[Dict[str, object]] = None,
    device: str = "cpu",
    cache: bool = True,
) -> Dict:
    start = time.time()
    pool = build_pool(profile, "llama", root=root, device=device)
    pool_seconds = time.time() - start
    report = run_quality(
        pool, out_dir, demo_settings(profile, sizes, fw or {}, device, cache), log=click.echo
    )
    click.echo("\n" + report["table"])
    total = time.time() - start
    click.echo(
        "\nHeld-in normalized: merged / expert x 100 (accuracy tasks), share of the expert's loss gain kept "
        "(loss tasks); 95% bootstrap intervals. Full benchmark: python eval/quality.py"
    )
    click.echo(
        f"written to {out_dir}/report.md ({total / 60:.1f} min: expert pool {pool_seconds / 60:.1f} min, "
        f"benchmark {report['seconds'] / 60:.1f} min)"
    )
    report["demo_seconds"] = {"total": round(total, 1), "pool": round(pool_seconds, 1)}
    return report
