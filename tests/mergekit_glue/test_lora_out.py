"""`fwllm merge --lora-out DIR`: the adapter, merged by peft, is the full model fwllm wrote."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import load_tensors, save_tiny_llama_base, task_rows, write_jsonl, write_recipe
from fwllm.cli import main


@pytest.fixture
def lora_pool(tmp_path, monkeypatch, one_thread):
    """A tiny LLaMA base, calibration rows and two random LoRA adapters of ranks 2 (q/v) and 3 (q/k/v/o)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = save_tiny_llama_base(tmp_path)
    write_jsonl(tmp_path / "calib" / "copy.jsonl", task_rows("copy", 8, seed=1))
    adapters = []
    shapes = ((2, ["q_proj", "v_proj"]), (3, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    for seed, (rank, targets) in enumerate(shapes):
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base), cfg)
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_" in name:
                    prm.copy_(0.2 * torch.randn_like(prm))
        model.save_pretrained(tmp_path / f"lora{seed}")
        adapters.append(tmp_path / f"lora{seed}")
    return tmp_path, base, adapters


def dora_adapter(root, base):
    """A rank-2 DoRA adapter on q/v (a magnitude vector per output feature: not W_0 + B A)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, use_dora=True)
    get_peft_model(LlamaForCausalLM.from_pretrained(base), cfg).save_pretrained(root / "dora")
    return root / "dora"


def fwllm(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


@pytest.mark.parametrize("gradient", ["full", "layerwise"])
def test_lora_out_equals_the_merged_model(lora_pool, gradient):
    """A full-gradient plan records no adapter folders (they come from the recipe); a layerwise one does."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base, adapters = lora_pool
    params = {
        "calibration": str(root / "calib"),
        "preset": "paper",
        "iterations": 3,
        "scaling": 1.0,
        "step_size": 0.5,
        "gradient": gradient,
    }
    recipe = write_recipe(root / "fw.yml", "fw_merging", base, [f"{base}+{a}" for a in adapters], params)
    result = fwllm(recipe, root / "out", "--lora-out", root / "lora_out")
    assert result.exit_code == 0, result.output
    assert "LoRA adapter written to" in result.output
    plan = json.loads((root / "out" / "fwllm_plan" / "plan.json").read_text())
    assert (plan["adapters"] is None) == (gradient == "full")
    assert plan["coefficients"] and any(c > 0 for cs in plan["coefficients"].values() for c in cs)
    full = load_tensors(root / "out")
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(root / "lora_out"))
    state = merged.merge_and_unload().state_dict()
    changed = 0
    for name, w in full.items():
        torch.testing.assert_close(state[name], w.float(), atol=1e-5, rtol=0)
        changed += name.endswith("q_proj.weight") and not torch.equal(w, load_tensors(base)[name])
    assert changed  # the merge moved the base: the comparison is not trivially base == base
    cfg = json.loads((root / "lora_out" / "adapter_config.json").read_text())
    assert max([cfg["r"], *cfg["rank_pattern"].values()]) <= 5


@pytest.mark.parametrize("method", ["regmean", "fw_merging", "adamerging"])
def test_a_closed_form_merge_of_a_lora_pool_is_written_as_its_exact_adapter(lora_pool, method):
    """RegMean over LoRA adapters, FW's default refine by RegMean, and layerwise AdaMerging are W_0 + B A
    with B A of rank sum r_i: the plan keeps the factors, and the adapter peft merges is the model
    fwllm wrote."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base, adapters = lora_pool
    params = {"calibration": str(root / "calib"), "gradient": "layerwise"}
    per_model = [{"task": "copy"}, {"task": "copy"}] if method == "regmean" else None
    if method == "fw_merging":
        params["iterations"] = 2  # the default settings otherwise: refine: regmean
    if method == "adamerging":
        params["steps"] = 2
    models = [f"{base}+{a}" for a in adapters]
    recipe = write_recipe(root / "r.yml", method, base, models, params, per_model=per_model)
    result = fwllm(recipe, root / "out", "--lora-out", root / "lora_out")
    assert result.exit_code == 0, result.output
    assert "max relative error 0" in result.output
    stored = sorted(p.name for p in (root / "out" / "fwllm_plan" / "merged").glob("*.safetensors"))
    assert stored  # the factors stay with the plan (they are the merge's only record)
    full = load_tensors(root / "out")
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(root / "lora_out"))
    state = merged.merge_and_unload().state_dict()
    base_tensors = load_tensors(base)
    changed = 0
    for name, w in full.items():
        torch.testing.assert_close(state[name], w.float(), atol=1e-5, rtol=0)
        changed += not torch.equal(w, base_tensors[name])
    assert changed
    cfg = json.loads((root / "lora_out" / "adapter_config.json").read_text())
    ranks = {cfg["r"], *cfg["rank_pattern"].values()}
    assert max(ranks) <= 5  # sum r_i: 2 + 3 on q/v, 3 on k/o


@pytest.mark.parametrize(
    "case", ["full model", "in-RAM regmean", "in-RAM refine", "in-RAM adamerging", "DoRA"]
)
def test_a_merge_that_is_not_low_rank_is_refused_before_anything_loads(lora_pool, case):
    root, base, adapters = lora_pool
    full = shutil.copytree(base, root / "full")
    models = [f"{base}+{adapters[0]}", full if case == "full model" else f"{base}+{adapters[1]}"]
    params = {"calibration": str(root / "calib"), "preset": "paper", "iterations": 3}
    method, per_model = "fw_merging", None
    if case == "in-RAM refine":  # the default refine, on the in-RAM path
        del params["preset"]
        params["gradient"] = "full"
    elif case == "in-RAM regmean":
        method, per_model = "regmean", [{"task": "copy"}, {"task": "copy"}]
        params = {"calibration": str(root / "calib"), "gradient": "auto"}
    elif case == "in-RAM adamerging":
        method, params = "adamerging", {"calibration": str(root / "calib"), "gradient": "full"}
    elif case == "DoRA":  # AdaMerging keeps a merge as LoRA factors only over plain LoRA adapters
        method, params = "adamerging", {"calibration": str(root / "calib"), "gradient": "layerwise"}
        models[1] = f"{base}+{dora_adapter(root, base)}"
    result = fwllm(
        write_recipe(root / "r.yml", method, base, models, params, per_model=per_model),
        root / "out",
        "--lora-out",
        root / "lora_out",
    )
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    want = {
        "full model": f"--lora-out needs a pool of LoRA adapters (BASE+ADAPTER); {full} is a full model",
        "in-RAM regmean": "--lora-out of regmean needs gradient: layerwise (got auto): that path keeps the merge "
        "as LoRA factors, the in-RAM one forms dense tensors",
        "in-RAM refine": "--lora-out of fw_merging with refine: regmean needs gradient: layerwise (got full): "
        "that path keeps the merge as LoRA factors, the in-RAM one forms dense tensors",
        "in-RAM adamerging": "--lora-out of adamerging needs gradient: layerwise (got full): that path keeps "
        "the merge as LoRA factors, the in-RAM one forms dense tensors",
        "DoRA": "--lora-out of adamerging needs plain LoRA adapters (no DoRA, modules_to_save or "
        "fan_in_fan_out): only then is its merge kept as LoRA factors",
    }[case]
    assert lines == [f"Error: {want}"]
    assert not (root / "out").exists() and not (root / "lora_out").exists()


@pytest.mark.parametrize("method", ["fw_merging", "regmean"])
def test_the_adapter_takes_the_dense_outputs_dtype(lora_pool, method):
    """A bfloat16 recipe writes bfloat16 factors (half the bytes of float32 ones): peft's merge of them
    is the bfloat16 model fwllm wrote, to bfloat16's rounding."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    root, base, adapters = lora_pool
    params = {"calibration": str(root / "calib"), "preset": "paper", "iterations": 2, "scaling": 1.0}
    per_model = None
    if method == "regmean":  # the plan stores the merge as factors (float32): written in the output's dtype
        params, per_model = (
            {"calibration": str(root / "calib"), "gradient": "layerwise"},
            [{"task": "copy"}] * 2,
        )
    models = [f"{base}+{a}" for a in adapters]
    recipe = write_recipe(root / "r.yml", method, base, models, params, dtype="bfloat16", per_model=per_model)
    result = fwllm(recipe, root / "out", "--lora-out", root / "lora_out")
    assert result.exit_code == 0, result.output
    with safe_open(str(root / "lora_out" / "adapter_model.safetensors"), "pt") as fp:
        assert {fp.get_tensor(k).dtype for k in fp.keys()} == {torch.bfloat16}
    full = load_tensors(root / "out")
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    state = PeftModel.from_pretrained(model, str(root / "lora_out")).merge_and_unload().state_dict()
    moved = 0
    for name, w in full.items():
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(state[name], w, atol=2e-3, rtol=1.6e-2)  # a few bf16 ulps
        moved += name.endswith("q_proj.weight") and not torch.equal(w, load_tensors(base)[name].bfloat16())
    assert moved


def test_the_recipe_can_ask_for_the_lora_output(lora_pool, monkeypatch):
    """`lora_out:` / `lora_rank:` in the recipe do what --lora-out / --lora-rank do under `fwllm merge`;
    plain mergekit-yaml, which has no step after its merge, refuses them instead of dropping them."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from fwllm.mergekit_glue.adapter import forget_plans, register_all

    root, base, adapters = lora_pool
    params = {"calibration": str(root / "calib"), "preset": "paper", "iterations": 2, "scaling": 1.0}
    models = [f"{base}+{a}" for a in adapters]
    asked = dict(params, lora_out=str(root / "from_recipe"), lora_rank=2)
    recipe = write_recipe(root / "r.yml", "fw_merging", base, models, asked)
    result = fwllm(recipe, root / "out")
    assert result.exit_code == 0, result.output
    cfg = json.loads((root / "from_recipe" / "adapter_config.json").read_text())
    assert {cfg["r"], *cfg["rank_pattern"].values()} == {2}  # truncated to the recipe's rank
    flagged = write_recipe(root / "f.yml", "fw_merging", base, models, params)
    result = fwllm(flagged, root / "out2", "--lora-out", root / "from_flag", "--lora-rank", 2)
    assert result.exit_code == 0, result.output
    a, b = load_tensors(root / "from_recipe"), load_tensors(root / "from_flag")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    register_all()
    forget_plans()
    text = (root / "r.yml").read_text()
    with pytest.raises(Exception, match="lora_out: .* is written by `fwllm merge RECIPE OUT_DIR`"):
        run_merge(
            MergeConfiguration.model_validate(__import__("yaml").safe_load(text)),
            str(root / "plain"),
            options=MergeOptions(quiet=True, lora_merge_cache=str(root / "lora_cache")),
            config_source=text,
        )
