"""AdaMerging with `gradient: layerwise` (a meta skeleton, one merged layer at a time) learns the
coefficients of the in-RAM solve and gives its merge, holding one decoder layer at a time."""

import json

import pytest
import torch

from conftest import load_tensors, merge, save_random_loras
from fwllm.core.footprint import split_by_layer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_refs(tiny_pool, tmp_path_factory):
    return save_random_loras(tiny_pool["base"], tmp_path_factory.mktemp("ada_lora"), (4, 2), seed=30)


def both(tmp_path, pool, models, label, **params):
    outs = {}
    for mode in ("full", "layerwise"):
        p = {
            "calibration": str(pool["calib"]),
            "steps": 3,
            "lr": 0.05,
            "batch_size": 5,
            "gradient": mode,
            **params,
        }
        outs[mode] = merge(tmp_path, f"{label}_{mode}", "adamerging", pool, models, p)
    return outs


def plan_file(out, name):
    return json.loads((out / "fwllm_plan" / name).read_text())


def assert_same(outs):
    traces = {m: plan_file(o, "trace.json") for m, o in outs.items()}
    assert [traces[m]["gradient"]["mode"] for m in ("full", "layerwise")] == ["full", "layerwise"]
    assert traces["layerwise"]["entropy"] == pytest.approx(traces["full"]["entropy"], rel=1e-5)
    coefs = {m: plan_file(o, "coefficients.json")["coefficients"] for m, o in outs.items()}
    assert set(coefs["full"]) == set(coefs["layerwise"])
    for name, c in coefs["full"].items():
        assert coefs["layerwise"][name] == pytest.approx(c, rel=1e-5, abs=1e-6), name
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        assert torch.allclose(layer[name], full[name], rtol=1e-5, atol=1e-6), name
    return traces["layerwise"]["gradient"]


def test_full_checkpoint_pool_matches_the_in_ram_solve_one_layer_resident(tmp_path, tiny_pool):
    e = tiny_pool["experts"]
    stats = assert_same(both(tmp_path, tiny_pool, [e["copy"], e["rev"], e["noise"]], "full_pool"))
    # residency: the trainable outer tensors (embeddings, final norm, lm_head) stay for the evaluation,
    # the decoder layers come one at a time
    base = load_tensors(tiny_pool["base"])
    largest_layer, outer = split_by_layer({n: tuple(t.shape) for n, t in base.items()})
    assert largest_layer > 0 and stats["peak_resident_bytes"] <= 4 * (outer + largest_layer)
    assert stats["peak_resident_bytes"] < 4 * sum(t.numel() for t in base.values())
    assert stats["layer_fetches"] > 0


def test_lora_pool_matches_the_in_ram_solve(tmp_path, tiny_pool, lora_refs):
    assert_same(both(tmp_path, tiny_pool, lora_refs, "lora_pool"))


def test_a_lora_pool_merge_is_kept_as_factors_and_no_adapter_is_merged_into_a_model_copy(
    tmp_path, tiny_pool, lora_refs, monkeypatch
):
    from fwllm.methods.adamerging import AdaMerging
    from fwllm.io.merged_store import merged_factors

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    p = {"calibration": str(tiny_pool["calib"]), "steps": 2, "lr": 0.05, "gradient": "layerwise"}
    out = merge(tmp_path, "factors", "adamerging", tiny_pool, lora_refs, p)
    plan = AdaMerging().load_plan(str(out / "fwllm_plan"))
    assert not AdaMerging().needs_candidates(plan)  # mergekit runs on the base alone
    # mergekit's LoRA merge cache holds no model copy
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    # the stored factors give the plan's own coefficients: W_0 + sum_i lambda_i s_i B_i A_i
    coefficients = plan_file(out, "coefficients.json")["coefficients"]
    base, merged = load_tensors(tiny_pool["base"]), load_tensors(out)
    adapters = [load_tensors(r.split("+", 1)[1]) for r in lora_refs]
    changed = 0
    for name, lam in coefficients.items():
        want = base[name].double()
        key = "base_model.model." + name.removesuffix(".weight")
        for a, c in zip(adapters, lam):
            if f"{key}.lora_A.weight" in a:
                lora_a, lora_b = a[f"{key}.lora_A.weight"].double(), a[f"{key}.lora_B.weight"].double()
                want = want + c * (8 / lora_a.shape[0]) * lora_b @ lora_a  # lora_alpha 8
        changed += merged_factors(plan.merged, name) is not None
        got = merged[name]
        tol = 1e-5 if got.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert changed > 0


def test_auto_goes_layerwise_when_the_in_ram_solve_would_not_fit(tmp_path, tiny_pool, monkeypatch):
    import fwllm.methods.fw_merging as fw

    monkeypatch.setattr(fw, "available_memory", lambda: 1 << 20)  # 1 MiB free: the tiny model does not fit
    e = tiny_pool["experts"]
    out = merge(
        tmp_path,
        "auto",
        "adamerging",
        tiny_pool,
        [e["copy"], e["rev"]],
        {"calibration": str(tiny_pool["calib"]), "steps": 1},
    )
    gradient = plan_file(out, "trace.json")["gradient"]
    assert gradient["mode"] == "layerwise" and "would need" in gradient["reason"]


def test_tied_model_in_several_checkpoint_groups_matches_adamerge(tmp_path):
    """Direct solver check: tied embeddings (the LM head is the embedding matrix) and one micro-batch
    per checkpoint group (each layer's gradient arrives in parts that must add up)."""
    from conftest import perturbed_copies, task_rows, tiny_llama, tiny_tokenizer, write_jsonl
    from fwllm.arch.streaming import MetaModel, base_weights, skeleton
    from fwllm.core.params import AdaMergingParams
    from fwllm.data.calibration import load_calibration
    from fwllm.data.encoding import encode_task
    from fwllm.data.objective import Objective
    from fwllm.io.candidates import open_candidate
    from fwllm.io.models import load_model
    from fwllm.solvers.adamerging import adamerge
    from fwllm.solvers.streamed_adamerging import MergedPoint, streamed_adamerge

    tiny_llama(layers=2, tie=True).save_pretrained(tmp_path / "base")
    (tmp_path / "calib").mkdir()
    write_jsonl(tmp_path / "calib" / "copy.jsonl", task_rows("copy", 6, seed=5))
    models = perturbed_copies(tmp_path / "base", tmp_path, 2, 0.3, seed=3)
    cands = [open_candidate(str(m)) for m in models]
    p = AdaMergingParams(steps=2, lr=0.05, batch_size=2)
    task = load_calibration(str(tmp_path / "calib"))[0]

    model = load_model(str(tmp_path / "base"))
    names = [n for n, _ in model.named_parameters()]
    want = adamerge(
        model,
        [encode_task(task, tiny_tokenizer(), p.max_length, 2, "causal")],
        cands,
        names,
        p,
        progress=False,
    )

    sk = skeleton(str(tmp_path / "base"))
    assert [n for n, _ in sk.named_parameters()] == names and "lm_head.weight" not in names
    base = base_weights(str(tmp_path / "base"))
    meta = MetaModel(sk, base, trainable=names)
    objective = Objective([encode_task(task, tiny_tokenizer(), p.max_length, 2, "causal")])
    got = streamed_adamerge(
        meta, objective, MergedPoint(base, cands, names), names, p, progress=False, checkpoint_bytes=1
    )
    assert got.stats["checkpoint_groups"] == 3
    assert got.entropy == pytest.approx(want.entropy, rel=1e-5)
    for name in names:
        assert got.coefficients[name] == pytest.approx(want.coefficients[name], rel=1e-5, abs=1e-6), name
    assert len({round(c, 6) for cs in got.coefficients.values() for c in cs}) > 1  # the steps moved them
