"""Finding, loading and streaming models: local folders, Hub ids, peft adapters.

`TensorReader` reads one tensor at a time from safetensors shards and closes the file
after each read, so mapped pages do not pile up in RSS; it counts bytes read and the
tensors it currently hands out, which the streaming tests and benchmarks check.
`Candidate` yields task vectors tau = theta_i - theta_0, for full checkpoints and for
LoRA adapters (Delta W = B A * alpha / r in weight space).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from safetensors import safe_open

from fwllm.errors import FwllmError

ADAPTER_CONFIG = "adapter_config.json"


def resolve_model_path(path: str, revision: Optional[str] = None) -> str:
    """A local folder for `path`: itself, or its Hugging Face snapshot (cache first when offline)."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # Hub ids: "name" or "org/name"
        raise FwllmError(f"model folder not found: {path}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return snapshot_download(path, revision=revision, local_files_only=offline,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
    except (HfHubHTTPError, OSError, ValueError) as err:
        how = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" if offline else str(err).splitlines()[0]
        raise FwllmError(f"cannot get model {path!r} from the Hugging Face Hub: {how}") from None


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _shards(model_dir: str) -> List[str]:
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FwllmError(f"{model_dir} holds no .safetensors weights (fwllm reads safetensors only)")
    return [os.path.join(model_dir, f) for f in files]


class Residency:
    """How many candidate tensors read from disk are alive now, and at most (for tests/benchmarks)."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self) -> None:
        with self._lock:
            self.now -= 1

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.now


RESIDENT = Residency()


class TensorReader:
    """Tensor-at-a-time access to a folder of safetensors shards."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.index: Dict[str, str] = {}
        for shard in _shards(model_dir):
            with safe_open(shard, framework="pt") as fp:
                for name in fp.keys():
                    self.index[name] = shard
        self.bytes_read = 0

    def names(self) -> List[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
        """A private copy of one tensor (the shard is closed again before returning)."""
        if name not in self.index:
            raise FwllmError(f"{self.model_dir} has no tensor {name}")
        with safe_open(self.index[name], framework="pt") as fp:
            view = fp.get_tensor(name)
            self.bytes_read += view.numel() * view.element_size()
            tensor = view.to(dtype=dtype or view.dtype, copy=True)
        del view
        return RESIDENT.track(tensor)

    def shape(self, name: str) -> tuple:
        with safe_open(self.index[name], framework="pt") as fp:
            return tuple(fp.get_slice(name).get_shape())


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FwllmError(f"{model_dir} has no config.json; not a transformers model folder")
    with open(path, encoding="utf-8") as fp:
        return json.load(fp)


@dataclass
class LoraFactors:
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        return RESIDENT.track((self.b.float() @ self.a.float()) * self.scale)


def _adapter_target(key: str) -> Optional[tuple]:
    """peft key -> (target weight name, 'A'|'B'), e.g. ...q_proj.lora_A.weight -> model...q_proj.weight."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            module = key.split(marker)[0]
            for prefix in ("base_model.model.",):
                if module.startswith(prefix):
                    module = module[len(prefix):]
            return f"{module}.weight", part[-1]
    return None


class AdapterReader:
    """LoRA adapter as weight-space deltas; honours its own alpha, r and rsLoRA flag."""

    def __init__(self, adapter_dir: str):
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as fp:
            cfg = json.load(fp)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise FwllmError(f"{adapter_dir}: only LoRA adapters are supported (got {cfg.get('peft_type')})")
        self.adapter_dir = adapter_dir
        self.base_model = cfg.get("base_model_name_or_path")
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
        self.default_scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        self.rank_pattern = cfg.get("rank_pattern") or {}
        self.alpha_pattern = cfg.get("alpha_pattern") or {}
        if self.rank_pattern or self.alpha_pattern:
            raise FwllmError(f"{adapter_dir}: per-module rank/alpha patterns are not supported yet")
        files = [f for f in ("adapter_model.safetensors",) if os.path.isfile(os.path.join(adapter_dir, f))]
        if not files:
            raise FwllmError(f"{adapter_dir} has no adapter_model.safetensors")
        self.factors: Dict[str, LoraFactors] = {}
        parts: Dict[str, Dict[str, torch.Tensor]] = {}
        self.bytes_read = 0
        with safe_open(os.path.join(adapter_dir, files[0]), framework="pt") as fp:
            for key in fp.keys():
                target = _adapter_target(key)
                if target is None:
                    continue  # e.g. modules_to_save heads: handled as full tensors elsewhere
                t = fp.get_tensor(key).float().clone()
                self.bytes_read += t.numel() * 4
                parts.setdefault(target[0], {})[target[1]] = t
        for name, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise FwllmError(f"{adapter_dir}: {name} has only lora_{''.join(ab)}")
            self.factors[name] = LoraFactors(ab["A"], ab["B"], self.default_scale)

    def delta(self, name: str) -> Optional[torch.Tensor]:
        f = self.factors.get(name)
        return None if f is None else f.delta()


@dataclass
class Candidate:
    """One merge candidate: a full checkpoint folder, or a LoRA adapter on the base."""

    label: str
    model_dir: Optional[str] = None
    adapter: Optional[AdapterReader] = None
    reader: Optional[TensorReader] = field(default=None, repr=False)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """tau for one tensor (zeros where the candidate leaves the base unchanged)."""
        if self.adapter is not None:
            d = self.adapter.delta(name)
            if d is None and self.reader is None:
                return torch.zeros_like(base)
            if d is not None:
                if d.shape != base.shape:
                    raise FwllmError(f"{self.label}: LoRA delta for {name} has shape {tuple(d.shape)}, base {tuple(base.shape)}")
                return d
        theta = self.reader.get(name)
        if theta.shape != base.shape:
            raise FwllmError(f"{self.label}: {name} has shape {tuple(theta.shape)} but the base has {tuple(base.shape)}")
        theta -= base
        return theta

    @property
    def bytes_read(self) -> int:
        return (self.reader.bytes_read if self.reader else 0) + (self.adapter.bytes_read if self.adapter else 0)


def open_candidate(model: str, lora: Optional[str] = None) -> Candidate:
    """`model` may be a full checkpoint, a peft adapter folder, or a base with `lora` on top."""
    label = f"{model}+{lora}" if lora else model
    if lora:
        return Candidate(label, adapter=AdapterReader(resolve_model_path(lora)))
    path = resolve_model_path(model)
    if is_adapter_dir(path):
        return Candidate(label, adapter=AdapterReader(path))
    return Candidate(label, model_dir=path, reader=TensorReader(path))


def check_same_architecture(base_dir: str, others: Iterable[str]) -> None:
    base_cfg = read_config(base_dir)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    for other in others:
        cfg = read_config(other)
        diff = [k for k in keys if k in base_cfg and cfg.get(k) != base_cfg.get(k)]
        if diff:
            k = diff[0]
            raise FwllmError(
                f"{other} does not match the base {base_dir}: {k} is {cfg.get(k)!r} vs {base_cfg.get(k)!r}"
            )


def load_model(model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu", architecture: Optional[str] = None):
    """Instantiate the transformers class named in config.json, or `architecture` (e.g. an
    encoder pool's classifier class over a masked-LM base body). No remote code, ever."""
    import transformers

    cfg = read_config(model_dir)
    archs = [architecture] if architecture else (cfg.get("architectures") or [])
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise FwllmError(f"{model_dir}: unknown architecture {archs}; fwllm loads transformers classes only")
    model = cls.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
    return model.to(device)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
