"""Bounds on the caches that grow with every new content: the plain-mergekit plans
(`$FWLLM_CACHE/plans`) and the per-candidate statistics of the in-RAM paths (`$FWLLM_CACHE/stats`).

Every new recipe content solves into a new plan folder, and every new candidate or calibration
adds a statistic, so each cache would grow without limit. Each keeps at most
`$FWLLM_CACHE_MAX_GIB`. After a plan is used, `bound_plan_cache` marks it as just used (its folder's mtime
is the clock) and removes the least recently used other plans until the cache fits in
`$FWLLM_CACHE_MAX_GIB` (default `DEFAULT_MAX_GIB`; 0 turns the bound off). A plan another
run holds the lock of (solving or reading it) is never removed, nor is the one just used,
nor hidden staging folders (a solve in progress).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from typing import List, Optional

from fwllm.core.errors import FwllmError

try:
    import fcntl
except ImportError:  # not POSIX: nothing is evicted (a lock could not be honoured)
    fcntl = None

LOG = logging.getLogger(__name__)
DEFAULT_MAX_GIB = 20.0


def cache_limit_bytes() -> int:
    value = os.environ.get("FWLLM_CACHE_MAX_GIB")
    try:
        gib = float(value) if value else DEFAULT_MAX_GIB
    except ValueError:
        gib = -1.0
    if gib < 0:
        raise FwllmError(f"FWLLM_CACHE_MAX_GIB must be a size in GiB, 0 for no bound (got {value!r})")
    return int(gib * (1 << 30))


def folder_bytes(folder: str) -> int:
    """Bytes of the files under `folder`, each inode once (statistics are hard-linked)."""
    seen, total = set(), 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(parent, name))
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
    return total


@contextlib.contextmanager
def _unless_in_use(folder: str):
    """Yield True while holding `folder`'s lock (the one `staged_output.folder_lock` takes), False if
    another run holds it."""
    parent, name = os.path.split(os.path.abspath(folder))
    path = os.path.join(parent, f".{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # as folder_lock does: the holder unlinks before releasing
        os.close(fd)


def bound_plan_cache(used: str, root: Optional[str] = None, max_bytes: Optional[int] = None) -> List[str]:
    """Mark plan folder `used` as just used, then evict the least recently used plans of `root`
    (default: `used`'s parent) until it fits in `max_bytes`; returns the folders removed."""
    root = root or os.path.dirname(os.path.abspath(used))
    limit = cache_limit_bytes() if max_bytes is None else max_bytes
    with contextlib.suppress(OSError):
        now = time.time()
        os.utime(used, (now, now))
    if not limit or fcntl is None or not os.path.isdir(root):
        return []
    plans = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path) or os.path.islink(path):
            continue
        plans.append((os.stat(path).st_mtime, path, folder_bytes(path)))
    total = sum(size for _, _, size in plans)
    removed = []
    for _, path, size in sorted(plans):  # oldest use first
        if total <= limit:
            break
        if os.path.samefile(path, used):
            continue
        with _unless_in_use(path) as free:
            if not free:
                continue
            shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            total -= size
            removed.append(path)
            LOG.info(
                "fwllm: evicted the plan %s (%.1f MiB) to keep the cache under %.1f GiB",
                path,
                size / (1 << 20),
                limit / (1 << 30),
            )
    return removed


def bound_stats_cache(folder: str, keep: str, max_bytes: Optional[int] = None) -> List[str]:
    """Evict the least recently used statistics (`<key>.safetensors` + `<key>.json`) of one kind's
    `folder` until it fits in `max_bytes`, never the entry `keep` (the key just written or read).
    A plan holds its statistics as hard links, so an evicted entry is only recomputed by a later
    solve that needs it; the plans that use it keep it."""
    limit = cache_limit_bytes() if max_bytes is None else max_bytes
    if not limit or not os.path.isdir(folder):
        return []
    entries = []
    for name in os.listdir(folder):
        if not name.endswith(".safetensors") or name[: -len(".safetensors")] == keep:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(folder, name))
            entries.append((st.st_mtime, name[: -len(".safetensors")], st.st_size))
    total = sum(size for _, _, size in entries) + _entry_bytes(folder, keep)
    removed = []
    for _, key, size in sorted(entries):  # oldest use first
        if total <= limit:
            break
        for suffix in (".json", ".safetensors"):  # the meta first: an entry without it is not cached
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, key + suffix))
        total -= size
        removed.append(key)
    if removed:
        LOG.info(
            "fwllm: evicted %d statistics from %s to keep it under %.1f GiB",
            len(removed),
            folder,
            limit / (1 << 30),
        )
    return removed


def _entry_bytes(folder: str, key: str) -> int:
    try:
        return os.stat(os.path.join(folder, key + ".safetensors")).st_size
    except OSError:
        return 0
