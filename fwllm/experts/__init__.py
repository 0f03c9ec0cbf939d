"""Expert pools built offline by real training: `build_pool(profile, family)`.

profile `tiny` (families llama, roberta, roberta-mlm): seconds on 2 cores, synthetic tasks.
profile `smol` (family llama): SmolLM2-135M-Instruct base, LoRA experts on the shared real data.
"""

from __future__ import annotations

import time
from typing import Optional

from fwllm.errors import FwllmError
from fwllm.experts.pool import Expert, ExpertPool, TaskData, build_cached, pool_folder

__all__ = ["build_pool", "ExpertPool", "Expert", "TaskData"]

FAMILIES = {"tiny": ("llama", "roberta", "roberta-mlm"), "smol": ("llama",)}


def build_pool(profile: str, family: str = "llama", root: Optional[str] = None, seed: int = 0,
               device: str = "cpu", progress: bool = True, force: bool = False) -> ExpertPool:
    """The pool for (profile, family, seed): reused when already built, else trained now."""
    if profile not in FAMILIES:
        raise FwllmError(f"unknown expert profile {profile!r}; choose from {sorted(FAMILIES)}")
    if family not in FAMILIES[profile]:
        raise FwllmError(f"profile {profile!r} has families {FAMILIES[profile]}, not {family!r}")
    if profile == "tiny":
        from fwllm.experts.tiny import BUILDERS
        builder = BUILDERS[family]
    else:
        from fwllm.experts.smol import build_smol as builder

    def build(staging: str) -> ExpertPool:
        import torch

        start = time.time()
        threads = torch.get_num_threads()
        if profile == "tiny":
            torch.set_num_threads(1)  # bitwise-reproducible, and tiny models gain nothing from threads
        try:
            pool = builder(staging, seed, device, progress)
        finally:
            torch.set_num_threads(threads)
        pool.build_seconds = time.time() - start
        return pool

    return build_cached(pool_folder(profile, family, root), seed, force, build)
