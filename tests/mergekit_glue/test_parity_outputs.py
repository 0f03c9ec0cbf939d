"""What a `fwllm merge` output holds besides the tensors: its model card, the plan's copy of the
merged tensors (deleted unless asked for, the plan still reusable), and a reproduce.yml that
plain mergekit runs with the command written into it."""

import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from conftest import load_tensors, write_recipe
from fwllm.mergekit_glue.merge import merge_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def fw(tiny_pool, **kw):
    return {
        "calibration": str(tiny_pool["calib"]),
        "preset": "paper",
        "iterations": 2,
        "step_size": 0.5,
        "scaling": 1.0,
        **kw,
    }


def run(recipe, out, **options):
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True, **options))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))


def test_card_is_titled_with_the_output_and_lists_the_candidates(tmp_path, tiny_pool, cache):
    e = tiny_pool["experts"]
    recipe = write_recipe(
        tmp_path / "r.yml", "fw_merging", tiny_pool["base"], [e["copy"], e["rev"]], fw(tiny_pool)
    )
    card = (run(recipe, tmp_path / "my-merge") / "README.md").read_text()
    assert "\n# my-merge\n" in card and ".partial" not in card
    listed = card.split("### Models Merged")[1].split("###")[0]
    bullets = [line[2:] for line in listed.splitlines() if line.startswith("* ")]
    assert sorted(bullets) == sorted([str(e["copy"]), str(e["rev"])])  # (mergekit lists them unordered)


@pytest.mark.parametrize("method", ["fw_merging", "fisher"])
def test_merged_copy_is_deleted_and_the_plan_still_reused(tmp_path, tiny_pool, cache, method):
    e = tiny_pool["experts"]
    params = fw(tiny_pool) if method == "fw_merging" else {"calibration": str(tiny_pool["calib"])}
    per_model = None if method == "fw_merging" else [{"task": "copy"}, {"task": "rev"}]
    plan = tmp_path / "plan"
    recipe = write_recipe(
        tmp_path / "r.yml",
        method,
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        dict(params, plan=str(plan)),
        per_model=per_model,
    )
    first = run(recipe, tmp_path / "first")
    assert not (first / "fwllm_plan" / "merged").exists()
    assert not (plan / "merged").exists() and (plan / "DONE").exists()
    # the reused plan has no merged tensors: mergekit is handed the candidates and the method
    # merges each tensor from the plan's atoms or statistics again
    again = run(recipe, tmp_path / "again")
    a, b = load_tensors(first), load_tensors(again)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # asked for, the copy stays, and holds what the output holds
    kept = write_recipe(
        tmp_path / "k.yml",
        method,
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        dict(params, keep_merged=True),
        per_model=per_model,
    )
    out = run(kept, tmp_path / "kept")
    stored = {}
    for f in os.listdir(out / "fwllm_plan" / "merged"):
        if f.endswith(".safetensors"):
            stored.update(load_file(out / "fwllm_plan" / "merged" / f))
    assert stored and all(torch.allclose(stored[n], a[n], atol=1e-6) for n in stored)


def test_refined_plan_keeps_its_merged_tensors(tmp_path, tiny_pool, cache):
    # local_merge regmean refines with Gram matrices the plan does not keep: the stored merge
    # is the only record of it, so it is not deleted
    e = tiny_pool["experts"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        fw(tiny_pool, local_merge="regmean"),
    )
    assert (run(recipe, tmp_path / "out") / "fwllm_plan" / "merged" / "index.json").is_file()


@pytest.fixture(scope="module")
def lora_pool(tiny_pool, tmp_path_factory):
    """Two LoRA adapters on the tiny base, their factors set by hand."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora_pool")
    for i, rank in enumerate((4, 2)):
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(tiny_pool["base"]),
            LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for prm in model.parameters():
                if prm.requires_grad:
                    prm.copy_(0.2 * torch.randn_like(prm))
        model.save_pretrained(root / f"a{i}")
    return [root / "a0", root / "a1"]


def test_reproduce_yml_of_a_lora_pool_runs_with_the_command_it_names(tmp_path, tiny_pool, lora_pool, cache):
    base = tiny_pool["base"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        base,
        [f"{base}+{a}" for a in lora_pool],
        fw(tiny_pool, iterations=3),
    )
    out = run(recipe, tmp_path / "fw", lora_merge_cache=str(tmp_path / "lc"))
    plan = out / "fwllm_plan"
    text = (plan / "reproduce.yml").read_text()
    command = text.splitlines()[1].lstrip("# ").strip()
    assert command == "mergekit-yaml reproduce.yml OUT_DIR --lora-merge-cache LORA_CACHE_DIR"
    assert yaml.safe_load(text)["merge_method"] == "task_arithmetic"
    args = shlex.split(
        command.replace("OUT_DIR", str(tmp_path / "re")).replace("LORA_CACHE_DIR", str(tmp_path / "mk_lora"))
    )
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    # exactly the written command, from the plan folder, through mergekit's own executor
    done = subprocess.run(
        [exe, *args[1:]], cwd=plan, capture_output=True, text=True, env={**ENV, "FWLLM_NO_MERGEKIT_HOOK": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_tensors(out), load_tensors(tmp_path / "re")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert any(not torch.equal(a[n], load_tensors(base)[n]) for n in a)  # the merge moved off the base


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_layerwise_plan_keeps_its_merge_and_a_reuse_gives_the_same_output(
    tmp_path, tiny_pool, cache, method
):
    # the layerwise solves keep no statistic (RegMean reduces its Grams as they come, Fisher deletes its
    # running sums): the stored merge is the only record, and a reuse without it merged the candidates'
    # plain average
    e = tiny_pool["experts"]
    plan = tmp_path / "plan"
    recipe = write_recipe(
        tmp_path / "r.yml",
        method,
        tiny_pool["base"],
        [e["copy"], e["rev"]],
        {"calibration": str(tiny_pool["calib"]), "gradient": "layerwise", "plan": str(plan)},
        per_model=[{"task": "copy"}, {"task": "rev"}],
    )
    first = load_tensors(run(recipe, tmp_path / "first"))
    assert (plan / "merged" / "index.json").is_file()
    again = load_tensors(run(recipe, tmp_path / "again"))
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
