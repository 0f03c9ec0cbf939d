"""The FW iterate of a full-checkpoint pool, on disk: one float32 memory-mapped file per
block in accelerate's offload format (`offload_weight` / `OffloadedWeightsLoader`).

A step rewrites a block in place; reading a block copies it out of the mapping, so the
only memory it holds is the block being worked on. Free space is checked before anything
is written: the store needs 4 bytes per entry of every block.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Iterable, Tuple

import numpy as np
import torch
from accelerate.utils import OffloadedWeightsLoader, offload_weight, save_offload_index

from fwllm.core.errors import FwllmError
from fwllm.core.footprint import gib

GIB = 1 << 30


def check_free_space(folder: str, needed: int, what: str) -> None:
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise FwllmError(
            f"{what} needs {gib(needed)} of free disk at {folder}; only {gib(free)} "
            f"are free (free some space, or put the plan or $FWLLM_CACHE on a larger disk)"
        )


class IterateStore:
    """theta_t per block, memory-mapped float32 files under `folder`."""

    def __init__(self, folder: str, shapes: Dict[str, Tuple[int, ...]]):
        needed = sum(4 * int(np.prod(s)) for s in shapes.values())
        check_free_space(folder, needed, "the iterate store")
        self.folder, self.shapes = folder, dict(shapes)
        self.index: Dict[str, dict] = {}
        self.bytes_written = 0

    def write(self, name: str, value: torch.Tensor) -> None:
        """Set block `name` (the first write creates its file, later ones overwrite it in place)."""
        value = value.detach().to("cpu", torch.float32).contiguous()
        if tuple(value.shape) != self.shapes[name]:
            raise FwllmError(
                f"iterate store: {name} has shape {tuple(value.shape)}, expected {self.shapes[name]}"
            )
        try:
            if name in self.index:
                mapped = np.memmap(self._file(name), dtype=np.float32, mode="r+", shape=value.shape or (1,))
                mapped[:] = value.numpy().reshape(mapped.shape)
                mapped.flush()
                del mapped
            else:
                offload_weight(value, name, self.folder, self.index)
                save_offload_index({name: self.index[name]}, self.folder)
        except OSError as err:
            raise FwllmError(
                f"cannot write the iterate store at {self.folder}: {err.strerror or err}"
            ) from None
        self.bytes_written += value.numel() * 4

    def read(self, name: str) -> torch.Tensor:
        return self.loader()[name].clone()  # a private copy, not a view of the mapping

    def loader(self) -> OffloadedWeightsLoader:
        return OffloadedWeightsLoader(save_folder=self.folder, index=self.index)

    def names(self) -> Iterable[str]:
        return list(self.index)

    def _file(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.dat")
