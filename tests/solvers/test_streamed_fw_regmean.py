"""FW's RegMean step (`refine: regmean`) on the bounded path: the Grams are measured one layer at a
time and reduced as they come, and the merge equals the in-RAM refine's (`gradient: full`, which
reads each candidate whole and keeps its Grams in the stats cache)."""

import json

import pytest
import torch

from conftest import load_tensors, merge, save_random_loras
from fwllm.kernels import regmean_reduced

TASKS = [{"task": "copy"}, {"task": "rev"}, {}]  # the third candidate has no task: all rows


@pytest.fixture(scope="module")
def lora_adapters(tiny_pool, tmp_path_factory):
    return save_random_loras(
        tiny_pool["base"],
        tmp_path_factory.mktemp("fw_regmean_lora"),
        (4, 2, 3),
        seed=40,
        targets=("q_proj", "v_proj", "down_proj"),
    )


def grams_in(cache):
    return (
        sorted(p.name for p in (cache / "stats").rglob("*.safetensors")) if (cache / "stats").exists() else []
    )


def solve_both(tmp_path, pool, models, label, monkeypatch, **params):
    outs, caches = {}, {}
    for mode in ("layerwise", "full"):
        caches[mode] = tmp_path / f"cache_{label}_{mode}"
        monkeypatch.setenv("FWLLM_CACHE", str(caches[mode]))
        p = {"calibration": str(pool["calib"]), "iterations": 3, "batch_size": 4, "gradient": mode, **params}
        outs[mode] = merge(tmp_path, f"{label}_{mode}", "fw_merging", pool, models, p, per_model=TASKS)
    plans = {m: json.loads((o / "fwllm_plan" / "plan.json").read_text()) for m, o in outs.items()}
    return outs, caches, plans


LORA_PER_TENSOR = {
    "init": "task_arithmetic",
    "granularity": "tensor",
    "regmean_weights": "fw",
    "step": "open_loop",
    "step_size": 0.5,
}


@pytest.mark.parametrize(
    "kind, params, row_fraction",
    [
        ("full", {}, None),  # the defaults: support for the whole model, RegMean's equal weights
        ("full", {"granularity": "tensor", "regmean_weights": "fw"}, None),  # per-tensor support and weights
        # random adapters do not help: from the base FW would stay there; from task arithmetic every one is used
        ("lora", {"init": "task_arithmetic"}, None),
        # open-loop steps keep every candidate, each tensor with its own weights (q and v: one Gram, two sums)
        ("lora", LORA_PER_TENSOR, None),
        # the same from activation rows instead of Grams (Woodbury; these tiny layers would take Grams)
        ("full", {}, 100.0),
        ("lora", LORA_PER_TENSOR, 100.0),
    ],
)
def test_layerwise_refine_equals_the_in_ram_refine_and_keeps_no_gram(
    tmp_path, tiny_pool, lora_adapters, monkeypatch, kind, params, row_fraction
):
    if row_fraction is not None:
        monkeypatch.setattr(regmean_reduced, "ROW_FRACTION", row_fraction)
    e = tiny_pool["experts"]
    models = [e["copy"], e["rev"], e["noise"]] if kind == "full" else lora_adapters
    outs, caches, plans = solve_both(
        tmp_path, tiny_pool, models, f"{kind}_{len(params)}_{row_fraction}", monkeypatch, **params
    )
    assert plans["layerwise"]["settings"]["refine"] == "regmean"
    assert plans["layerwise"]["gradient"]["refine"] == "streamed grams"
    assert plans["full"]["gradient"]["refine"] == "gram files"
    # FW itself solved the same problem both ways: the same support
    assert plans["full"]["atoms"].keys() == plans["layerwise"]["atoms"].keys()
    for name, atoms in plans["full"]["atoms"].items():
        other = plans["layerwise"]["atoms"][name]
        assert [(a["members"], a["tag"]) for a in atoms] == [(a["members"], a["tag"]) for a in other], name
    full, layer, base = (
        load_tensors(outs["full"]),
        load_tensors(outs["layerwise"]),
        load_tensors(tiny_pool["base"]),
    )
    assert set(full) == set(layer)
    for name in full:
        torch.testing.assert_close(layer[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [n for n in full if n.endswith("proj.weight") and not torch.allclose(full[n], base[n])]
    assert len(moved) >= (8 if kind == "full" else 4)  # the refine merged something: not base == base
    # the in-RAM refine keeps one Gram file per candidate in the stats cache; the bounded one none
    assert grams_in(caches["full"]) and not grams_in(caches["layerwise"])
    assert not (outs["layerwise"] / "fwllm_plan" / "gram").exists()


def test_layerwise_refine_runs_only_the_candidates_fw_chose(tmp_path, tiny_pool, monkeypatch):
    """Under `granularity: model` FW's support is one set of candidates; the streamed refine
    measures those alone (a candidate FW left out is never run)."""
    from fwllm.solvers import streamed_grams

    runs = []
    original = streamed_grams.StreamedRegMean._capture
    monkeypatch.setattr(
        streamed_grams.StreamedRegMean,
        "_capture",
        lambda self, run: (runs.append(run.cand.label), original(self, run))[1],
    )
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    e = tiny_pool["experts"]
    out = merge(
        tmp_path,
        "support",
        "fw_merging",
        tiny_pool,
        [e["copy"], e["rev"], e["noise"]],
        {"calibration": str(tiny_pool["calib"]), "iterations": 1, "batch_size": 4, "gradient": "layerwise"},
        per_model=TASKS,
    )
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    chosen = {plan["candidates"][i] for atoms in plan["atoms"].values() for a in atoms for i in a["members"]}
    assert (
        runs and set(runs) == chosen and len(runs) == len(chosen)
    )  # one iteration from the base: one vertex
