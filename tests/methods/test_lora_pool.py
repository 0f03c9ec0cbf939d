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
        cfg = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], use_rslora=rs, lora_dropout=0.0
        )
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


def fw_over_adapters(root, tiny_pool, adapters, name, **params):
    """`fw_merging` over BASE+ADAPTER references to the two adapters; returns the output folder."""
    base = tiny_pool["base"]
    models = [f"{base}+{a[0]}" for a in adapters.values()]
    recipe = write_recipe(
        root / f"{name}.yml",
        "fw_merging",
        base,
        models,
        {
            "calibration": str(tiny_pool["calib"]),
            "preset": "paper",
            "iterations": 4,
            "scaling": 1.0,
            "step_size": 0.5,
            **params,
        },
    )
    out = root / name
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True, lora_merge_cache=str(root / "lc")))
    return out


def plan_and_trace(out):
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    return plan, json.loads((out / "fwllm_plan" / "trace.json").read_text())["trace"]


def objective_of(model_dir, data_dir):
    from fwllm.data.calibration import load_calibration
    from fwllm.data.objective import encode_tasks
    from fwllm.io.models import load_model, load_tokenizer

    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    return encode_tasks(load_calibration(str(data_dir)), tok, model).value(model)


@pytest.fixture(scope="module")
def by_gradient(tiny_pool, adapters, tmp_path_factory):
    """The same FW merge of the LoRA pool with the full and with the layer-by-layer gradient."""
    root = tmp_path_factory.mktemp("lora_fw")
    return {g: fw_over_adapters(root, tiny_pool, adapters, g, gradient=g) for g in ("full", "layerwise")}


@pytest.mark.parametrize("gradient", ["full", "layerwise"])
def test_fw_over_a_lora_pool_merges_in_weight_space(tiny_pool, adapters, by_gradient, gradient):
    base, out = tiny_pool["base"], by_gradient[gradient]
    plan, _ = plan_and_trace(out)
    coef = plan["coefficients"][TARGET]
    expected = load_file(base / "model.safetensors")[TARGET] + sum(
        c * by_hand(*a) for c, a in zip(coef, adapters.values())
    )
    merged = load_file(out / "model.safetensors")[TARGET]
    assert any(c > 0 for c in coef)
    assert torch.allclose(merged, expected, atol=1e-5)
    # tensors no adapter touches stay exactly the base's
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(
        load_file(out / "model.safetensors")[untouched], load_file(base / "model.safetensors")[untouched]
    )


def test_layerwise_and_full_gradients_make_the_same_merge(by_gradient):
    # the layer-by-layer gradient is the full one computed in pieces: same LMO choices in every
    # block and iteration, same objectives and tensors up to float32 summation order
    (full_plan, full_trace), (layer_plan, layer_trace) = (
        plan_and_trace(by_gradient[g]) for g in ("full", "layerwise")
    )
    assert [s["chosen"] for s in full_trace] == [s["chosen"] for s in layer_trace]
    assert [s["objective"] for s in full_trace] == pytest.approx(
        [s["objective"] for s in layer_trace], rel=1e-5
    )
    assert full_plan["selected_iteration"] == layer_plan["selected_iteration"]
    assert full_plan["gradient"]["mode"] == "full" and layer_plan["gradient"]["mode"] == "layerwise"
    a, b = (load_file(by_gradient[g] / "model.safetensors") for g in ("full", "layerwise"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_model_granularity_on_a_lora_pool(tmp_path, tiny_pool, adapters, variant):
    # LoRA task vectors are zero outside q_proj/v_proj: one LMO and one mix for the whole model
    # must stay defined (finite, on the simplex) in the blocks no adapter touches
    out = fw_over_adapters(
        tmp_path, tiny_pool, adapters, variant, granularity="model", variant=variant, top_k=2, iterations=3
    )
    plan, trace = plan_and_trace(out)
    assert all(math.isfinite(step["objective"]) for step in trace)
    for step in trace:
        assert len({tuple(c) for c in step["chosen"].values()}) == 1  # one vertex set for the model
        mixes = list(step["mix"].values())
        if not mixes:
            continue  # the base vertex won this step
        assert len(mixes) == len(step["chosen"]) and all(m == mixes[0] for m in mixes)
        assert min(mixes[0]) >= 0 and abs(sum(mixes[0]) - 1) < 1e-6
    sizes = [len(next(iter(step["mix"].values()), [])) for step in trace]
    assert max(sizes) == (2 if variant == "soft" else 1)  # some step left the base, soft mixing two
    # one point of the hull for the whole model: the same coefficients on every tensor
    coefs = list(plan["coefficients"].values())
    assert all(c == pytest.approx(coefs[0], abs=1e-12) for c in coefs)
    base, merged = load_file(tiny_pool["base"] / "model.safetensors"), load_file(out / "model.safetensors")
    expected = base[TARGET] + sum(c * by_hand(*a) for c, a in zip(coefs[0], adapters.values()))
    assert torch.allclose(merged[TARGET], expected, atol=1e-5)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert plan["objective"]["final"] == pytest.approx(objective_of(out, tiny_pool["calib"]), rel=1e-5)


def test_a_reused_lora_plan_reads_the_recipes_adapters_not_the_folders_it_names(
    tmp_path, tiny_pool, adapters
):
    """A LoRA plan forms its tensors from adapter factors. Reused (`plan:`), it reads the adapters the
    recipe names, never the folders written in plan.json (a plan must not pull in other files)."""
    import shutil

    from safetensors.torch import save_file

    plan = tmp_path / "plan"
    out = fw_over_adapters(tmp_path, tiny_pool, adapters, "a", gradient="layerwise", plan=str(plan))
    record = json.loads((plan / "plan.json").read_text())
    assert record["adapters"]  # the plan forms tensors from adapters
    elsewhere = []
    for i, folder in enumerate(record["adapters"]):  # other adapters, with other factors, outside the recipe
        other = tmp_path / f"other{i}"
        shutil.copytree(folder, other)
        path = other / "adapter_model.safetensors"
        save_file({k: v * 3 for k, v in load_file(path).items()}, path)
        elsewhere.append(str(other))
    record["adapters"] = elsewhere
    (plan / "plan.json").write_text(json.dumps(record))
    again = fw_over_adapters(tmp_path, tiny_pool, adapters, "b", gradient="layerwise", plan=str(plan))
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
