"""Merge candidates as task vectors, read one tensor at a time.

`Candidate` yields tau = theta_i - theta_0 for full checkpoints and for LoRA adapters
(`fwllm.io.adapters`). `LazyCandidates` hands a per-tensor merge the candidates' own
tensors, read from disk on each access and not kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch

from fwllm.core.errors import FwllmError
from fwllm.io.adapters import AdapterReader
from fwllm.io.models import is_adapter_dir, resolve_model_path
from fwllm.io.tensors import TensorReader


def _check_finite(label: str, name: str, tensor: torch.Tensor) -> None:
    """A corrupt candidate is an error, never a silent merge: a NaN would poison (or, dropped
    by a trim or a mask, quietly vanish from) the merged tensor."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise FwllmError(f"candidate {label}: {name} holds {bad} NaN/inf value(s); the checkpoint is corrupt")


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
            d = self.adapter.delta(name, base)
            if d is None:
                return torch.zeros_like(base, dtype=torch.float32)
            _check_finite(self.label, name, d)
            return d
        theta = self._weight(name)
        if theta.shape != base.shape:
            raise FwllmError(
                f"{self.label}: {name} has shape {tuple(theta.shape)} but the base has {tuple(base.shape)}"
            )
        theta -= base
        return theta

    def tensor(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """theta_i for one tensor, as mergekit would hand it (base + tau for an adapter)."""
        if self.adapter is None:
            return self._weight(name)
        return base.float() + self.task_vector(name, base.float())

    def _weight(self, name: str) -> torch.Tensor:
        theta = self.reader.get(name)
        _check_finite(self.label, name, theta)
        return theta

    @property
    def bytes_read(self) -> int:
        return (self.reader.bytes_read if self.reader else 0) + (
            self.adapter.bytes_read if self.adapter else 0
        )


def open_candidate(model: str, lora: Optional[str] = None) -> Candidate:
    """`model` may be a full checkpoint, a peft adapter folder, or a base with `lora` on top."""
    label = f"{model}+{lora}" if lora else model
    if lora:
        return Candidate(label, adapter=AdapterReader(resolve_model_path(lora)))
    path = resolve_model_path(model)
    if is_adapter_dir(path):
        return Candidate(label, adapter=AdapterReader(path))
    return Candidate(label, model_dir=path, reader=TensorReader(path))


class LazyCandidates(Mapping):
    """label -> this tensor of that candidate, read from disk on each access and not kept.

    A per-tensor merge that walks the candidates one after another (as a generator) then
    holds one of them at a time."""

    def __init__(self, candidates: Dict[str, Candidate], name: str, base: torch.Tensor):
        self._cands, self._name, self._base = candidates, name, base

    def __getitem__(self, label: str) -> torch.Tensor:
        return self._cands[label].tensor(self._name, self._base)

    def __contains__(self, label) -> bool:  # without reading the tensor (Mapping's default would)
        return label in self._cands

    def __iter__(self) -> Iterator[str]:
        return iter(self._cands)

    def __len__(self) -> int:
        return len(self._cands)
