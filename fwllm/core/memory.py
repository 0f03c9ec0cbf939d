"""Handing freed heap memory back to the operating system.

A layer-by-layer solve frees a layer's tensors and allocates the next one's, thousands of
times. glibc serves tensors of up to 32 MB from its heap (its mmap threshold adapts up to
that) and returns heap memory to the system only from the top, so the freed layers stay
in the resident set, scattered between live blocks: at 1.1B the solve's anonymous peak
rose from 1.2 to 2.0 GiB by the second iteration. `malloc_trim(0)` releases every free
page of the heap. Pages handed back cost a page fault when the heap reuses them, so the
trim waits until `MIN_FREE` bytes of the heap are free. Elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional

MIN_FREE = 128 << 20  # free heap bytes worth handing back


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc_functions():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None, None
    trim = getattr(libc, "malloc_trim", None)
    info = getattr(libc, "mallinfo2", None)  # glibc >= 2.33
    if info is not None:
        info.restype = _MallInfo2
    return trim, info


_TRIM, _INFO = _libc_functions()


def free_heap_bytes() -> Optional[int]:
    """Bytes that are free inside glibc's heap (None where that cannot be asked)."""
    return int(_INFO().fordblks) if _INFO is not None else None


def return_free_memory() -> None:
    """Give the heap's free pages back to the system once enough of it is free (glibc only)."""
    if _TRIM is None:
        return
    free = free_heap_bytes()
    if free is None or free >= MIN_FREE:
        _TRIM(0)
