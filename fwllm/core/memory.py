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


def _find_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


_TRIM = _find_trim()


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing): after a released
    layer or block, and after a whole forward or forward+backward."""
    if _TRIM is not None:
        _TRIM(0)


def available_memory() -> int:
    """Bytes the system can hand out now without swapping (psutil's `available`): what the
    preflight memory check and `gradient: auto` compare their estimates with."""
    return int(psutil.virtual_memory().available)
