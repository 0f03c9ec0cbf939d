"""The cache bounds (fwllm.io.cache_bound): least recently used plans and statistics go first, never one
in use, and a statistic is written only where it fits."""

import os
import time

import pytest

from fwllm.core.errors import FwllmError
from fwllm.io.cache_bound import bound_plan_cache, cache_limit_bytes
from fwllm.io.staged_output import folder_lock

MiB = 1 << 20


def plan(root, name, mib, used_at):
    folder = root / name
    (folder / "merged").mkdir(parents=True)
    (folder / "merged" / "00000.safetensors").write_bytes(b"\0" * (mib * MiB))
    (folder / "plan.json").write_text("{}")
    os.utime(folder, (used_at, used_at))
    return folder


def test_least_recently_used_plans_are_evicted_until_the_cache_fits(tmp_path):
    old, mid, new = plan(tmp_path, "a", 2, 1000), plan(tmp_path, "b", 2, 2000), plan(tmp_path, "c", 2, 3000)
    (tmp_path / ".c.partial-x").mkdir()  # a solve in progress: never touched
    # 6 MiB held, 4.5 allowed: the oldest (2 MiB) goes, and that is enough
    removed = bound_plan_cache(str(new), max_bytes=int(4.5 * MiB))
    assert removed == [str(old)]
    assert mid.exists() and new.exists() and (tmp_path / ".c.partial-x").exists()


def test_the_plan_just_used_becomes_the_newest(tmp_path):
    old, mid = plan(tmp_path, "a", 2, 1000), plan(tmp_path, "b", 2, 2000)
    removed = bound_plan_cache(str(old), max_bytes=3 * MiB)  # `a` used now: `b` is the least recent
    assert removed == [str(mid)] and old.exists()


def test_a_plan_another_run_holds_is_never_evicted(tmp_path):
    old, new = plan(tmp_path, "a", 2, 1000), plan(tmp_path, "b", 2, 2000)
    with folder_lock(str(old), "plan folder", timeout=1):
        assert bound_plan_cache(str(new), max_bytes=1 * MiB) == []
    assert old.exists()
    assert bound_plan_cache(str(new), max_bytes=1 * MiB) == [str(old)]  # free once released


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE_MAX_GIB", "0.5")
    assert cache_limit_bytes() == 512 * MiB
    monkeypatch.setenv("FWLLM_CACHE_MAX_GIB", "lots")
    with pytest.raises(FwllmError, match="FWLLM_CACHE_MAX_GIB"):
        cache_limit_bytes()


def test_the_statistics_cache_keeps_under_its_cap_least_recently_used_first(tmp_path):
    """Three 4 KiB Gram entries under a 9 KiB cap: writing the third evicts the one read longest ago
    (not the oldest written: reading an entry renews it), and never the entry just written."""
    import torch

    from fwllm.io.stats_store import StatsCache

    cache = StatsCache("gram", root=str(tmp_path))
    entry = {"w": torch.zeros(32, 32)}  # 4096 bytes
    cache.put("a", entry, {"n": 1})
    cache.put("b", entry, {"n": 2})
    old = time.time() - 100
    os.utime(os.path.join(cache.folder, "a.safetensors"), (old, old))
    os.utime(os.path.join(cache.folder, "b.safetensors"), (old + 1, old + 1))
    assert cache.get("a") == {"n": 1}  # read: "a" is now the most recently used
    os.environ["FWLLM_CACHE_MAX_GIB"] = str(9 * 1024 / (1 << 30))
    try:
        cache.put("c", entry, {"n": 3})
    finally:
        del os.environ["FWLLM_CACHE_MAX_GIB"]
    assert cache.get("b") is None and cache.get("a") == {"n": 1} and cache.get("c") == {"n": 3}
    assert sorted(os.listdir(cache.folder)) == ["a.json", "a.safetensors", "c.json", "c.safetensors"]


def test_a_statistic_that_does_not_fit_on_disk_is_one_error_and_no_file(tmp_path, monkeypatch):
    import shutil as _shutil

    import torch

    from fwllm.core.errors import FwllmError
    from fwllm.io.stats_store import StatsCache

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage._replace(free=1000))
    cache = StatsCache("gram", root=str(tmp_path))
    with pytest.raises(FwllmError, match="the gram statistics cache needs 4 MiB of free disk .* only 0 MiB"):
        cache.put("a", {"w": torch.zeros(1024, 1024)}, {"n": 1})
    assert cache.get("a") is None
