"""peft LoRA adapters as weight-space task vectors.

For a LoRA layer, Delta W = B A * s with s = alpha / r (alpha / sqrt(r) for rsLoRA), taken
from the adapter's own config. The variants peft writes are handled as peft merges them
(`merge_and_unload`), so a merge over adapters equals a merge over their merged models:

* ``fan_in_fan_out`` (GPT-2 style Conv1D weights): Delta W = (B A)^T * s;
* ``lora_embedding_A/B`` (embedding layers): Delta W = (B A)^T * s;
* DoRA (``use_dora``, ``lora_magnitude_vector`` m): W' = m / ||W + Delta W|| * (W + Delta W), the
  norm taken per output feature (rows of a Linear weight, columns of a transposed one), so the
  task vector depends on the base weight and is formed densely;
* ``modules_to_save`` and saved ``base_layer`` weights: full tensors that replace the base's.

Per-module rank or alpha patterns and trained LoRA biases are refused with one clear error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from safetensors import safe_open

from fwllm.core.errors import FwllmError
from fwllm.io.models import ADAPTER_CONFIG
from fwllm.io.tensors import RESIDENT

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One adapted weight: Delta W = B A * scale, transposed when `transposed`."""

    a: torch.Tensor  # [r, in]  (embeddings: [r, num_embeddings])
    b: torch.Tensor  # [out, r] (embeddings: [dim, r])
    scale: float
    transposed: bool = False
    magnitude: Optional[torch.Tensor] = None  # DoRA's per-output-row magnitude

    def low_rank_delta(self) -> torch.Tensor:
        d = (self.b.float() @ self.a.float()) * self.scale
        return d.T if self.transposed else d

    def delta(self, base: torch.Tensor) -> torch.Tensor:
        d = self.low_rank_delta()
        if self.magnitude is not None:
            # DoRA normalises each output feature: a row of a Linear weight [out, in], a column of
            # a transposed one (Conv1D [in, out], embedding [num_embeddings, dim]), as peft does
            w = base.float() + d
            norm = torch.linalg.norm(w, dim=0 if self.transposed else 1, keepdim=True)
            d = self.magnitude.float().reshape(norm.shape) / norm * w - base.float()
        return d


def _split_key(key: str):
    """peft key -> (target weight name, part): A, B, EA/EB (embedding factors), M (DoRA magnitude), FULL."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for marker, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "EA"),
                         (".lora_embedding_B", "EB"), (".lora_magnitude_vector", "M")):
        if name.endswith(marker):
            return name[: -len(marker)] + ".weight", part
    if ".lora_" in name:
        return name, "UNKNOWN"
    return name.replace(".base_layer.", "."), "FULL"


class AdapterReader:
    """A LoRA adapter folder, read once: its factors and full tensors stay in RAM (they are small)."""

    def __init__(self, adapter_dir: str):
        path = os.path.join(adapter_dir, ADAPTER_CONFIG)
        try:
            with open(path, encoding="utf-8") as fp:
                cfg = json.load(fp)
        except (OSError, ValueError) as err:
            raise FwllmError(f"cannot read {path}: {err}") from None
        if cfg.get("peft_type", "LORA") != "LORA":
            raise FwllmError(f"{adapter_dir}: only LoRA adapters are supported (got {cfg.get('peft_type')})")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise FwllmError(f"{adapter_dir}: per-module rank/alpha patterns are not supported")
        if cfg.get("lora_bias"):
            raise FwllmError(f"{adapter_dir}: LoRA adapters with trained biases (lora_bias) are not supported")
        self.adapter_dir = adapter_dir
        self.base_model = cfg.get("base_model_name_or_path")
        self.config = cfg
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights):
            raise FwllmError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (fwllm reads safetensors only)")
        parts: Dict[str, Dict[str, torch.Tensor]] = {}
        embedded = set()
        self.full: Dict[str, torch.Tensor] = {}  # modules_to_save / saved base layers
        self.bytes_read = 0
        with safe_open(weights, framework="pt") as fp:
            for key in fp.keys():
                target, part = _split_key(key)
                if part == "UNKNOWN":
                    raise FwllmError(f"{adapter_dir}: unsupported adapter tensor {key}")
                t = fp.get_tensor(key).clone()
                self.bytes_read += t.numel() * t.element_size()
                if part == "FULL":
                    self.full[target] = t
                else:
                    # embedding factors multiply the other way round: Delta W = (B A)^T
                    parts.setdefault(target, {})[part.lstrip("E")] = t
                    if part.startswith("E"):
                        embedded.add(target)
        self.factors: Dict[str, LoraFactors] = {}
        for name, ab in parts.items():
            if not {"A", "B"} <= set(ab):
                raise FwllmError(f"{adapter_dir}: {name} has only {sorted(ab)} of lora_A/lora_B")
            self.factors[name] = LoraFactors(ab["A"], ab["B"], self.scale,
                                             transposed=self.fan_in_fan_out or name in embedded,
                                             magnitude=ab.get("M"))

    def targets(self) -> List[str]:
        """The base tensors this adapter changes."""
        return sorted(set(self.factors) | set(self.full))

    def check_targets(self, base: Union[Iterable[str], Mapping[str, tuple]], label: str) -> None:
        """Every target exists in the base and, given the base's shapes, fits it: a clear error
        before any solve (a LoRA pool's iterate never forms the delta that would reveal it)."""
        known = base if isinstance(base, Mapping) else {n: None for n in base}
        missing = [n for n in self.targets() if n not in known]
        if missing:
            raise FwllmError(f"{label}: the adapter targets {missing[0]}, which the base model does not have "
                             f"({len(missing)} such tensor(s); was it trained on another base?)")
        for name in self.targets():
            shape = known[name]
            if shape is None:
                continue
            f, full = self.factors.get(name), self.full.get(name)
            got = tuple(full.shape) if full is not None else (
                (f.a.shape[1], f.b.shape[0]) if f.transposed else (f.b.shape[0], f.a.shape[1]))
            if got != tuple(shape):
                raise FwllmError(f"{label}: the adapter's {name} is {got}, the base's is {tuple(shape)} "
                                 f"(an adapter for another base model?)")

    def delta(self, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
        """tau for one tensor, or None where the adapter leaves the base unchanged."""
        full, f = self.full.get(name), self.factors.get(name)
        if full is None and f is None:
            return None
        out = None
        if full is not None:
            if tuple(full.shape) != tuple(base.shape):
                raise FwllmError(f"{self.adapter_dir}: {name} has shape {tuple(full.shape)}, the base "
                                 f"{tuple(base.shape)}")
            out = full.float() - base.float()
        if f is not None:
            start = base.float() if out is None else base.float() + out
            d = f.delta(start)
            if tuple(d.shape) != tuple(base.shape):
                raise FwllmError(f"{self.adapter_dir}: the LoRA delta for {name} has shape {tuple(d.shape)}, "
                                 f"the base {tuple(base.shape)}")
            out = d if out is None else out + d
        return RESIDENT.track(out)
