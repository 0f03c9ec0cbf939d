"""The plan cache bound (fwllm.io.plan_cache): least recently used plans go first, never one in use."""

import os

import pytest

from fwllm.core.errors import FwllmError
from fwllm.io.plan_cache import bound_plan_cache, cache_limit_bytes
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
