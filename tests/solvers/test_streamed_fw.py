"""The bounded solve (`gradient: layerwise`: a meta skeleton, one layer at a time, the iterate
implicit or on disk) gives the merge of the in-RAM solve, and holds one layer at a time."""

import json
import os
import shutil

import pytest
import torch

from conftest import (
    load_tensors,
    merge,
    perturbed_copies,
    save_tiny_llama_base,
    task_rows,
    tiny_tokenizer,
    two_head_encoder_pool,
    write_jsonl,
)
from fwllm.core.errors import FwllmError


def both(tmp_path, pool, models, label, per_model=None, **params):
    """The same FW recipe solved in RAM (`full`) and bounded (`layerwise`): both outputs, both plans."""
    outs = {}
    for mode in ("full", "layerwise"):
        p = {
            "calibration": str(pool["calib"]),
            "preset": "paper",
            "iterations": 3,
            "step_size": 0.5,
            "scaling": 1.0,
            "gradient": mode,
            **params,
        }
        outs[mode] = merge(tmp_path, f"{label}_{mode}", "fw_merging", pool, models, p, per_model=per_model)
    plans = {m: json.loads((o / "fwllm_plan" / "plan.json").read_text()) for m, o in outs.items()}
    traces = {m: json.loads((o / "fwllm_plan" / "trace.json").read_text())["trace"] for m, o in outs.items()}
    return outs, plans, traces


def assert_same_merge(outs, traces, atol=1e-5):
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        assert torch.allclose(full[name], layer[name], atol=atol, rtol=1e-5), name
    assert [t["chosen"] for t in traces["full"]] == [t["chosen"] for t in traces["layerwise"]]
    assert [t["objective"] for t in traces["full"]] == pytest.approx(
        [t["objective"] for t in traces["layerwise"]], rel=1e-5
    )


@pytest.mark.parametrize("local_merge", ["ties", "dare_linear"])
def test_full_checkpoint_pool_ties_and_dare_match_the_in_ram_solve(tmp_path, tiny_pool, local_merge):
    e = tiny_pool["experts"]
    outs, plans, traces = both(
        tmp_path,
        tiny_pool,
        [e["copy"], e["rev"]],
        local_merge,
        local_merge=local_merge,
        density=0.5,
        drop_rate=0.3,
    )
    assert plans["layerwise"]["gradient"]["iterate"] == "on-disk store"
    assert not (outs["layerwise"] / "fwllm_plan" / ".iterate").exists()  # the scratch store is gone
    assert_same_merge(outs, traces)


@pytest.fixture(scope="module")
def lora_pool(tiny_pool, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root, refs = tmp_path_factory.mktemp("streamed_lora"), []
    for i, (rank, rs) in enumerate(((4, False), (2, True), (3, False))):
        torch.manual_seed(20 + i)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(tiny_pool["base"]),
            LoraConfig(
                r=rank,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"],
                use_rslora=rs,
                lora_dropout=0.0,
            ),
        )
        with torch.no_grad():
            for n, prm in model.named_parameters():
                if "lora_B" in n:
                    prm.normal_(0, 0.3)  # peft starts B at zero: make every adapter change its layers
        model.save_pretrained(root / f"a{i}")
        refs.append(f"{tiny_pool['base']}+{root / f'a{i}'}")
    return refs


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_lora_pool_implicit_iterate_matches_the_in_ram_solve(tmp_path, tiny_pool, lora_pool, variant):
    outs, plans, traces = both(
        tmp_path,
        tiny_pool,
        lora_pool,
        f"lora_{variant}",
        variant=variant,
        top_k=2,
        scaling=0.5,
        per_model=[{"weight": 1.0}, {"weight": 0.5}, {"weight": 1.0}],
    )
    gradient = plans["layerwise"]["gradient"]
    assert gradient["iterate"] == "lora coefficients" and gradient["lora_factor_bytes"] > 0
    # no merged tensor was stored: the output was formed from the adapters' factors and the coefficients
    assert not (outs["layerwise"] / "fwllm_plan" / "merged").exists()
    coefficients = {m: plans[m]["coefficients"] for m in plans}
    assert set(coefficients["full"]) == set(coefficients["layerwise"])
    for name, c in coefficients["full"].items():
        assert coefficients["layerwise"][name] == pytest.approx(c, rel=1e-4, abs=1e-6), name
    assert_same_merge(outs, traces)


def test_lora_pool_with_ties_runs_on_the_store_and_matches(tmp_path, tiny_pool, lora_pool):
    outs, plans, traces = both(
        tmp_path, tiny_pool, lora_pool[:2], "lora_ties", local_merge="ties", density=0.5
    )
    assert plans["layerwise"]["gradient"]["iterate"] == "on-disk store"
    assert_same_merge(outs, traces)


@pytest.mark.parametrize("pool_kind", ["full", "lora_store", "lora_implicit"])
def test_init_base_starts_the_bounded_solve_at_the_base(tmp_path, tiny_pool, lora_pool, pool_kind):
    """Regression: `init: base` left the on-disk iterate store empty (KeyError on its first read)."""
    e = tiny_pool["experts"]
    models = [e["copy"], e["rev"]] if pool_kind == "full" else lora_pool[:2]
    extra = {"local_merge": "ties", "density": 0.5} if pool_kind == "lora_store" else {}
    outs, plans, traces = both(tmp_path, tiny_pool, models, f"init_base_{pool_kind}", init="base", **extra)
    if pool_kind != "lora_implicit":
        assert plans["layerwise"]["gradient"]["iterate"] == "on-disk store"
    assert_same_merge(outs, traces)
    # the start is theta_0: FW's first objective is the base model's, which task arithmetic's start is not
    ta, _, ta_traces = both(tmp_path, tiny_pool, models, f"init_ta_{pool_kind}", iterations=1, **extra)
    first = ta_traces["layerwise"][0]["objective"]
    assert traces["layerwise"][0]["objective"] != pytest.approx(first, rel=1e-4)


def test_encoder_pool_matches_the_in_ram_solve(tmp_path):
    experts = two_head_encoder_pool(tmp_path, body_noise=0.3)
    pool = {"base": tmp_path / "base", "calib": tmp_path / "calib"}
    outs, _, traces = both(tmp_path, pool, experts, "enc", per_model=[{"task": "two"}, {"task": "three"}])
    assert_same_merge(outs, traces)


def test_sketches_kept_on_disk_give_the_same_merge(tmp_path):
    base = save_tiny_llama_base(tmp_path, intermediate_size=512)  # MLP weights of 16384 entries: sketched
    write_jsonl(tmp_path / "calib" / "copy.jsonl", task_rows("copy", 8, seed=1))
    pool = {"base": base, "calib": tmp_path / "calib"}
    models = perturbed_copies(base, tmp_path, 2, scale=0.05, seed=7)
    params = {"calibration": str(pool["calib"]), "preset": "paper", "iterations": 2, "gradient": "layerwise"}
    ram = merge(tmp_path, "ram", "fw_merging", pool, models, params)
    disk = merge(tmp_path, "disk", "fw_merging", pool, models, {**params, "sketch_memory": 1e-9})
    a, b = load_tensors(ram), load_tensors(disk)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not (disk / "fwllm_plan" / ".sketches").exists()


@pytest.mark.parametrize("layers", [2, 4])
def test_one_layer_at_a_time_whatever_the_depth(tmp_path, layers):
    from transformers import LlamaForCausalLM

    base = save_tiny_llama_base(tmp_path, num_hidden_layers=layers)
    write_jsonl(tmp_path / "calib" / "copy.jsonl", task_rows("copy", 6, seed=1))
    models = perturbed_copies(base, tmp_path, 2, scale=0.05, seed=3)
    out = merge(
        tmp_path,
        "m",
        "fw_merging",
        {"base": base},
        models,
        {"calibration": str(tmp_path / "calib"), "preset": "paper", "iterations": 2, "gradient": "layerwise"},
    )
    gradient = json.loads((out / "fwllm_plan" / "plan.json").read_text())["gradient"]
    model = LlamaForCausalLM.from_pretrained(base)
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    outer = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    # every block is trainable here, so the modules around the stack stay; the stack comes one layer at a time
    assert gradient["peak_resident_bytes"] == outer + layer
    assert gradient["layer_fetches"] > 0


def test_bad_inputs_of_the_bounded_path(tmp_path, tiny_pool, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    e = tiny_pool["experts"]
    # an adapter trained on a base whose MLP is wider: the same tensor names, other shapes
    (tmp_path / "wide_root").mkdir()
    wide = save_tiny_llama_base(tmp_path / "wide_root", intermediate_size=96)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(wide), LoraConfig(r=2, target_modules=["down_proj"])
    )
    peft_model.save_pretrained(tmp_path / "wide_adapter")
    with pytest.raises(FwllmError, match="the adapter's model.layers.0.mlp.down_proj.weight is"):
        merge(
            tmp_path,
            "wide",
            "fw_merging",
            tiny_pool,
            [f"{tiny_pool['base']}+{tmp_path / 'wide_adapter'}"],
            {"calibration": str(tiny_pool["calib"]), "gradient": "layerwise"},
        )

    # a sharded base whose index names a shard that is not there
    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(tiny_pool["base"]).save_pretrained(sharded, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(sharded)
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(sharded / shards[-1])
    with pytest.raises(FwllmError, match="the shard index names .*, which is missing"):
        merge(
            tmp_path,
            "sh",
            "fw_merging",
            {"base": sharded},
            [e["copy"]],
            {"calibration": str(tiny_pool["calib"]), "gradient": "layerwise"},
        )

    # too little disk for the iterate store: checked before anything is written
    import fwllm.io.iterate_store as store

    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1024))
    with pytest.raises(FwllmError, match=r"the iterate store needs .* MiB of free disk .* only 0 MiB"):
        merge(
            tmp_path,
            "disk",
            "fw_merging",
            tiny_pool,
            [e["copy"]],
            {"calibration": str(tiny_pool["calib"]), "gradient": "layerwise"},
        )
    for name in ("wide", "sh", "disk"):
        assert not (tmp_path / name).exists()  # nothing that looks finished


@pytest.mark.parametrize("pool_kind", ["full", "lora_implicit"])
def test_adaptive_steps_match_the_in_ram_solve(tmp_path, tiny_pool, lora_pool, pool_kind):
    """The default preset's FW with `step: adaptive` (exact scores: a LoRA pool's from its factors,
    whatever the sketch ratio; a full pool's with sketch_ratio 1): the same steps and merge bounded
    and in RAM, and no line-search evaluation."""
    e = tiny_pool["experts"]
    models = [e["copy"], e["rev"]] if pool_kind == "full" else lora_pool[:2]
    outs, plans, traces = both(
        tmp_path,
        tiny_pool,
        models,
        f"adaptive_{pool_kind}",
        preset="default",
        step="adaptive",
        refine="none",
        iterations=4,
        sketch_ratio=1 if pool_kind == "full" else 32,
    )
    assert_same_merge(outs, traces)
    for mode, trace in traces.items():
        assert not any("line_search" in step for step in trace), mode
        assert any(step["gamma"] > 0 for step in trace), mode
    assert [t["gamma"] for t in traces["full"]] == pytest.approx(
        [t["gamma"] for t in traces["layerwise"]], rel=1e-4
    )


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_adaptive_step_on_adapters_of_different_modules(tmp_path, tiny_pool, mode):
    """One adapter on q_proj only, one on q_proj and a wide gate_proj (8192 entries: sketched into
    4096 buckets for the candidate that leaves it at zero). The zero row is not an estimate, so the
    step stays adaptive; the first move's |d|^2 must be that of the chosen adapter's own delta
    (peft's merge_and_unload), over every weight it changes."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from conftest import save_random_loras

    base = save_tiny_llama_base(tmp_path / "wide", intermediate_size=256)
    refs = save_random_loras(base, tmp_path / "ad0", [2], seed=9, targets=("q_proj",))
    refs += save_random_loras(base, tmp_path / "ad1", [3], seed=10, targets=("q_proj", "gate_proj"))
    pool = {"base": base, "calib": tiny_pool["calib"]}
    p = {
        "calibration": str(tiny_pool["calib"]),
        "preset": "default",
        "refine": "none",
        "init": "base",
        "scaling": 1.0,
        "iterations": 3,
        "gradient": mode,
    }
    out = merge(tmp_path, f"mixed_{mode}", "fw_merging", pool, refs, p)
    trace = json.loads((out / "fwllm_plan" / "trace.json").read_text())["trace"]
    assert not any("line_search" in step for step in trace)
    first = trace[0]
    chosen = {tuple(c) for c in first["chosen"].values() if c}
    assert len(chosen) == 1
    (members,) = chosen
    assert len(members) == 1
    ref = refs[members[0]]
    base_sd = LlamaForCausalLM.from_pretrained(base).state_dict()
    base_path, adapter = ref.split("+")
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_path), adapter
    ).merge_and_unload()
    delta_sq = sum(
        float((w.double() - base_sd[n].double()).square().sum()) for n, w in merged.state_dict().items()
    )
    gamma_most = first["scaling"]  # from the base, the whole move is lambda * tau
    assert first["length_sq"] == pytest.approx(gamma_most**2 * delta_sq, rel=1e-5)
