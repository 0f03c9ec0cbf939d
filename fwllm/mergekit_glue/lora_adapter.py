"""A merge of a LoRA pool written as a peft LoRA adapter (mergekit issue #86).

Both merges fwllm makes of a LoRA pool are LoRAs themselves, of rank sum_i r_i:

* task arithmetic, sum_i c_i s_i B_i A_i: A = [A_i] stacked, B = [c_i s_i B_i] side by side;
* RegMean (fwllm.kernels.regmean_reduced): A = (S^-1 [G~_i A_i^T]_i)^T, B = [s_i B_i]_i.

So the merge ships as an adapter of a few MB instead of a full checkpoint: adapter_config.json
(r = the most common rank, per-module ranks in rank_pattern, lora_alpha = r so peft's scale is
1) and adapter_model.safetensors with peft's key names. `rank` truncates each delta to its best
rank-k approximation (from the factors, never the dense matrix) and reports the relative
Frobenius error per tensor. A merge with a dense term is not a LoRA: it is refused.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import save_file

from fwllm.core.errors import FwllmError
from fwllm.core.plan import FWPlanRecord, Plan, read_record
from fwllm.io.adapters import ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterReader, LoraFactors
from fwllm.io.models import ADAPTER_CONFIG
from fwllm.io.staged_output import staged_output
from fwllm.kernels.low_rank import LowRank, truncate, weighted_sum

FactorsLike = Union[LowRank, LoraFactors, Tuple[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LoraOutputReport:
    """What was written: per tensor its rank and relative truncation error, and the sizes."""

    out_dir: str
    ranks: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)  # ||delta - delta_k||_F / ||delta||_F (0: exact)
    adapter_bytes: int = 0
    dense_bytes: int = 0  # the same deltas stored densely in the same dtype

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        worst = max(self.errors.values(), default=0.0)
        return (
            f"LoRA adapter written to {self.out_dir}: {len(self.ranks)} tensors, rank "
            f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, "
            f"{self.adapter_bytes / 2**20:.2f} MiB ({self.adapter_bytes / max(self.dense_bytes, 1):.1%} "
            f"of the dense deltas' {self.dense_bytes / 2**20:.2f} MiB), max relative error {worst:.3g}"
        )


def _as_low_rank(name: str, value: FactorsLike) -> LowRank:
    if isinstance(value, LowRank):
        return value
    if isinstance(value, LoraFactors):
        if value.magnitude is not None:
            raise FwllmError(f"{name}: a DoRA term depends on the base weight, so the merge is not a LoRA")
        if value.transposed:
            raise FwllmError(
                f"{name}: fan_in_fan_out and embedding LoRA terms cannot be written as a merged adapter yet"
            )
        return LowRank(value.a, value.b, value.scale)
    if isinstance(value, tuple) and len(value) == 2:
        return LowRank(value[0], value[1])
    raise FwllmError(
        f"{name}: the merge has a dense term, so it is not low-rank and cannot be written as a "
        f"LoRA adapter; write the full merged model instead"
    )


def task_arithmetic_factors(terms: Mapping[str, Sequence[Tuple[float, FactorsLike]]]) -> Dict[str, LowRank]:
    """{weight: [(c_i, LoRA term i)]} -> {weight: sum_i c_i s_i B_i A_i} as factors of rank sum r_i."""
    out = {}
    for name, pairs in terms.items():
        pairs = [(c, _as_low_rank(name, f)) for c, f in pairs if c]
        if pairs:
            out[name] = weighted_sum([f for _, f in pairs], [c for c, _ in pairs])
    return out


def plan_factors(plan: Union[str, Plan, FWPlanRecord]) -> Tuple[Dict[str, LowRank], str]:
    """The factors of an FW-Merging plan over a LoRA pool whose steps are all task arithmetic,
    and the plan's base model: the same merge `fwllm merge` writes densely from that plan."""
    if isinstance(plan, str):
        plan = read_record(plan, "fw_merging", FWPlanRecord)
    record = plan.record if isinstance(plan, Plan) else plan
    if not getattr(record, "adapters", None):
        raise FwllmError(
            "the plan is not over a LoRA pool (its candidates are full checkpoints), so its "
            "merge is not low-rank; write the full merged model instead"
        )
    if record.coefficients is None:
        raise FwllmError(
            "the plan's merge is not task arithmetic in every step (it has no coefficients), "
            "so it is not low-rank; write the full merged model instead"
        )
    readers = [AdapterReader(folder, lazy=True) for folder in record.adapters]
    terms: Dict[str, List[Tuple[float, FactorsLike]]] = {}
    for name, coefs in record.coefficients.items():
        for reader, c in zip(readers, coefs):
            if not c:
                continue
            if name in reader.full:
                raise FwllmError(
                    f"{reader.adapter_dir} stores a full {name} (modules_to_save or a saved "
                    f"base layer): the merge has a dense term, so it is not low-rank"
                )
            if name in reader.factors:
                terms.setdefault(name, []).append((c, reader.factors[name]))
    return task_arithmetic_factors(terms), record.base


def _module(name: str) -> str:
    if not name.endswith(".weight"):
        raise FwllmError(f"{name} is not a weight: a LoRA adapter adapts `<module>.weight` tensors")
    return name[: -len(".weight")]


def adapter_config(ranks: Mapping[str, int], base_model: str) -> dict:
    """peft's LoRA config for {module: rank}: scale 1 everywhere (lora_alpha = r per module)."""
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    others = {m: k for m, k in ranks.items() if k != r}
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": "CAUSAL_LM",
    }


def write_lora_adapter(
    factors: Mapping[str, FactorsLike],
    out_dir: str,
    base_model: str,
    rank: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> LoraOutputReport:
    """Write {weight name: Delta W as factors} as a peft LoRA adapter folder (staged: it appears
    only once complete). `rank` truncates every delta to at most that rank (Eckart-Young)."""
    if rank is not None and rank < 1:
        raise FwllmError(f"the LoRA output rank must be >= 1 (got {rank})")
    deltas = {_module(name): _as_low_rank(name, value) for name, value in factors.items()}
    if not deltas:
        raise FwllmError("the merge changes no LoRA-adapted weight: there is no adapter to write")
    report = LoraOutputReport(os.path.abspath(out_dir))
    tensors: Dict[str, torch.Tensor] = {}
    itemsize = torch.empty((), dtype=dtype).element_size()
    for module, delta in sorted(deltas.items()):
        name = f"{module}.weight"
        if rank is not None:
            delta, report.errors[name] = truncate(delta, rank)
        else:
            delta, report.errors[name] = LowRank(delta.a, delta.b * delta.scale), 0.0
        report.ranks[name] = delta.rank
        out, inp = delta.shape
        report.dense_bytes += out * inp * itemsize
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = delta.a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = delta.b.to(dtype).contiguous()
    config = adapter_config({_module(n): k for n, k in report.ranks.items()}, base_model)
    with staged_output(out_dir, force=force) as staging:
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(staging, ADAPTER_CONFIG), "w", encoding="utf-8") as fp:
            json.dump(config, fp, indent=2)
        report.adapter_bytes = os.path.getsize(os.path.join(staging, ADAPTER_WEIGHTS))
    return report


def write_lora_merge(
    plan_or_factors: Union[str, Plan, FWPlanRecord, Mapping[str, FactorsLike]],
    out_dir: str,
    rank: Optional[int] = None,
    base_model: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> LoraOutputReport:
    """A LoRA pool's merge as a peft adapter: from an FW plan (its folder, Plan or record; see
    `plan_factors`) or from {weight: factors} (then `base_model` names the base for the config)."""
    if isinstance(plan_or_factors, Mapping):
        factors = plan_or_factors
        if not base_model:
            raise FwllmError("write_lora_merge needs base_model when given factors rather than a plan")
    else:
        factors, plan_base = plan_factors(plan_or_factors)
        base_model = base_model or plan_base
    return write_lora_adapter(factors, out_dir, base_model, rank=rank, dtype=dtype, force=force)
