"""Where the LMO sketches of a full-checkpoint pool live: in RAM, or on disk under a budget.

In RAM, one block's rows (N candidates x m buckets) are a tensor. On disk, each block is a
raw float32 file that is read into a fresh tensor whenever the oracle needs it and freed
after, so the sketches hold no memory between uses. A memory map would not do: every page
it touches stays in the process's resident set until the map is closed, and the LMO
touches every page at every iteration.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from fwllm.io.iterate_store import check_free_space


class SketchStore:
    """`store[name] = rows` keeps a block's sketch rows; `store[name]` gives them back as a
    float32 tensor (a fresh read when `folder` is set). `needed` bytes are checked free first."""

    def __init__(self, folder: Optional[str] = None, needed: int = 0):
        if folder is not None:
            check_free_space(folder, needed, "the LMO sketches")
        self.folder = folder
        self._rows: Dict[str, Union[torch.Tensor, Tuple[str, Tuple[int, ...]]]] = {}
        self.bytes_read = 0

    def __setitem__(self, name: str, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float32).contiguous()
        if self.folder is None or not rows.numel():
            self._rows[name] = rows
            return
        path = os.path.join(self.folder, f"{len(self._rows):06d}.f32")
        rows.numpy().tofile(path)
        self._rows[name] = (path, tuple(rows.shape))

    def __getitem__(self, name: str) -> torch.Tensor:
        kept = self._rows[name]
        if isinstance(kept, torch.Tensor):
            return kept
        path, shape = kept
        values = np.fromfile(path, dtype=np.float32, count=int(np.prod(shape)))
        if values.size != int(np.prod(shape)):
            raise OSError(f"{path}: sketch file is truncated ({values.size} of {int(np.prod(shape))} values)")
        self.bytes_read += values.nbytes
        return torch.from_numpy(values).view(shape)

    def width(self, name: str) -> int:
        """m, the buckets per candidate of a block (0: every candidate is scored exactly)."""
        kept = self._rows[name]
        shape = kept.shape if isinstance(kept, torch.Tensor) else kept[1]
        return int(shape[1]) if len(shape) > 1 else 0

    def __contains__(self, name: str) -> bool:
        return name in self._rows
