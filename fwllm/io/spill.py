"""Tensors kept in file-backed memory instead of anonymous RAM.

The layer-major Fisher keeps every candidate's layer inputs (its checkpoints) from the forward to the
backward: at 7B x 16 candidates, over a GiB. In anonymous memory only swap could free them; mapped from
a file they are page cache the kernel writes back and drops under pressure, and reads in again when the
backward comes to them (once each). Each tensor gets its own file, unlinked as soon as it is mapped: the
disk is given back when the tensor is freed, and nothing is left behind if the process dies.
"""

from __future__ import annotations

import os

import torch


class FileSpill:
    """`spill(x)`: a copy of the CPU tensor `x` backed by a file in `folder` (x itself elsewhere)."""

    def __init__(self, folder: str):
        self.folder, self.count = folder, 0  # the folder is made at the first spill

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.numel() == 0:
            return x
        if self.count == 0:
            os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"spill_{os.getpid()}_{self.count}.bin")
        self.count += 1
        out = torch.from_file(path, shared=True, size=x.numel(), dtype=x.dtype)
        os.unlink(path)  # the mapping keeps the pages; the name is not needed
        return out.view(x.shape).copy_(x)
