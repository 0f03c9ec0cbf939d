"""The full quality benchmark (`python eval/quality.py`): the benchmark's engine
(`fwbench.quality_engine`, built on fwllm's pool-quality engine that `fwllm demo` runs on three
methods and a few dev rows) on every method, every dev row, and held-out GLUE tasks nobody trained on.

Names here are the benchmark's: `QUALITY_METHODS` (the matrix's are `fwbench.matrix.MATRIX_METHODS`,
which adds average and AdaMerging and tunes nothing) and `SMOL_ROWS` (dev rows per task of the
whole benchmark; the demo's cut is `fwllm.demo.run.SMOL_DEMO_ROWS`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Optional, Sequence

from fwllm.core.errors import FwllmError
from fwllm.core.paths import data_root as shared_data_root
from fwllm.demo.recipes import PoolSettings
from fwbench.held_out import held_out_tasks
from fwbench.quality_engine import BenchSettings, run_quality

QUALITY_METHODS = ("task_arithmetic", "ties", "dare_ties", "regmean", "fisher", "fw_hard", "fw_soft")
# dev rows per task of the smol benchmark: every one there is (scoring in bfloat16 keeps
# `python eval/quality.py` within 90 min on 2 CPU cores); `--rows task=N` cuts a task
SMOL_ROWS: Dict[str, Optional[int]] = {}
HELD_OUT = ("rte", "cola")  # GLUE tasks none of the smol experts trained on


def with_method_overrides(merge: PoolSettings, params: Dict[str, object]) -> PoolSettings:
    """`regmean.alpha=0.7`-style recipe parameter overrides of the untuned data-informed baselines."""
    extra = {k: dict(v) for k, v in merge.extra.items()}
    for key, value in params.items():
        method, dot, name = key.partition(".")
        if not dot or method not in ("regmean", "fisher") or not name:
            raise FwllmError(f"override {key!r}: write regmean.KEY or fisher.KEY (FW's go through --fw)")
        extra.setdefault(method, {})[name] = value
    return replace(merge, extra=extra)


def run_benchmark(
    pool,
    out_dir: str,
    s: BenchSettings,
    held_out: Sequence[str] = HELD_OUT,
    log: Callable[[str], None] = print,
    work_dir: Optional[str] = None,
) -> dict:
    """`run_quality` with held-out GLUE tasks (smol pools only: the tiny tasks have no GLUE twin)."""
    root = shared_data_root(required=pool.profile == "smol")
    tasks = held_out_tasks(held_out, s.budget, root) if (root and held_out and pool.profile == "smol") else []
    return run_quality(pool, out_dir, s, log, work_dir, tasks)
