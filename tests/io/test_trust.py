"""Nothing is read from outside what the user named (fwllm.core.trust and where it is applied).

The truth is the construction: a plan folder planted by another account (another owner, or
writable by others) and a plan that names files outside its folder are each refused with
one FwllmError that names the folder; the same folder, owned by the user and private, is read.
"""

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import task_rows, write_jsonl, write_recipe
from fwllm.core.errors import FwllmError
from fwllm.core.plan import CandidateStats, StatsPlanRecord, mark_plan_complete, read_record, write_record
from fwllm.core import trust
from fwllm.io.merged_store import merged_index, write_merged
from fwllm.io.stats_store import StatsCache
from fwllm.mergekit_glue.inputs import read_inputs, write_inputs

OTHER_UID = 54321


def as_other_user(path, monkeypatch):
    """Make `path` (walked) belong to another account: chown when root, else pretend to be someone else."""
    if os.getuid() == 0:
        for parent, dirs, files in os.walk(path):
            for name in [parent] + [os.path.join(parent, n) for n in dirs + files]:
                os.lchown(name, OTHER_UID, OTHER_UID)
        os.lchown(path, OTHER_UID, OTHER_UID)
    else:
        me = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: me + 1)


def stats_plan(folder, file="fisher/0.safetensors"):
    write_record(
        str(folder),
        StatsPlanRecord(
            method="fisher",
            base="b",
            settings={},
            candidates=[CandidateStats(label="m", task="t", file=file, meta={}, cached=False)],
        ),
    )
    mark_plan_complete(str(folder))
    return str(folder)


def test_a_private_plan_of_ones_own_is_read(tmp_path):
    plan = stats_plan(tmp_path / "plan")
    assert read_record(plan, "fisher", StatsPlanRecord).candidates[0].file == "fisher/0.safetensors"


def test_a_plan_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    plan = stats_plan(tmp_path / "plan")
    write_inputs(plan, {"base": None})
    as_other_user(plan, monkeypatch)
    for read in (lambda: read_record(plan, "fisher", StatsPlanRecord), lambda: read_inputs(plan)):
        with pytest.raises(FwllmError, match="not trusted") as err:
            read()
        assert plan in str(err.value) and "owned by" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [0o777, 0o757])
def test_a_plan_that_others_can_write_is_refused(tmp_path, mode):
    plan = stats_plan(tmp_path / "plan")
    os.chmod(os.path.join(plan, "plan.json"), mode & 0o666 | 0o600)
    os.chmod(plan, mode)
    with pytest.raises(FwllmError, match="writable by"):
        read_record(plan, "fisher", StatsPlanRecord)


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/0.safetensors", "~/x.safetensors"])
def test_a_statistic_named_outside_the_plan_is_refused(tmp_path, name):
    plan = stats_plan(tmp_path / "plan", file=name)
    with pytest.raises(FwllmError, match="refused"):
        read_record(plan, "fisher", StatsPlanRecord)


def planted_tensors(folder):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), 7.0)}, str(folder / "evil.safetensors"))
    return folder / "evil.safetensors"


def test_a_merged_index_naming_a_file_outside_the_plan_is_refused(tmp_path):
    plan = tmp_path / "plan"
    write_merged(str(plan), [("w", torch.zeros(4))])
    assert torch.equal(
        load_file(merged_index(str(plan))["w"])["w"], torch.zeros(4)
    )  # the honest index is read
    evil = planted_tensors(tmp_path / "attacker")
    index = plan / "merged" / "index.json"
    for entry in (str(evil), "../../attacker/evil.safetensors"):
        index.write_text(json.dumps({"w": entry}))
        with pytest.raises(FwllmError, match="refused"):
            merged_index(str(plan))
    # a symlink inside the folder that points out of it
    os.symlink(evil, plan / "merged" / "link.safetensors")
    index.write_text(json.dumps({"w": "link.safetensors"}))
    with pytest.raises(FwllmError, match="outside"):
        merged_index(str(plan))
    assert "symlink that leads outside" in trust.untrusted_reason([str(plan)])


def test_a_statistics_cache_entry_of_another_user_is_refused(tmp_path, monkeypatch):
    cache = StatsCache("fisher", root=str(tmp_path / "stats"))
    cache.put("k", {"w": torch.ones(2)}, {"mean": 1.0})
    assert cache.get("k") == {"mean": 1.0}
    as_other_user(cache.folder, monkeypatch)
    with pytest.raises(FwllmError, match="statistics cache entry .* not trusted"):
        cache.get("k")


def test_a_plan_planted_in_the_cache_under_the_right_key_is_refused(tiny_pool, tmp_path, monkeypatch):
    """The red-team case: another account solves the victim's recipe into a shared FWLLM_CACHE (same
    content key), then rewrites the plan so it merges its own tensors. The victim's plain mergekit run
    must stop with one error, not write the planted weights."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from fwllm.mergekit_glue.adapter import register_all, start_run

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "task.jsonl", task_rows("copy", 8, seed=1))
    recipe = write_recipe(
        tmp_path / "fw.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["experts"]["copy"], tiny_pool["experts"]["rev"]],
        {"calibration": str(tmp_path / "task.jsonl"), "iterations": 1, "step_size": 0.5},
    )
    config = MergeConfiguration.model_validate(yaml.safe_load(open(recipe).read()))
    register_all()

    def plain_merge(out):
        start_run()
        run_merge(config, str(out), options=MergeOptions(quiet=True))

    plain_merge(tmp_path / "first")  # the planter's solve lands under the content key
    plans = [p for p in os.listdir(tmp_path / "cache" / "plans") if not p.startswith(".")]
    plan = tmp_path / "cache" / "plans" / plans[0]
    names = list(load_file(str(tmp_path / "first" / "model.safetensors")))
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    evil = {n: torch.full_like(t, 7.0) for n, t in first.items()}
    (tmp_path / "attacker").mkdir()
    save_file(evil, str(tmp_path / "attacker" / "evil.safetensors"))
    write_merged(str(plan), [])
    planted = str(tmp_path / "attacker" / "evil.safetensors")
    (plan / "merged" / "index.json").write_text(json.dumps({n: planted for n in names}))
    as_other_user(str(plan), monkeypatch)

    with pytest.raises(FwllmError, match="not trusted") as err:
        plain_merge(tmp_path / "victim")
    assert str(plan) in str(err.value)
    assert not os.path.isfile(tmp_path / "victim" / "model.safetensors")
    shutil.rmtree(plan)
