"""Recipe parameters of fwllm's methods, with their ranges in the schema.

A recipe is checked against these models when it loads: by `fwllm merge` before any
model is read, and under plain `mergekit-yaml` when mergekit's planner binds each
parameter (the adapter hands mergekit the same constrained types). A misspelt key is an
error (`extra="forbid"`): mergekit itself would drop it silently.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fwllm.core.errors import FwllmError

LOG = logging.getLogger(__name__)

# Ceilings no real merge reaches, so a typo (iterations: 1000000) is one error, not a run of
# years: 10,000 FW iterations or Adam steps is 20x AdaMerging's 500 steps and far beyond
# FW-Merging's tens of iterations; 100,000 rows per task is
# fwllm.data.calibration.MAX_TASK_ROWS; 131,072 tokens is the longest context of common models
# (the model's own context is checked in preflight); 1,024 rows per micro-batch.
MAX_STEPS = 10_000
MAX_ROWS = 100_000
MAX_LENGTH = 131_072
MAX_BATCH = 1_024


class MethodParams(BaseModel):
    """Scalar parameters every data-informed method takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calibration: Optional[str] = None  # .jsonl file or folder of .jsonl files (one per task); required
    max_rows: Optional[int] = Field(None, ge=1, le=MAX_ROWS)  # per task; None = all rows
    max_length: int = Field(256, ge=2, le=MAX_LENGTH)  # tokens per row (default: capped at the context)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    seed: int = 0
    device: Optional[str] = None  # solve device; default: mergekit's --device, else cpu
    plan: Optional[str] = None  # reuse (or keep) the plan in this folder
    no_cache: bool = False  # solve afresh (plain mergekit's --no-cache): no cached plan or statistic
    keep_merged: bool = False  # `fwllm merge`: keep the plan's float32 copy of the merged tensors
    # `fwllm merge`: also write a LoRA pool's merge as a peft adapter in this folder (as --lora-out),
    # truncated to `lora_rank` by SVD when set (as --lora-rank)
    lora_out: Optional[str] = None
    lora_rank: Optional[int] = Field(None, ge=1)


LocalMerge = Literal["task_arithmetic", "ties", "dare_ties", "dare_linear"]

# FW-Merging's settings as data: `preset` names one; a key the recipe writes overrides it. The
# default is what won the quality benchmark (eval/reports/quality/report.md, FW-hard: 97.0
# held-in normalized at N = 4 and N = 8, against tuned TA's 70.1 / 62.9 and RegMean's 97.2 /
# 90.5): FW picks the support for the whole model by line search from the base, RegMean merges
# it. `paper` is the paper's open-loop FW (arXiv 2503.12649), which needs no Gram pass.
FW_PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {
        "iterations": 12,
        "step_size": 0.3,
        "granularity": "model",
        "local_merge": "task_arithmetic",
        "refine": "regmean",
        "regmean_weights": "uniform",
        "init": "base",
        "scaling": 1.0,
        "step": "adaptive",
        "hull": "adaptive",
    },
    "paper": {
        "iterations": 10,
        "step_size": 0.1,
        "granularity": "tensor",
        "local_merge": "task_arithmetic",
        "refine": "none",
        "regmean_weights": "fw",
        "init": "task_arithmetic",
        "scaling": 0.3,
        "step": "open_loop",
        "hull": "fixed",
    },
}
# Old spellings of recipe values, still accepted with a one-line notice (once per process each):
# `local_merge: regmean` is a refine after the solve, not a local merge; `granularity: layer` meant
# one vertex per weight tensor, and "layer" now means only a decoder layer (`gradient: layerwise`).
_ALIASES = {
    ("local_merge", "regmean"): "`local_merge: regmean` is deprecated; write `refine: regmean` "
    "(FW's steps stay task arithmetic)",
    ("granularity", "layer"): "`granularity: layer` is deprecated; write `granularity: tensor` "
    "(one vertex per weight tensor, the same setting)",
}
_ALIAS_WARNED: set = set()


def _warn_alias_once(key: Tuple[str, str]) -> None:
    if key not in _ALIAS_WARNED:
        _ALIAS_WARNED.add(key)
        LOG.warning("fw_merging: %s", _ALIASES[key])


def resolve_fw_preset(raw: Any) -> Any:
    """The recipe's FW parameters with every preset key filled: the written value, else the
    preset's. Unset keys arrive missing (FWParams(...)) or None (mergekit passes every declared
    parameter, with its default None), so a written value is never mistaken for a default."""
    if not isinstance(raw, dict):
        return raw
    data = {k: v for k, v in raw.items() if not (k in FW_PRESETS["default"] and v is None)}
    if data.get("granularity") == "layer":
        _warn_alias_once(("granularity", "layer"))
        data["granularity"] = "tensor"
    if data.get("local_merge") == "regmean":  # the old spelling of the refine
        _warn_alias_once(("local_merge", "regmean"))
        if data.get("refine", "regmean") != "regmean":
            raise FwllmError(
                f"fw_merging: local_merge: regmean means refine: regmean; the recipe also "
                f"sets refine: {data['refine']} (write refine only)"
            )
        data.update(local_merge="task_arithmetic", refine="regmean")
    preset = data.get("preset") or "default"
    if preset not in FW_PRESETS:
        return data  # the field's own check names the presets
    written = set(data)
    data = {**FW_PRESETS[preset], **data}
    # a preset default that cannot go with a written setting yields to it: an open-loop or
    # pairwise solve keeps a fixed hull, a pairwise one steps per tensor
    if "hull" not in written and (data["step"] == "open_loop" or data.get("pairwise")):
        data["hull"] = "fixed"
    if "granularity" not in written and data.get("pairwise"):
        data["granularity"] = "tensor"
    return data


class FWParams(MethodParams):
    """FW-Merging; the one settings object the solver reads too. The keys of FW_PRESETS default
    to None here and are filled from the preset when the recipe is validated (see there)."""

    preset: Literal["default", "paper"] = "default"
    iterations: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    step_size: Optional[float] = Field(None, gt=0, le=1)  # open_loop: gamma_t = step_size * 2 / (t + 2)
    granularity: Optional[Literal["tensor", "model"]] = None  # one vertex per weight tensor, or per model
    variant: Literal["hard", "soft"] = "hard"
    top_k: int = Field(2, ge=1)  # soft: vertices mixed per step
    soft_steps: int = Field(2, ge=0)  # soft: projected-gradient steps on the mix
    # the merge of FW's vertices; "regmean" is the deprecated spelling of refine: regmean
    local_merge: Optional[Literal["task_arithmetic", "ties", "dare_ties", "dare_linear", "regmean"]] = None
    # regmean: FW picks the support, RegMean's closed form merges each linear weight over it at the end
    refine: Optional[Literal["none", "regmean"]] = None
    scaling: Optional[float] = Field(None, gt=0)  # lambda: vertices theta_0 + lambda * tau_i
    density: float = Field(0.2, gt=0, le=1)  # ties: fraction kept by trim
    drop_rate: float = Field(0.5, ge=0, lt=1)  # dare: drop probability
    init: Optional[Literal["task_arithmetic", "base"]] = None
    sketch_ratio: float = Field(32.0, ge=1)  # 1 = exact inner products
    # GiB of sketches held in RAM; beyond, they are kept on disk and read block by block at every
    # iteration, so RAM stays flat in N (at 1.1B, 1/32 of each candidate is 0.14 GiB)
    sketch_memory: float = Field(0.5, gt=0)
    # GiB of per-layer activation checkpoints (layerwise gradient) held on the host: micro-batches are
    # grouped to fit, and every group reads the model twice, so more memory means fewer model reads
    # (7B at 4 x 512 tokens: 1 GiB per micro-batch)
    checkpoint_memory: float = Field(1.0, gt=0)
    rescore: float = Field(0.0, ge=0)  # z: re-check contenders within z sketch errors (0 = off)
    gradient: Literal["auto", "full", "layerwise"] = (
        "auto"  # auto: full if it fits in free RAM, else layerwise
    )
    batches_per_iteration: int = Field(0, ge=0)  # stochastic FW: micro-batches per task (0 = all)
    # line_search: gamma from 2 extra forward evaluations per step; adaptive: gamma from a curvature
    # carried between steps, checked by the next iteration's own forward (an extra one only when a
    # step is retried); it needs exact scores (LoRA pools, sketch_ratio: 1), else it searches
    step: Optional[Literal["open_loop", "line_search", "adaptive"]] = None
    hull: Optional[Literal["fixed", "adaptive"]] = None  # adaptive: lambda doubles while steps reach it
    pairwise: bool = False  # pairwise steps: move mass from the worst active vertex to the FW vertex
    regmean_alpha: float = Field(0.9, ge=0, le=1)  # refine regmean: off-diagonal scale of the Grams
    # refine regmean: "fw" weighs each candidate by FW's coefficient and keeps FW's mass;
    # "uniform": FW only picks the support, RegMean merges it with equal weights (RegMean's own)
    regmean_weights: Optional[Literal["fw", "uniform"]] = None

    @model_validator(mode="before")
    @classmethod
    def fill_from_preset(cls, data: Any) -> Any:
        return resolve_fw_preset(data)

    @property
    def step_merge(self) -> str:
        """The local merge of FW's own steps (the refine, if any, comes after the solve)."""
        return self.local_merge

    @property
    def refined(self) -> bool:
        return self.refine == "regmean"


class FisherParams(MethodParams):
    fisher: Literal["exact", "empirical"] = "exact"
    top_k: int = Field(5, ge=0)  # exact causal-LM Fisher: most likely tokens per position; 0 = all
    epsilon: float = Field(1e-8, gt=0)  # floor on every Fisher entry (keeps the merge defined)
    normalize_fisher: bool = False  # divide each model's Fisher by its mean first
    # layerwise: one layer at a time from each candidate's shards (LMs and encoders); auto: layerwise
    # when the in-RAM solve would need more than half the free RAM
    gradient: Literal["auto", "full", "layerwise"] = "auto"


class RegMeanParams(MethodParams):
    alpha: float = Field(0.9, ge=0, le=1)  # off-diagonal scale of the Grams (1 = exact least squares)
    ridge: float = Field(1e-5, ge=0)  # singular Gram sums only: + ridge * mean(diag) * I
    # layerwise: Grams measured one decoder layer at a time and reduced as they come (no per-candidate
    # Gram on disk, no whole model in RAM); auto: full if the in-RAM solve fits in free RAM, else layerwise
    gradient: Literal["auto", "full", "layerwise"] = "auto"


class AdaMergingParams(MethodParams):
    steps: int = Field(16, ge=0, le=MAX_STEPS)  # Adam steps, one full pass over the calibration rows each
    lr: float = Field(0.01, gt=0)  # the paper uses 1e-3 over 500 steps; a short run needs more
    init_lambda: float = 0.3  # every coefficient's starting value (the paper's)
    clamp: bool = True  # keep coefficients in [0, 1] after every step
    # layerwise: the merged model runs one layer at a time, formed from base + taus (LMs and encoders);
    # auto: layerwise when the in-RAM solve would need more than half the free RAM
    gradient: Literal["auto", "full", "layerwise"] = "auto"
