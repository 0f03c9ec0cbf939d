"""LoRA pools are merged in weight space: Delta W = B A * alpha / r (alpha / sqrt(r) for rsLoRA)."""

import json
import math

import pytest
import torch
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from conftest import finetune, task_rows, tiny_tokenizer, write_recipe
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.io.adapters import AdapterReader

TARGET = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def adapters(tiny_pool, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root, out = tmp_path_factory.mktemp("lora"), {}
    for name, task, rank, alpha, rs in (("copy", "copy", 4, 8, False), ("rev", "rev", 2, 16, True)):
        torch.manual_seed(3)
        model = LlamaForCausalLM.from_pretrained(tiny_pool["base"])
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=rs, lora_dropout=0.0)
        peft_model = get_peft_model(model, cfg)
        finetune(peft_model, tiny_tokenizer(), task_rows(task, 32, seed=5), steps=15, lr=1e-2)
        peft_model.save_pretrained(root / name)
        out[name] = (root / name, rank, alpha, rs)
    return out


def by_hand(adapter_dir, rank, alpha, rs):
    t = load_file(adapter_dir / "adapter_model.safetensors")
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    return b @ a * (alpha / (math.sqrt(rank) if rs else rank))


def test_adapter_delta_matches_hand_computation(adapters):
    for adapter_dir, rank, alpha, rs in adapters.values():
        delta = AdapterReader(str(adapter_dir)).delta(TARGET, torch.zeros(32, 32))
        assert torch.allclose(delta, by_hand(adapter_dir, rank, alpha, rs), atol=1e-7)
        assert delta.abs().sum() > 0


@pytest.mark.parametrize("gradient", ["full", "layerwise"])
def test_fw_over_a_lora_pool_merges_in_weight_space(tmp_path, tiny_pool, adapters, gradient):
    base = tiny_pool["base"]
    models = [f"{base}+{a[0]}" for a in adapters.values()]
    recipe = write_recipe(tmp_path / "lora.yml", "fw_merging", base, models,
                          {"calibration": str(tiny_pool["calib"]), "iterations": 4, "scaling": 1.0, "step_size": 0.5,
                           "gradient": gradient})
    out = tmp_path / "merged"
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "lc")))
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    coef = plan["coefficients"][TARGET]
    expected = load_file(base / "model.safetensors")[TARGET] + sum(
        c * by_hand(*a) for c, a in zip(coef, adapters.values()))
    merged = load_file(out / "model.safetensors")[TARGET]
    assert any(c > 0 for c in coef)
    assert torch.allclose(merged, expected, atol=1e-5)
    # tensors no adapter touches stay exactly the base's
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(load_file(out / "model.safetensors")[untouched], load_file(base / "model.safetensors")[untouched])
