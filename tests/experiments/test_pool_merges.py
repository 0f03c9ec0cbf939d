"""Merging whole expert pools: the per-method recipes, `fwllm demo` and the merge matrix
(eval/compare.py), on the tiny LLaMA pool."""

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import load_tensors

from fwllm.cli.demo import demo_command
from fwllm.core.errors import FwllmError
from fwllm.experiments.matrix import FALLBACK_TASK, MatrixSettings, run_matrix, summarize
from fwllm.experts import build_pool
from fwllm.experiments.pool_recipes import RECIPE_METHODS, Member, PoolSettings, recipe_for
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


def test_matrix_cells_are_the_merges_they_claim(pool, tmp_path):
    """TA@n = base + lambda * sum of the first n task vectors and average@n = the mean of the
    first n experts, computed here by hand; FW-Merging beats TA on the held-in dev loss once
    irrelevant experts join (the pool is built so that they conflict)."""
    s = MatrixSettings(methods=("average", "task_arithmetic", "fw_hard"), sizes=(2, 7), suites="", dev_rows=8,
                       merge=TINY)
    report = run_matrix(pool, str(tmp_path / "m"), s, progress=False)
    cells = {c["label"]: c for c in report["cells"]}
    assert set(cells) == {f"{m}@{n}" for m in s.methods for n in s.sizes}
    relevant_first = [e for e in pool.experts if e.relevant] + [e for e in pool.experts if not e.relevant]
    base = load_tensors(pool.base)
    experts = [load_tensors(e.path) for e in relevant_first[:2]]
    ta = load_tensors(cells["task_arithmetic@2"]["path"])
    avg = load_tensors(cells["average@2"]["path"])
    for name, b in base.items():
        want = b + TINY.scaling * sum(e[name] - b for e in experts)
        torch.testing.assert_close(ta[name], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(avg[name], sum(e[name] for e in experts) / 2, rtol=1e-5, atol=1e-6)
    assert cells["fw_hard@7"]["n_irrelevant"] == 3 and cells["fw_hard@2"]["held_in"] == ["copy", "rev"]
    summary = {r["label"]: r for r in report["summary"]}
    assert summary["fw_hard@7"]["mean_dev_loss"] < summary["task_arithmetic@7"]["mean_dev_loss"]
    out = tmp_path / "m"
    saved = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in saved["summary"]] == [r["label"] for r in report["summary"]]
    assert (out / "vs_candidates.png").stat().st_size > 0 and "| 7 (3 irrelevant) | fw_hard |" in (
        out / "report.md").read_text()
    mix = (out / "pool7" / "calibration_per_model" / f"{FALLBACK_TASK}.jsonl").read_text().splitlines()
    assert len(mix) == 4 * len((out / "pool7" / "calibration" / "copy.jsonl").read_text().splitlines())


def test_matrix_rejects_bad_sizes_and_methods(pool, tmp_path):
    with pytest.raises(FwllmError, match="pool sizes"):
        run_matrix(pool, str(tmp_path), MatrixSettings(methods=("ties",), sizes=(99,), suites=""), progress=False)
    with pytest.raises(FwllmError, match="unknown method"):
        run_matrix(pool, str(tmp_path), MatrixSettings(methods=("magic",), sizes=(2,), suites=""), progress=False)


def test_summary_normalizes_held_in_by_each_tasks_expert():
    cells = [{"label": "ta@2", "method": "ta", "n_candidates": 2, "n_irrelevant": 0, "held_in": ["pubmedqa", "sst2"],
              "dev_loss": {"pubmedqa": 1.0, "sst2": 3.0}}]
    scores = {"ta@2": {"fwllm_pubmedqa": 30.0, "fwllm_glue_sst2": 80.0, "fwllm_glue_rte": 50.0, "fwllm_glue_cola": 10.0},
              "expert:pubmedqa": {"fwllm_pubmedqa": 60.0}, "expert:sst2": {"fwllm_glue_sst2": 100.0}}
    experts = {"pubmedqa": "expert:pubmedqa", "sst2": "expert:sst2"}
    row = summarize(cells, scores, experts, ["fwllm_glue_rte", "fwllm_glue_cola"])[0]
    assert row["mean_dev_loss"] == 2.0
    assert row["held_in_normalized"] == pytest.approx((50.0 + 80.0) / 2)
    assert row["held_out_mean"] == 30.0


def test_demo_tiny_end_to_end(pool, tiny_pools_root, tmp_path, monkeypatch):
    """The demo prints the quality benchmark's table; FW overrides reach the recipe; a second
    run reuses every merge and score and prints the same table."""
    from fwllm.experiments import quality_bench

    # others may edit fwllm's sources between the two runs, which rightly voids the cache
    monkeypatch.setattr(quality_bench, "source_hash", lambda files=None, root=None: "fixed")
    out = tmp_path / "demo"
    args = ["--profile", "tiny", "--root", tiny_pools_root, "--out", str(out), "--iterations", "4",
            "--fw", "step_size=0.4", "--sizes", "7"]
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
    assert rows["fw_hard@7"]["held_in_normalized"]["point"] > rows["task_arithmetic@7"]["held_in_normalized"]["point"]
    recipe = yaml.safe_load((out / "pool7" / "recipes" / "fw_hard.yml").read_text())
    assert recipe["parameters"]["iterations"] == 4 and recipe["parameters"]["step_size"] == 0.4
    assert (out / "pool7" / "merged" / "fw_hard" / "fwllm_plan" / "trace.json").is_file()
    assert "| 7 (3 irrelevant) | FW-hard |" in result.output and (out / "report.md").is_file()

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
            with open(os.path.join(folder, f"{e.task}.jsonl")) as a, open(pool.tasks[e.task].calibration) as b:
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
    s = PoolSettings(max_rows=6, max_length=32, batch_size=6, dtype="float32", adamerging_steps=2,
                     fisher="exact")
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
