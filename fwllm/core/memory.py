"""Handing freed heap memory back to the operating system.

A layer-by-layer solve frees a layer's tensors and allocates the next one's, thousands of
times. glibc serves tensors of up to 32 MB from its heap (its mmap threshold adapts up to
that) and returns heap memory to the system only from the top, so the freed layers stay
in the resident set, scattered between live blocks: at 1.1B the solve's anonymous peak
rose from 1.2 to 2.0 GiB by the second iteration. `malloc_trim(0)` releases every free
page of the heap. Pages handed back cost a page fault when the heap reuses them; fwllm trims
after every released layer and after every whole evaluation, which eval/bench_heap_trim.py
measured against trimming off and once per evaluation only (it patches this module from
outside: eval/fwbench/heap_trim.py). Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional

import psutil


def _find(name: str) -> Optional[Callable[..., int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name, None)
    except OSError:
        return None


_TRIM, _MALLOPT = _find("malloc_trim"), _find("mallopt")
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
# Allocations from this size up get their own mapping, unmapped when freed. Below it the heap
# serves them, reused without a page fault. At 16 MiB a RegMean layer's activations (a micro-batch
# of 1024 tokens x 5632 MLP features: 23 MB) and Grams leave the heap, its small temporaries do not.
MAPPED_FROM = 16 << 20


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing): after a released
    layer or block, and after a whole forward or forward+backward."""
    if _TRIM is not None:
        _TRIM(0)


def map_large_allocations(threshold: int = MAPPED_FROM) -> None:
    """Serve allocations of `threshold` bytes and up from their own mappings from now on (glibc;
    elsewhere nothing). glibc's default threshold adapts up to 32 MB, so a streamed RegMean layer's
    tensors (one candidate's activations after another's, Grams, float64 conversions) stay in the
    heap when freed, scattered between live blocks, until the layer is released and trimmed: at 1.1B
    with 2048 tokens per candidate, anonymous memory rose by 0.5 GiB over a layer's 16 candidates
    while the live tensors stayed the same. Mapped, they are handed back as they are freed; the page
    faults of their next allocation cost about 3% of the layer's time at 16 MiB (11% at 4 MiB, which
    saved only 0.2 GiB more)."""
    if _MALLOPT is not None:
        _MALLOPT(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold))


def available_memory() -> int:
    """Bytes the system can hand out now without swapping (psutil's `available`): what the
    preflight memory check and `gradient: auto` compare their estimates with."""
    return int(psutil.virtual_memory().available)
