"""peft adapters beyond plain LoRA, read as task vectors, checked against peft's own merge.

The truth for every variant is `PeftModel.from_pretrained(base, adapter).merge_and_unload()`:
fwllm never builds a peft model to read an adapter, so that is an independent computation of
the merged weights. Each adapter gets random non-zero factors (peft starts lora_B at zero and
the DoRA magnitude at the base's norms, which would make most variants look like the base).
"""

import json

import pytest
import torch
from click.testing import CliRunner
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from conftest import save_tiny_llama_base, task_rows, tiny_tokenizer, write_jsonl, write_recipe
from fwllm.cli import main
from fwllm.core.errors import FwllmError
from fwllm.core.job import CandidateSpec
from fwllm.io.adapters import AdapterReader
from fwllm.io.candidates import open_candidate
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.solvers.per_candidate import load_candidate_model

# name -> (base family, LoraConfig arguments). The tiny LLaMA's vocabulary (18) differs from
# its width (32), so an embedding factor applied the wrong way round cannot fit by accident.
VARIANTS = {
    "dora": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    ),
    "dora_rslora": (
        "llama",
        dict(r=4, lora_alpha=3, target_modules=["o_proj"], use_dora=True, use_rslora=True),
    ),
    "modules_to_save": (
        "llama",
        dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
    "embedding": ("llama", dict(r=2, lora_alpha=6, target_modules=["embed_tokens", "q_proj"])),
    "embedding_dora": (
        "llama",
        dict(r=2, lora_alpha=6, target_modules=["embed_tokens", "k_proj"], use_dora=True),
    ),
    # GPT-2's Conv1D weights are [in, out]; c_attn is [16, 48], attn.c_proj square [16, 16]
    "fan_in_fan_out": (
        "gpt2",
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "fan_in_fan_out_dora": (
        "gpt2",
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, use_dora=True),
    ),
}
# variants merged end to end on the LLaMA base; GPT-2's Conv1D (fan_in_fan_out) ones on the GPT-2 base
END_TO_END = ["dora", "modules_to_save", "embedding", "embedding_dora"]
CONV1D = ["fan_in_fan_out", "fan_in_fan_out_dora"]


def model_class(family):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    return LlamaForCausalLM if family == "llama" else GPT2LMHeadModel


def save_tiny_gpt2_base(root):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "calib").mkdir()
    return root / "base"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = {}
    for family, save in (("llama", save_tiny_llama_base), ("gpt2", save_tiny_gpt2_base)):
        root = tmp_path_factory.mktemp(family)
        out[family] = save(root)
        write_jsonl(root / "calib" / "copy.jsonl", task_rows("copy", 4, seed=1))
    return out


def save_random_adapter(base_dir, family, out_dir, seed=1, **lora_args):
    """A peft adapter over `base_dir` whose every trained tensor is moved off its initial value."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model_class(family).from_pretrained(base_dir), LoraConfig(lora_dropout=0.0, **lora_args)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if not prm.requires_grad:
                continue
            noise = torch.randn(prm.shape, generator=g)
            if "lora_magnitude_vector" in name:
                prm.mul_(1.0 + 0.3 * noise.tanh())  # magnitudes stay positive, but not the base's norms
            else:
                prm.add_(0.2 * noise)
    model.save_pretrained(out_dir)
    return out_dir


def peft_merged(base_dir, family, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model_class(family).from_pretrained(base_dir), str(adapter_dir))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """variant -> (base dir, family, adapter dir, peft's merged weights), built on first use."""
    root, built = tmp_path_factory.mktemp("adapters"), {}

    def get(variant):
        if variant not in built:
            family, args = VARIANTS[variant]
            adapter = save_random_adapter(bases[family], family, root / variant, **args)
            built[variant] = (bases[family], family, adapter, peft_merged(bases[family], family, adapter))
        return built[variant]

    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_task_vectors_equal_peft_merge_and_unload(adapters, variant):
    base_dir, _, adapter, truth = adapters(variant)
    base = load_file(base_dir / "model.safetensors")
    changed = {n for n, t in base.items() if not torch.equal(t, truth[n])}
    reader = AdapterReader(str(adapter))
    assert changed == set(reader.targets())  # the variant really moves what it claims to, and only that
    cand = open_candidate(str(base_dir), str(adapter))
    for name, theta0 in base.items():
        tau = cand.task_vector(name, theta0)
        assert torch.allclose(theta0 + tau, truth[name], atol=1e-5, rtol=1e-5), name
        # the LazyCandidates route (theta_i as mergekit would hand it) agrees
        assert torch.allclose(cand.tensor(name, theta0), truth[name], atol=1e-5, rtol=1e-5), name
    # a lazy reader (a plan's execution) keeps no tensor and gives peft's merge too, reading each target on demand
    lazy = AdapterReader(str(adapter), lazy=True)
    assert lazy.bytes_read == 0 and set(lazy.targets()) == changed
    for name, theta0 in base.items():
        d = lazy.delta(name, theta0)
        assert (d is None) == (name not in changed), name
        if d is not None:
            assert torch.allclose(theta0 + d, truth[name], atol=1e-5, rtol=1e-5), name
    assert lazy.bytes_read == reader.bytes_read  # each target read exactly once


def test_saved_embedding_base_layer_replaces_the_base(tmp_path, adapters):
    # peft saves embed_tokens.base_layer.weight with an embedding LoRA (e.g. after resizing or
    # training the vocabulary) and loads it over the base's before merging
    import shutil

    from safetensors.torch import save_file

    base_dir, family, adapter, unchanged = adapters("embedding")
    shutil.copytree(adapter, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    t = load_file(weights)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    t[key] = t[key] + torch.randn(t[key].shape, generator=torch.Generator().manual_seed(3))
    save_file(t, weights, metadata={"format": "pt"})
    truth = peft_merged(base_dir, family, tmp_path / "ad")
    name = "model.embed_tokens.weight"
    theta0 = load_file(base_dir / "model.safetensors")[name]
    tau = AdapterReader(str(tmp_path / "ad")).delta(name, theta0)
    assert not torch.allclose(truth[name], unchanged[name], atol=1e-3)  # peft did take the saved layer
    assert torch.allclose(theta0 + tau, truth[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "variants,gradient",
    [(END_TO_END, "full"), (CONV1D, "full"), (CONV1D, "layerwise")],
    ids=["llama", "gpt2_conv1d", "gpt2_conv1d_layerwise"],
)
def test_fw_merge_over_base_plus_adapters_uses_peft_task_vectors(tmp_path, adapters, variants, gradient):
    # FW over the adapters with plain task-arithmetic vertices: each tensor ends at
    # theta_0 + sum_i c_i tau_i with the coefficients the plan records (each c_i > 0 on its
    # targets, as the iterate starts at theta_0 + sum_i tau_i). fwllm reads the adapters with
    # its own reader; tau_i here is peft's merged model minus the base (GPT-2: Conv1D weights
    # [in, out], LoRA with fan_in_fan_out).
    pool = [adapters(v) for v in variants]
    base_dir = pool[0][0]
    params = {
        "calibration": str(base_dir.parent / "calib"),
        "preset": "paper",
        "iterations": 2,
        "scaling": 1.0,
        "step_size": 0.5,
        "init": "task_arithmetic",
        "gradient": gradient,
    }
    recipe = write_recipe(
        tmp_path / "r.yml", "fw_merging", base_dir, [f"{base_dir}+{a[2]}" for a in pool], params
    )
    out = tmp_path / "out"
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "lc")))
    coefficients = json.loads((out / "fwllm_plan" / "plan.json").read_text())["coefficients"]
    merged, base = load_file(out / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert merged.keys() == base.keys()
    for i, (_, _, adapter, _) in enumerate(pool):
        assert all(coefficients[n][i] > 0 for n in AdapterReader(str(adapter)).targets())
    for name, theta0 in base.items():
        c = coefficients.get(name, [0.0] * len(pool))
        expected = theta0 + sum(ci * (truth[name] - theta0) for ci, (_, _, _, truth) in zip(c, pool))
        assert torch.allclose(merged[name], expected, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("variant", END_TO_END + CONV1D)
def test_per_candidate_model_is_the_peft_merged_model(adapters, variant):
    # Fisher and RegMean measure each candidate on its own model: base weights plus fwllm's deltas
    base_dir, _, adapter, truth = adapters(variant)
    model = load_candidate_model(CandidateSpec("c", str(base_dir), str(adapter)), str(base_dir), "cpu")
    for name, prm in model.state_dict().items():
        assert torch.allclose(prm, truth[name], atol=1e-5, rtol=1e-5), name


def _one_error_line(result):
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _fw_merge_cli(tmp_path, base_dir, adapter):
    params = {"calibration": str(base_dir.parent / "calib"), "preset": "paper", "iterations": 1}
    recipe = write_recipe(tmp_path / "r.yml", "fw_merging", base_dir, [f"{base_dir}+{adapter}"], params)
    return CliRunner().invoke(
        main, ["merge", str(recipe), str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "lc")]
    )


def test_adapter_for_another_base_is_one_clear_error(tmp_path, bases):
    # trained on a 2-layer base, applied to a 1-layer one: model.layers.1.* does not exist there
    adapter = save_random_adapter(bases["llama"], "llama", tmp_path / "ad", r=2, target_modules=["q_proj"])
    (tmp_path / "small").mkdir()
    small = save_tiny_llama_base(tmp_path / "small", num_hidden_layers=1)
    write_jsonl(small.parent / "calib" / "copy.jsonl", task_rows("copy", 4, seed=1))
    names = load_file(small / "model.safetensors").keys()
    with pytest.raises(
        FwllmError, match=r"targets model\.layers\.1\.self_attn\.q_proj\.weight, which the base"
    ):
        AdapterReader(str(adapter)).check_targets(names, "small+ad")
    with pytest.raises(
        FwllmError, match=r"targets model\.layers\.1\.self_attn\.q_proj\.weight, which the base"
    ):
        load_candidate_model(CandidateSpec("small+ad", str(small), str(adapter)), str(small), "cpu")
    line = _one_error_line(_fw_merge_cli(tmp_path, small, adapter))
    assert "model.layers.1.self_attn.q_proj.weight" in line and "the base model does not have" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            dict(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}),
            "per-module rank/alpha patterns",
        ),
        (dict(r=2, target_modules=["q_proj"], alpha_pattern={"q_proj": 7}), "per-module rank/alpha patterns"),
        (dict(r=2, target_modules=["q_proj"], lora_bias=True), "trained biases (lora_bias)"),
    ],
)
def test_unsupported_adapters_are_one_clear_error(tmp_path, bases, args, message):
    adapter = save_random_adapter(bases["llama"], "llama", tmp_path / "ad", **args)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("lora_bias")
    )  # peft wrote what we test
    with pytest.raises(FwllmError, match="not supported"):
        AdapterReader(str(adapter))
    line = _one_error_line(_fw_merge_cli(tmp_path, bases["llama"], adapter))
    assert message in line and "not supported" in line
    assert not (tmp_path / "out").exists()
