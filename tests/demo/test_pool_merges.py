"""Merging whole expert pools: the per-method recipes and `fwllm demo`, on the tiny LLaMA pool
(the merge matrix of eval/compare.py: tests/fwbench/test_matrix.py)."""

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import load_tensors

from fwllm.cli.demo import demo_command
from fwllm.demo.recipes import RECIPE_METHODS, Member, PoolSettings, recipe_for
from fwllm.experts import build_pool
from fwllm.mergekit_glue.recipe import load_recipe

TINY = PoolSettings(iterations=3, step_size=0.5, max_rows=8, max_length=64, batch_size=8, dtype="float32")


@pytest.fixture(scope="module")
def pool(tiny_pools_root):
    return build_pool("tiny", "llama", root=tiny_pools_root, progress=False)


@pytest.mark.parametrize("method", sorted(RECIPE_METHODS))
def test_every_recipe_passes_strict_validation(pool, tmp_path, method):
    """fwllm rejects misspelt parameters, so a recipe it accepts uses real parameter names."""
    members = [Member(e.path, e.task) for e in pool.experts]
    calib = os.path.dirname(pool.tasks["copy"].calibration)
    recipe = recipe_for(method, pool.base, members, calib, TINY, fallback_task="copy")
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(str(path))
    assert loaded.config.merge_method == recipe["merge_method"]
    assert len(loaded.config.models) == len(members)
    if method in ("fisher", "regmean"):  # irrelevant experts are measured on the fallback task
        assert {m["parameters"]["task"] for m in recipe["models"]} == {e.task or "copy" for e in pool.experts}


def test_unknown_recipe_method(pool):
    with pytest.raises(ValueError, match="unknown recipe method"):
        recipe_for("fw_medium", pool.base, [], "", TINY)


def test_demo_tiny_end_to_end(pool, tiny_pools_root, tmp_path, monkeypatch):
    """The demo prints its table of tuned TA, RegMean and FW; FW overrides reach the recipe; a
    second run reuses every merge and score and prints the same table."""
    from fwllm.demo import pool_quality, scores

    # others may edit fwllm's sources between the two runs, which rightly voids the cache
    for module in (pool_quality, scores):
        monkeypatch.setattr(module, "source_hash", lambda files=None, root=None: "fixed")
    out = tmp_path / "demo"
    args = [
        "--profile",
        "tiny",
        "--root",
        tiny_pools_root,
        "--out",
        str(out),
        "--iterations",
        "4",
        "--fw",
        "step_size=0.4",
        "--sizes",
        "7",
    ]
    result = CliRunner().invoke(demo_command, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in summary["summary"]}
    assert set(rows) == {f"{m}@7" for m in ("base", "task_arithmetic", "regmean", "fw_hard")}
    for r in rows.values():
        f = r["held_in_normalized"]
        assert f["lo"] <= f["point"] <= f["hi"]
    assert rows["base@7"]["held_in_normalized"]["point"] == 0.0  # loss tasks: the base keeps none of the gain
    # the pool's irrelevant experts conflict with the relevant ones: FW beats tuned TA there
    assert (
        rows["fw_hard@7"]["held_in_normalized"]["point"]
        > rows["task_arithmetic@7"]["held_in_normalized"]["point"]
    )
    recipe = yaml.safe_load((out / "pool7" / "recipes" / "fw_hard.yml").read_text())
    assert recipe["parameters"]["iterations"] == 4 and recipe["parameters"]["step_size"] == 0.4
    assert (out / "pool7" / "merged" / "fw_hard" / "fwllm_plan" / "trace.json").is_file()
    assert "| 7 (3 irrelevant) | FW-hard |" in result.output and (out / "report.md").is_file()
    # the demo's report is the short one: the benchmark's sections are eval/fwbench's
    report = (out / "report.md").read_text()
    lam = next(c["info"]["lambda"] for c in summary["cells"] if c["label"] == "task_arithmetic@7")
    assert f"| task_arithmetic@7 | {lam} |" in report  # the lambda tuning chose
    assert "differences" not in summary and "Paired differences" not in report

    again = CliRunner().invoke(demo_command, args)
    assert again.exit_code == 0, again.output
    assert "merging" not in again.output and "scored" not in again.output
    table = lambda text: [line for line in text.splitlines() if line.startswith("| ")]  # noqa: E731
    assert table(again.output) == table(result.output)


def test_pool_calibration_dir_has_one_file_per_relevant_task(pool):
    folder = pool.calibration_dir()
    assert sorted(os.listdir(folder)) == sorted(f"{e.task}.jsonl" for e in pool.experts if e.relevant)
    for e in pool.experts:
        if e.relevant:
            with (
                open(os.path.join(folder, f"{e.task}.jsonl")) as a,
                open(pool.tasks[e.task].calibration) as b,
            ):
                assert a.read() == b.read()
    assert pool.calibration_dir() == folder  # made once


def test_home_relative_paths_in_recipes(pool, tmp_path, monkeypatch):
    """recipes/smollm2-135m-pool8-fw.yml points into ~/.cache: `~` works for models and calibration."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(pool.root, home / "pool", symlinks=True)
    monkeypatch.setenv("HOME", str(home))
    members = [Member(f"~/pool/experts/{e.name}", e.task) for e in pool.experts[:2]]
    recipe = recipe_for("fw_hard", "~/pool/base", members, "~/pool/data", TINY)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(str(path))
    assert loaded.config.parameters["calibration"] == str(home / "pool" / "data")
    assert str(loaded.config.base_model) == str(home / "pool" / "base")


@pytest.mark.parametrize("method", ["fisher", "regmean", "adamerging"])
def test_family_methods_merge_a_masked_lm_pool(tiny_pools_root, tmp_path, monkeypatch, method):
    """RobertaForMaskedLM experts on unlabeled text: each data-informed method merges them into
    a loadable masked LM that differs from every input (Fisher/RegMean measure each expert on
    its own corpus; AdaMerging minimises the entropy of the masked-token predictions)."""
    from transformers import RobertaForMaskedLM

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    mlm = build_pool("tiny", "roberta-mlm", root=tiny_pools_root, progress=False)
    experts = [e for e in mlm.experts if e.relevant]
    s = PoolSettings(
        max_rows=6, max_length=32, batch_size=6, dtype="float32", adamerging_steps=2, fisher="exact"
    )
    recipe = recipe_for(method, mlm.base, [Member(e.path, e.task) for e in experts], mlm.calibration_dir(), s)
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    from fwllm.mergekit_glue.merge import merge_recipe
    from mergekit.options import MergeOptions

    merge_recipe(str(path), str(out), MergeOptions(quiet=True))
    RobertaForMaskedLM.from_pretrained(out)
    merged = load_tensors(out)
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    for e in experts:
        assert not torch.allclose(merged[name], load_tensors(e.path)[name])
