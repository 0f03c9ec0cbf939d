"""Expert pools built offline by real training: `build_pool(profile, family)`.

profile `tiny` (families llama, roberta, roberta-mlm): seconds on 2 cores, synthetic tasks.
profile `smol` (family llama): SmolLM2-135M base, LoRA experts on the shared real data.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional

from fwllm.core.errors import FwllmError
from fwllm.experts.pool import Expert, ExpertPool, TaskData, build_cached, pool_folder
from fwllm.experts.smol import build_smol
from fwllm.experts.tiny import BUILDERS as TINY_BUILDERS
from fwllm.experts.train import dev_loss

__all__ = ["build_pool", "ExpertPool", "Expert", "TaskData", "FAMILIES", "dev_loss"]

FAMILIES = {"tiny": ("llama", "roberta", "roberta-mlm"), "smol": ("llama",)}


@contextlib.contextmanager
def _reproducible(single_thread: bool):
    """Deterministic kernels (and, for tiny models, one thread: CPU reductions then run in a
    fixed order, which is what makes same-seed builds bitwise identical)."""
    import torch

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if single_thread:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def build_pool(
    profile: str,
    family: str = "llama",
    root: Optional[str] = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
) -> ExpertPool:
    """The pool for (profile, family, seed): reused when already built, else trained now.

    `force` rebuilds even when a finished pool exists (the CLI's --force).
    """
    if profile not in FAMILIES:
        raise FwllmError(f"unknown expert profile {profile!r}; choose from {sorted(FAMILIES)}")
    if family not in FAMILIES[profile]:
        raise FwllmError(f"profile {profile!r} has families {list(FAMILIES[profile])}, not {family!r}")
    builder = TINY_BUILDERS[family] if profile == "tiny" else build_smol

    folder = pool_folder(profile, family, root)

    def build(staging: str) -> ExpertPool:
        start = time.time()
        with _reproducible(single_thread=profile == "tiny"):
            # smol adapters must name the base's final path; tiny pools hold no absolute paths
            pool = (
                builder(staging, seed, device, progress)
                if profile == "tiny"
                else builder(staging, seed, device, progress, final_root=folder)
            )
        pool.build_seconds = round(time.time() - start, 1)
        return pool

    return build_cached(folder, seed, force, build)
