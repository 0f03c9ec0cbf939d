"""What a pool-quality run merges and scores (`QualitySettings`), and the `key=value` overrides
`fwllm demo --fw` (and eval/quality.py) apply to the FW recipes. Light: no torch, no mergekit, so
the CLI parses its options before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Sequence

import yaml

from fwllm.core.errors import FwllmError
from fwllm.core.params import FW_PRESETS
from fwllm.demo.dev_rows import DevBudget
from fwllm.demo.recipes import PoolSettings
from fwllm.evaluation import figures as q

# the methods `fwllm demo` merges with (the benchmark's: fwbench.quality_bench.QUALITY_METHODS)
DEMO_METHODS = ("task_arithmetic", "regmean", "fw_hard")
# FW settings of the smol benchmark and demo (`--fw` overrides them): fw_merging's defaults, every
# preset key written out so PoolSettings' own FW values (iterations, step_size, ...) do not apply.
# On the demo's 8-expert pool line search with a growing hull lifted FW-hard from 68 to 82
# held-in points, RegMean's closed form over FW's per-layer support to 91; choosing the support for
# the whole model (12 steps) and merging it with RegMean's equal weights reached 97.0 at N = 4 and
# N = 8 alike (eval/reports/quality/report.md), which made these settings the recipe default.
SMOL_FW = dict(FW_PRESETS["default"])


@dataclass
class QualitySettings:
    sizes: Sequence[int] = (2, 4, 8)
    methods: Sequence[str] = DEMO_METHODS
    budget: DevBudget = field(default_factory=DevBudget)
    merge: PoolSettings = field(default_factory=PoolSettings)
    fw: Dict[str, object] = field(
        default_factory=dict
    )  # fw_merging recipe overrides; "hard."/"soft." for one
    ta_scales: Sequence[float] = q.grid(0.1, 1.0, 0.1)  # task arithmetic's lambda grid
    resamples: int = 2000
    device: str = "cpu"
    cache: bool = True
    max_batch_tokens: int = 1024
    score_dtype: str = "auto"  # fwllm.evaluation.likelihood.scoring_dtype


def parse_overrides(pairs: Sequence[str]) -> Dict[str, object]:
    """`key=value` strings -> {key: YAML-parsed value} (so 12 is an int and true a bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FwllmError(f"override {pair!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def with_fw_overrides(merge: PoolSettings, fw: Dict[str, object]) -> PoolSettings:
    """Recipe parameter overrides for fw_hard and fw_soft; a `hard.` / `soft.` prefix targets one."""
    extra = {k: dict(v) for k, v in merge.extra.items()}
    for key, value in fw.items():
        variant, dot, name = key.partition(".")
        targets = [f"fw_{variant}"] if dot and variant in ("hard", "soft") else ["fw_hard", "fw_soft"]
        for t in targets:
            extra.setdefault(t, {})[name if dot and variant in ("hard", "soft") else key] = value
    return replace(merge, extra=extra)
