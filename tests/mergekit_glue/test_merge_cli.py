"""`fwllm merge` as a drop-in for mergekit-yaml, and its handling of bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import write_recipe
from fwllm.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def fwllm(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def mergekit_yaml(*args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env or ENV)


def same_tensors(a, b):
    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    root = tmp_path_factory.mktemp("roberta")
    cfg = RobertaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        num_labels=2,
    )
    dirs = []
    for i in range(3):
        torch.manual_seed(i)
        RobertaForSequenceClassification(cfg).save_pretrained(root / f"m{i}")
        dirs.append(root / f"m{i}")
    return dirs


def task_arithmetic_by_hand(base, models, weights, lam):
    """theta_0 + lambda * sum_i w_i (theta_i - theta_0), per tensor, from the safetensors files."""
    return {n: b + lam * sum(w * (m[n] - b) for w, m in zip(weights, models)) for n, b in base.items()}


def trim_by_hand(tau, density):
    """The top max(1, floor(density * n)) magnitudes of tau, or None where a tie at the cut-off
    makes the choice arbitrary (zeros may tie: trimmed or not, they contribute nothing)."""
    flat = tau.flatten()
    k = max(1, int(density * flat.numel()))
    mags = flat.abs().sort(descending=True).values
    if k < flat.numel() and mags[k] == mags[k - 1] != 0:
        return None
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return (flat * keep).view_as(tau)


def ties_by_hand(base, models, weights, densities, lam=1.0):
    """TIES (trim, elect the sign of the summed weighted mass, weighted mean of the agreeing
    entries, mergekit's `normalize: true`), per tensor; tensors with tied cut-offs are left out."""
    out = {}
    for n, b in base.items():
        trimmed = [trim_by_hand(m[n] - b, d) for m, d in zip(models, densities)]
        if any(t is None for t in trimmed):
            continue
        w = [torch.full_like(b, wi) for wi in weights]
        mass = sum(wi * t for wi, t in zip(w, trimmed))
        sign = torch.where(mass >= 0, 1.0, -1.0)
        agree = [torch.sign(t) == sign for t in trimmed]  # a trimmed (zero) entry never agrees
        num = sum(wi * t * a for wi, t, a in zip(w, trimmed, agree))
        den = sum(wi * a for wi, a in zip(w, agree))
        out[n] = b + lam * torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return out


def assert_matches_by_hand(out_dir, expected, total):
    merged = load_file(os.path.join(out_dir, "model.safetensors"))
    assert len(merged) == total and len(expected) >= 0.9 * total  # (nearly) every tensor is checked
    for n, t in expected.items():
        assert torch.allclose(merged[n], t, atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_same_tensors_as_mergekit_yaml_llama(tmp_path, tiny_pool, method):
    # `fwllm merge` runs mergekit's run_merge for mergekit's own methods, so this is a drop-in
    # check of the CLI (options, seed, output layout); the by-hand sums below check the tensors.
    e = tiny_pool["experts"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        method,
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        {"lambda": 0.7},
        per_model=[{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}],
    )
    r = fwllm(recipe, tmp_path / "a", "--random-seed", "3")
    assert r.exit_code == 0, r.output
    mk = mergekit_yaml(recipe, tmp_path / "b", "--random-seed", "3")
    assert mk.returncode == 0, mk.stderr[-2000:]
    assert same_tensors(tmp_path / "a", tmp_path / "b")
    base = load_file(tiny_pool["base"] / "model.safetensors")
    models = [load_file(e[k] / "model.safetensors") for k in ("copy", "rev")]
    if method == "task_arithmetic":
        assert_matches_by_hand(
            tmp_path / "a", task_arithmetic_by_hand(base, models, [0.6, 0.4], 0.7), len(base)
        )
    elif method == "ties":
        assert_matches_by_hand(
            tmp_path / "a", ties_by_hand(base, models, [0.6, 0.4], [0.5, 0.5], 0.7), len(base)
        )


def test_same_tensors_as_mergekit_yaml_roberta(tmp_path, tiny_roberta):
    base, *models = tiny_roberta
    recipe = write_recipe(
        tmp_path / "r.yml", "ties", base, models, per_model=[{"weight": 1.0, "density": 0.4}] * 2
    )
    assert fwllm(recipe, tmp_path / "a").exit_code == 0
    assert mergekit_yaml(recipe, tmp_path / "b").returncode == 0
    assert same_tensors(tmp_path / "a", tmp_path / "b")
    base_t = load_file(base / "model.safetensors")
    model_t = [load_file(m / "model.safetensors") for m in models]
    assert_matches_by_hand(tmp_path / "a", ties_by_hand(base_t, model_t, [1.0, 1.0], [0.4, 0.4]), len(base_t))


def test_plain_mergekit_yaml_runs_fw_recipe_through_the_startup_hook(tmp_path, tiny_pool):
    import importlib.util

    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("mergekit").origin))
    hook_installed = os.path.isfile(os.path.join(site, "fwllm_mergekit.pth"))
    if not hook_installed and not os.environ.get("CI"):
        pytest.skip("editable install: the .pth hook is installed only by a regular `pip install .`")
    assert hook_installed, "fwllm_mergekit.pth missing from site-packages"
    e = tiny_pool["experts"]
    params = {
        "calibration": str(tiny_pool["calib"]),
        "preset": "paper",
        "iterations": 3,
        "scaling": 1.0,
        "step_size": 0.5,
    }
    recipe = write_recipe(tmp_path / "fw.yml", "fw_merging", tiny_pool["base"], [e["copy"], e["rev"]], params)
    env = {**ENV, "FWLLM_CACHE": str(tmp_path / "cache")}
    mk = mergekit_yaml(recipe, tmp_path / "mk", env=env)
    assert mk.returncode == 0, mk.stderr[-3000:]
    assert fwllm(recipe, tmp_path / "fw").exit_code == 0
    a, b = load_file(tmp_path / "mk" / "model.safetensors"), load_file(tmp_path / "fw" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_plain_mergekit_yaml_reports_a_refusal_in_one_line(tmp_path, tiny_pool):
    """fwllm's refusals under plain mergekit-yaml read as under `fwllm merge`: one `Error:` line, no traceback
    (here a `plan:` folder that holds a user's file, refused before any tensor is read)."""
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")):
        pytest.skip("mergekit-yaml is not installed beside this Python")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("mine")
    params = {"calibration": str(tiny_pool["calib"]), "iterations": 2, "plan": str(notes)}
    recipe = write_recipe(
        tmp_path / "fw.yml", "fw_merging", tiny_pool["base"], [tiny_pool["experts"]["copy"]], params
    )
    mk = mergekit_yaml(recipe, tmp_path / "mk", env={**ENV, "FWLLM_CACHE": str(tmp_path / "cache")})
    assert mk.returncode != 0
    assert "Traceback" not in mk.stderr, mk.stderr[-2000:]
    errors = [line for line in mk.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(notes) in errors[0], mk.stderr[-2000:]
    assert (notes / "thesis.tex").read_text() == "mine" and os.listdir(notes) == ["thesis.tex"]


def test_plain_mergekit_yaml_relative_paths_offline(tmp_path, tiny_pool):
    # mergekit's model card asks the Hub about relative paths; the hook keeps local folders local
    e = tiny_pool["experts"]
    for name, src in (("base", tiny_pool["base"]), ("copy", e["copy"]), ("rev", e["rev"])):
        shutil.copytree(src, tmp_path / name)
    (tmp_path / "r.yml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
        "  - model: copy\n    parameters: {weight: 0.5}\n  - model: rev\n    parameters: {weight: 0.5}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "fwllm.cli", "merge", "r.yml", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "README.md").exists()


def test_fw_plan_reproduces_with_plain_task_arithmetic(tmp_path, tiny_pool):
    e = tiny_pool["experts"]
    params = {
        "calibration": str(tiny_pool["calib"]),
        "preset": "paper",
        "iterations": 4,
        "scaling": 1.0,
        "step_size": 0.5,
    }
    recipe = write_recipe(
        tmp_path / "fw.yml", "fw_merging", tiny_pool["base"], [e["copy"], e["rev"], e["noise"]], params
    )
    assert fwllm(recipe, tmp_path / "fw").exit_code == 0
    repro = tmp_path / "fw" / "fwllm_plan" / "reproduce.yml"
    assert mergekit_yaml(repro, tmp_path / "re").returncode == 0
    a, b = load_file(tmp_path / "fw" / "model.safetensors"), load_file(tmp_path / "re" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    trace = json.loads((tmp_path / "fw" / "fwllm_plan" / "trace.json").read_text())["trace"]
    assert len(trace) == 4 and all({"objective", "gamma", "chosen"} <= set(t) for t in trace)


def _one_error_line(result):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _nothing_finished(tmp_path, out="out"):
    assert not (tmp_path / out).exists()
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def test_bad_inputs_give_one_line(tmp_path, tiny_pool):
    e = tiny_pool["experts"]
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("merge_method: ties\nmodels: [\n")
    assert "not valid YAML (line" in _one_error_line(fwllm(bad_yaml, tmp_path / "out"))

    unknown = write_recipe(tmp_path / "u.yml", "tie", tiny_pool["base"], [e["copy"]])
    line = _one_error_line(fwllm(unknown, tmp_path / "out"))
    assert "unknown merge_method 'tie'" in line and "fw_merging" in line and "ties" in line

    missing = write_recipe(tmp_path / "m.yml", "ties", tiny_pool["base"], [tmp_path / "nowhere"])
    assert "model folder not found" in _one_error_line(fwllm(missing, tmp_path / "out"))

    typo = write_recipe(
        tmp_path / "t.yml",
        "fw_merging",
        tiny_pool["base"],
        [e["copy"]],
        {"calibration": str(tiny_pool["calib"]), "iteratons": 3},
    )
    assert "unknown parameter 'iteratons'" in _one_error_line(fwllm(typo, tmp_path / "out"))

    broken = tmp_path / "calib_broken.jsonl"
    broken.write_text('{"prompt": "copy : 1 =", "response": "1"}\n{"prompt": 3}\n')
    calib = write_recipe(
        tmp_path / "c.yml", "fw_merging", tiny_pool["base"], [e["copy"]], {"calibration": str(broken)}
    )
    assert "calib_broken.jsonl:2:" in _one_error_line(fwllm(calib, tmp_path / "out"))

    negative = write_recipe(
        tmp_path / "n.yml",
        "fw_merging",
        tiny_pool["base"],
        [e["copy"]],
        {"calibration": str(tiny_pool["calib"]), "batches_per_iteration": -1},
    )
    assert "batches_per_iteration must be >= 0 (got -1)" in _one_error_line(fwllm(negative, tmp_path / "out"))

    empty = write_recipe(
        tmp_path / "e.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["base"]],
        {"calibration": str(tiny_pool["calib"])},
    )
    assert "candidate pool is empty" in _one_error_line(fwllm(empty, tmp_path / "out"))
    _nothing_finished(tmp_path)


def test_mismatched_architecture(tmp_path, tiny_pool, tiny_roberta):
    recipe = write_recipe(tmp_path / "x.yml", "ties", tiny_pool["base"], [tiny_roberta[1]])
    assert "does not match the base" in _one_error_line(fwllm(recipe, tmp_path / "out"))
    _nothing_finished(tmp_path)


def test_uncached_hub_id_offline_is_one_line(tmp_path, tiny_pool):
    recipe = write_recipe(tmp_path / "h.yml", "ties", tiny_pool["base"], ["nobody/not-cached-model"])
    line = _one_error_line(fwllm(recipe, tmp_path / "out"))
    assert "nobody/not-cached-model" in line and "HF_HUB_OFFLINE" in line


def test_existing_output_is_never_overwritten_silently(tmp_path, tiny_pool):
    e = tiny_pool["experts"]
    recipe = write_recipe(
        tmp_path / "r.yml", "task_arithmetic", tiny_pool["base"], [e["copy"]], per_model=[{"weight": 1.0}]
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert "exists and is not empty" in _one_error_line(fwllm(recipe, out))
    assert "replaces only an earlier fwllm output" in _one_error_line(fwllm(recipe, out, "--force"))
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    shutil.rmtree(out)
    assert fwllm(recipe, out).exit_code == 0
    assert "pass --force" in _one_error_line(fwllm(recipe, out))  # an earlier fwllm output
    old = (out / "model.safetensors").stat().st_ino  # the old file exists until the new one is in place
    assert fwllm(recipe, out, "--force").exit_code == 0
    assert (out / "model.safetensors").stat().st_ino != old


def test_failed_solve_leaves_no_output(tmp_path, tiny_pool):
    e = tiny_pool["experts"]
    nan_rows = tmp_path / "cls.jsonl"
    nan_rows.write_text('{"sentence": "a", "label": 1}\n')  # labelled rows cannot score a causal LM
    recipe = write_recipe(
        tmp_path / "r.yml", "fw_merging", tiny_pool["base"], [e["copy"]], {"calibration": str(nan_rows)}
    )
    assert "cannot score" in _one_error_line(fwllm(recipe, tmp_path / "out"))
    _nothing_finished(tmp_path)
