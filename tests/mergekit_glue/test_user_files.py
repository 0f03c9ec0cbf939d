"""Never lose a user's file (issue 24): what `plan:` and `--force` may replace, and what never.

Truth used: the bytes a user put in a folder (what every refused run must leave as they were),
and that no model is loaded before a refusal. Inputs are copies in tmp_path, so a regression
destroys nothing shared; HOME is a fake one, and a mount point is a mocked `os.path.ismount`.
"""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import transformers

from conftest import fwllm_merge, one_error_line, write_recipe
from fwllm.core.errors import FwllmError

MANIFEST = ".fwllm-output.json"
FW = {"iterations": 1, "step_size": 0.5, "scaling": 1.0}


fwllm = fwllm_merge


def snapshot(folder):
    """Every file under `folder` and its bytes (what a refused run must leave as it was)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture()
def pool(tmp_path, tiny_pool):
    """Private copies of the tiny pool's base, two experts and calibration folder."""
    for name, src in (
        ("base", tiny_pool["base"]),
        ("copy", tiny_pool["experts"]["copy"]),
        ("rev", tiny_pool["experts"]["rev"]),
        ("calib", tiny_pool["calib"]),
    ):
        shutil.copytree(src, tmp_path / name)
    return tmp_path


@pytest.fixture()
def no_model_loads(monkeypatch):
    loads = []
    original = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(
        transformers.PreTrainedModel,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(cls) or original(cls, *a, **k)),
    )
    return loads


def user_folder(path, files=None):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"thesis.tex": "years of work", "notes/todo.md": "- finish"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return snapshot(path)


def fw_recipe(pool, **params):
    return write_recipe(
        pool / "fw.yml",
        "fw_merging",
        pool / "base",
        [pool / "copy", pool / "rev"],
        {"calibration": str(pool / "calib"), **FW, **params},
    )


def ta_recipe(pool):
    return write_recipe(
        pool / "ta.yml",
        "task_arithmetic",
        pool / "base",
        [pool / "copy", pool / "rev"],
        per_model=[{"weight": 0.5}, {"weight": 0.5}],
    )


# ------------------------------------------------------------------------------ plan: DIR
def test_a_plan_folder_holding_user_files_is_refused_before_any_model_loads(pool, no_model_loads):
    before = user_folder(pool / "docs")
    line = one_error_line(fwllm(fw_recipe(pool, plan=str(pool / "docs")), pool / "out"))
    assert f"plan: {pool / 'docs'} holds files that are not an fwllm plan" in line, line
    assert snapshot(pool / "docs") == before and no_model_loads == []
    assert not (pool / "out").exists()


def test_plan_home_never_wipes_the_home(pool, monkeypatch, no_model_loads):
    home = pool / "home"
    before = user_folder(home)
    monkeypatch.setenv("HOME", str(home))
    line = one_error_line(fwllm(fw_recipe(pool, plan="~"), pool / "out"))
    assert f"plan: {home} holds files that are not an fwllm plan" in line, line
    assert snapshot(home) == before and no_model_loads == []


def test_plain_mergekit_plan_resolution_refuses_a_user_folder(pool):
    """What plain `mergekit-yaml` runs to find a plan (`MergekitAdapter._resolve`)."""
    from fwllm.mergekit_glue.adapter import MergekitAdapter
    from fwllm.mergekit_glue.recipe import load_recipe, merge_job

    before = user_folder(pool / "docs")
    recipe = load_recipe(str(fw_recipe(pool, plan=str(pool / "docs"))))
    job = merge_job(recipe, "", "cpu", False)
    with pytest.raises(FwllmError, match="holds files that are not an fwllm plan"):
        MergekitAdapter(recipe.method)._resolve(job)
    assert snapshot(pool / "docs") == before


def test_plan_into_an_empty_folder_then_reused(pool):
    (pool / "plans").mkdir()
    recipe = fw_recipe(pool, plan=str(pool / "plans"))
    assert fwllm(recipe, pool / "out1").exit_code == 0
    assert (pool / "plans" / "plan.json").is_file() and (pool / "plans" / MANIFEST).is_file()
    stamp = (pool / "plans" / "plan.json").stat().st_mtime_ns
    assert fwllm(recipe, pool / "out2").exit_code == 0  # a folder holding a plan is a good `plan:`
    assert (pool / "plans" / "plan.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------ what --force replaces
@pytest.mark.parametrize(
    "target, relation",
    [
        ("base", "is an input"),
        ("calib", "is an input"),
        ("base/merged", "lies inside an input"),
        (".", "holds an input"),  # the folder that holds the recipe and the models
    ],
)
def test_force_never_replaces_an_input(pool, no_model_loads, target, relation):
    recipe = fw_recipe(pool)  # names the calibration folder too
    before = snapshot(pool)
    line = one_error_line(fwllm(recipe, pool / target, "--force"))
    assert relation in line and "fwllm never writes over its inputs" in line, line
    assert snapshot(pool) == before and no_model_loads == []


def test_force_never_replaces_the_plan_folder(pool, no_model_loads):
    user_folder(pool / "plans", {"x": "y"})
    shutil.rmtree(pool / "plans")  # a `plan:` folder yet to be made is an input all the same
    line = one_error_line(fwllm(fw_recipe(pool, plan=str(pool / "plans")), pool / "plans", "--force"))
    assert "is an input" in line, line
    assert not (pool / "plans").exists() and no_model_loads == []


def test_force_never_replaces_the_current_folder(pool, monkeypatch):
    work = pool / "work"
    before = user_folder(work)
    monkeypatch.chdir(work)
    line = one_error_line(fwllm(ta_recipe(pool), ".", "--force"))
    assert "is the current folder" in line, line
    assert snapshot(work) == before


def test_force_never_replaces_home(pool, monkeypatch):
    home = pool / "home"
    before = user_folder(home)
    monkeypatch.setenv("HOME", str(home))
    recipe = ta_recipe(pool)
    line = one_error_line(fwllm(recipe, home, "--force"))  # `~`, as the shell expands it
    assert "is your home folder" in line, line
    line = one_error_line(fwllm(recipe, pool, "--force"))
    assert "holds" in line, line  # (the recipe, here, before the home folder)
    assert snapshot(home) == before


def test_force_never_replaces_a_mount_point(pool, monkeypatch):
    disk = pool / "disk"
    before = user_folder(disk)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(disk) or real_ismount(p))
    line = one_error_line(fwllm(ta_recipe(pool), disk, "--force"))
    assert "is a mount point" in line, line
    assert snapshot(disk) == before and sorted(p for p in os.listdir(pool) if p.startswith(".")) == []


def test_force_replaces_only_an_earlier_fwllm_output(pool):
    recipe = ta_recipe(pool)
    before = user_folder(pool / "out")
    line = one_error_line(fwllm(recipe, pool / "out", "--force"))
    assert "--force replaces only an earlier fwllm output" in line, line
    assert snapshot(pool / "out") == before

    assert fwllm(recipe, pool / "merged").exit_code == 0
    listed = json.loads((pool / "merged" / MANIFEST).read_text())["files"]
    assert "model.safetensors" in listed
    assert sorted(listed) == sorted(set(snapshot(pool / "merged")) - {MANIFEST})
    assert "pass --force" in one_error_line(fwllm(recipe, pool / "merged"))
    assert fwllm(recipe, pool / "merged", "--force").exit_code == 0  # fwllm's own output: replaced

    (pool / "merged" / "eval_notes.md").write_text("mine")  # a user's file in an earlier output
    line = one_error_line(fwllm(recipe, pool / "merged", "--force"))
    assert "holds files fwllm did not write (eval_notes.md)" in line, line
    assert (pool / "merged" / "eval_notes.md").read_text() == "mine"


# ------------------------------------------------------------------------------ symlinked OUT_DIR
def test_a_symlinked_out_dir_is_followed_and_survives(pool):
    recipe = ta_recipe(pool)
    (pool / "disk" / "real").mkdir(parents=True)
    (pool / "out").symlink_to(pool / "disk" / "real")
    assert fwllm(recipe, pool / "out").exit_code == 0
    assert (pool / "out").is_symlink() and (pool / "disk" / "real" / "model.safetensors").is_file()
    assert fwllm(recipe, pool / "out", "--force").exit_code == 0  # a replace keeps the link too
    assert (pool / "out").is_symlink() and (pool / "disk" / "real" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ plain mergekit
def test_plain_mergekit_holds_the_out_dir_lock_for_fwllm_methods(tmp_path, monkeypatch):
    """The startup hook's `run_merge` takes OUT_DIR's lock around an fwllm merge."""
    from fwllm.io.staged_output import folder_lock
    from fwllm.mergekit_glue.hook import _plans_per_run

    seen = []

    def run_merge(merge_config, out_path, options=None, config_source=None):
        with pytest.raises(FwllmError, match="in use by"):  # a second writer is kept out meanwhile
            with folder_lock(out_path, timeout=0):
                pass
        seen.append(out_path)

    module = SimpleNamespace(run_merge=run_merge)
    _plans_per_run(module)
    out = str(tmp_path / "out")
    module.run_merge(SimpleNamespace(merge_method="fw_merging", parameters={}), out, options=None)
    assert seen == [out]
    with folder_lock(out, timeout=0):  # released afterwards
        pass
