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
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    for marker, part in (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_embedding_A", "EA"),
        (".lora_embedding_B", "EB"),
        (".lora_magnitude_vector", "M"),
    ):
        if name.endswith(marker):
            return name[: -len(marker)] + ".weight", part
    if ".lora_" in name:
        return name, "UNKNOWN"
    return name.replace(".base_layer.", "."), "FULL"


class _Stored(Mapping):
    """target -> its tensors, read from the adapter file at each access and not kept (a lazy reader)."""

    def __init__(self, reader: "AdapterReader", keys: Dict[str, Dict[str, str]], make):
        self._reader, self._keys, self._make = reader, keys, make

    def __getitem__(self, target: str):
        with safe_open(self._reader.weights_path, framework="pt") as fp:
            tensors = {part: self._reader._read(fp, key) for part, key in self._keys[target].items()}
        return self._make(target, tensors)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, target) -> bool:
        return target in self._keys


class AdapterReader:
    """A LoRA adapter folder. Its factors and full tensors are read once and stay in RAM (they are
    small), or, `lazy`, are read from the file each time one target is asked for (a plan's execution
    reads each target once: 16 adapters of a 7B pool hold 1.3 GB less)."""

    def __init__(self, adapter_dir: str, lazy: bool = False):
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
            raise FwllmError(
                f"{adapter_dir}: LoRA adapters with trained biases (lora_bias) are not supported"
            )
        self.adapter_dir = adapter_dir
        self.base_model = cfg.get("base_model_name_or_path")
        self.config = cfg
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
        if not os.path.isfile(self.weights_path):
            raise FwllmError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (fwllm reads safetensors only)")
        parts: Dict[str, Dict[str, str]] = {}  # target -> part -> key in the file
        full: Dict[str, Dict[str, str]] = {}  # modules_to_save / saved base layers
        embedded = set()
        self.bytes_read = 0
        with safe_open(self.weights_path, framework="pt") as fp:
            for key in fp.keys():
                target, part = _split_key(key)
                if part == "UNKNOWN":
                    raise FwllmError(f"{adapter_dir}: unsupported adapter tensor {key}")
                if part == "FULL":
                    full[target] = {"FULL": key}
                else:
                    # embedding factors multiply the other way round: Delta W = (B A)^T
                    parts.setdefault(target, {})[part.lstrip("E")] = key
                    if part.startswith("E"):
                        embedded.add(target)
            for name, ab in parts.items():
                if not {"A", "B"} <= set(ab):
                    raise FwllmError(f"{adapter_dir}: {name} has only {sorted(ab)} of lora_A/lora_B")

            def factors(name: str, t: Dict[str, torch.Tensor]) -> LoraFactors:
                return LoraFactors(
                    t["A"],
                    t["B"],
                    self.scale,
                    transposed=self.fan_in_fan_out or name in embedded,
                    magnitude=t.get("M"),
                )

            def whole(name: str, t: Dict[str, torch.Tensor]) -> torch.Tensor:
                return t["FULL"]

            if lazy:
                self.factors: Mapping[str, LoraFactors] = _Stored(self, parts, factors)
                self.full: Mapping[str, torch.Tensor] = _Stored(self, full, whole)
            else:
                self.full = {
                    n: whole(n, {p: self._read(fp, k) for p, k in keys.items()}) for n, keys in full.items()
                }
                self.factors = {
                    n: factors(n, {p: self._read(fp, k) for p, k in keys.items()})
                    for n, keys in parts.items()
                }

    def _read(self, fp, key: str) -> torch.Tensor:
        t = fp.get_tensor(key).clone()
        self.bytes_read += t.numel() * t.element_size()
        return t

    def targets(self) -> List[str]:
        """The base tensors this adapter changes."""
        return sorted(set(self.factors) | set(self.full))

    def check_targets(self, base: Union[Iterable[str], Mapping[str, tuple]], label: str) -> None:
        """Every target exists in the base and, given the base's shapes, fits it: a clear error
        before any solve (a LoRA pool's iterate never forms the delta that would reveal it)."""
        known = base if isinstance(base, Mapping) else {n: None for n in base}
        missing = [n for n in self.targets() if n not in known]
        if missing:
            raise FwllmError(
                f"{label}: the adapter targets {missing[0]}, which the base model does not have "
                f"({len(missing)} such tensor(s); was it trained on another base?)"
            )
        for name in self.targets():
            shape = known[name]
            if shape is None:
                continue
            f, full = self.factors.get(name), self.full.get(name)
            got = (
                tuple(full.shape)
                if full is not None
                else ((f.a.shape[1], f.b.shape[0]) if f.transposed else (f.b.shape[0], f.a.shape[1]))
            )
            if got != tuple(shape):
                raise FwllmError(
                    f"{label}: the adapter's {name} is {got}, the base's is {tuple(shape)} "
                    f"(an adapter for another base model?)"
                )

    def delta(self, name: str, base: torch.Tensor) -> Optional[torch.Tensor]:
        """tau for one tensor, or None where the adapter leaves the base unchanged."""
        full, f = self.full.get(name), self.factors.get(name)
        if full is None and f is None:
            return None
        out = None
        if full is not None:
            if tuple(full.shape) != tuple(base.shape):
                raise FwllmError(
                    f"{self.adapter_dir}: {name} has shape {tuple(full.shape)}, the base {tuple(base.shape)}"
                )
            out = full.float() - base.float()
        if f is not None:
            start = base.float() if out is None else base.float() + out
            d = f.delta(start)
            if tuple(d.shape) != tuple(base.shape):
                raise FwllmError(
                    f"{self.adapter_dir}: the LoRA delta for {name} has shape {tuple(d.shape)}, "
                    f"the base {tuple(base.shape)}"
                )
            out = d if out is None else out + d
        return out
