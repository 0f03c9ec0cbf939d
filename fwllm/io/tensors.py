"""Tensor-at-a-time reads from safetensors shards.

`TensorReader` opens a shard per read and closes it again, so mapped pages do not pile up
in RSS (safetensors' `get_tensor` returns views of the mapped file). How many tensors read
are alive at once is measured from outside (tests/conftest.py's `resident` wraps `get`).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from safetensors import safe_open

from fwllm.core.errors import FwllmError
from fwllm.io.models import safetensors_files


class TensorReader:
    """Tensor-at-a-time access to a folder of safetensors shards."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.index: Dict[str, str] = {}
        for shard in safetensors_files(model_dir):
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
        return tensor

    def shape(self, name: str) -> tuple:
        with safe_open(self.index[name], framework="pt") as fp:
            return tuple(fp.get_slice(name).get_shape())
