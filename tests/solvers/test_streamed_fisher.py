"""Fisher merging with `gradient: layerwise`: the per-example diagonal Fisher computed one decoder
layer at a time equals the in-RAM one of `fwllm.solvers.fisher` on the whole model (exact top_k and
empirical, tied embeddings, LoRA candidates, several checkpoint groups), one layer is resident at a
time, and the merge through `merge_recipe` equals the in-RAM merge."""

import json

import pytest
import torch

from conftest import (
    load_tensors,
    merge,
    save_random_loras,
    task_rows,
    tiny_llama,
    tiny_tokenizer,
    write_jsonl,
)
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.core.footprint import split_by_layer
from fwllm.core.params import FisherParams
from fwllm.data.calibration import load_calibration
from fwllm.data.encoding import encode_task
from fwllm.data.objective import Objective
from fwllm.io.candidates import open_candidate
from fwllm.io.models import load_model
from fwllm.solvers.fisher import candidate_fisher
from fwllm.solvers.streamed_fisher import CandidateWeights, StreamedFisher

pytestmark = pytest.mark.usefixtures("one_thread")


def streamed(model_dir, task, p, weights=None, checkpoint_bytes=1 << 30):
    """The streamed Fisher of one candidate, summed into RAM by the test: (Fisher, examples, meta)."""
    model = skeleton(str(model_dir))
    names = [n for n, q in model.named_parameters()]
    weights = weights if weights is not None else base_weights(str(model_dir))
    meta = MetaModel(model, weights, trainable=names)
    encoded = encode_task(task, tiny_tokenizer(), p.max_length, batch_size=1, model_kind="causal")
    objective = Objective([encoded])
    acc = {}

    def add(name, x):
        acc[name] = acc[name] + x if name in acc else x.clone()

    examples, _ = StreamedFisher(meta, objective, p, names, checkpoint_bytes=checkpoint_bytes).measure(add)
    return {n: a / examples for n, a in acc.items()}, examples, meta


def assert_same_fisher(got, want):
    assert set(got) == set(want)
    for name, f in want.items():
        assert f.abs().sum() > 0, name  # every tensor is reached: the comparison is not of zeros
        assert torch.allclose(got[name], f, rtol=1e-4, atol=1e-9 * float(f.abs().max())), name


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    tiny_llama(layers=3, tie=True).save_pretrained(root / "m")
    tiny_tokenizer().save_pretrained(root / "m")
    (root / "calib").mkdir()
    write_jsonl(root / "calib" / "copy.jsonl", task_rows("copy", 3, seed=4))
    return root


@pytest.mark.parametrize("fisher,top_k", [("exact", 3), ("empirical", 5)])
def test_streamed_fisher_equals_the_in_ram_fisher(tiny_pool, fisher, top_k):
    p = FisherParams(fisher=fisher, top_k=top_k, max_length=32)
    task = load_calibration(str(tiny_pool["calib"]), 3)[0]
    model_dir = tiny_pool["experts"]["copy"]
    want, meta = candidate_fisher(load_model(str(model_dir)), task, tiny_tokenizer(), p)
    got, examples, mm = streamed(model_dir, task, p, checkpoint_bytes=1)  # one example per checkpoint group
    assert examples == meta["examples"] == 3
    assert_same_fisher(got, want)
    # residency: the outer tensors (embeddings, norm, head) and at most one decoder layer at a time
    shapes = {n: tuple(t.shape) for n, t in load_tensors(model_dir).items()}
    largest_layer, outer = split_by_layer(shapes)
    assert mm.peak_resident_bytes <= 4 * (outer + largest_layer)
    assert mm.peak_resident_bytes < 4 * sum(torch.Size(s).numel() for s in shapes.values())


def test_tied_embeddings_sum_both_paths_before_squaring(tied):
    p = FisherParams(fisher="exact", top_k=2, max_length=32)
    task = load_calibration(str(tied / "calib"))[0]
    want, _ = candidate_fisher(load_model(str(tied / "m")), task, tiny_tokenizer(), p)
    got, _, _ = streamed(tied / "m", task, p)
    assert "model.embed_tokens.weight" in got and "lm_head.weight" not in got
    assert_same_fisher(got, want)


def test_lora_candidate_runs_as_base_plus_its_delta(tiny_pool, lora_refs):
    from fwllm.solvers.per_candidate import load_candidate_model
    from fwllm.core.job import CandidateSpec

    p = FisherParams(fisher="exact", top_k=2, max_length=32)
    task = load_calibration(str(tiny_pool["calib"]), 2)[1]
    base, adapter = lora_refs[0].split("+")
    spec = CandidateSpec(lora_refs[0], base, adapter, {})
    want, _ = candidate_fisher(load_candidate_model(spec, base, "cpu"), task, tiny_tokenizer(), p)
    weights = CandidateWeights(base_weights(base), open_candidate(base, adapter))
    got, _, _ = streamed(base, task, p, weights=weights)
    assert_same_fisher(got, want)


@pytest.fixture(scope="module")
def lora_refs(tiny_pool, tmp_path_factory):
    return save_random_loras(tiny_pool["base"], tmp_path_factory.mktemp("fisher_lora"), (4, 2), seed=40)


def both(tmp_path, pool, models, label, **params):
    outs = {}
    for mode in ("full", "layerwise"):
        p = {"calibration": str(pool["calib"]), "max_rows": 3, "top_k": 2, "gradient": mode, **params}
        outs[mode] = merge(
            tmp_path,
            f"{label}_{mode}",
            "fisher",
            pool,
            models,
            p,
            per_model=[{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 0.5}],
        )
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        assert torch.allclose(layer[name], full[name], rtol=1e-5, atol=1e-6), name
    plan = json.loads((outs["layerwise"] / "fwllm_plan" / "plan.json").read_text())
    assert not (outs["layerwise"] / "fwllm_plan" / ".fisher_sums").exists()  # scratch removed
    return plan


@pytest.mark.parametrize("normalize", [False, True])
def test_full_pool_merge_equals_the_in_ram_merge(tmp_path, tiny_pool, normalize):
    e = tiny_pool["experts"]
    plan = both(tmp_path, tiny_pool, [e["copy"], e["rev"]], f"full{normalize}", normalize_fisher=normalize)
    assert all(c["meta"]["gradient"] == "layerwise" for c in plan["candidates"])


def test_lora_pool_merge_equals_the_in_ram_merge(tmp_path, tiny_pool, lora_refs):
    both(tmp_path, tiny_pool, lora_refs, "lora")


def test_auto_goes_layerwise_when_the_in_ram_solve_would_not_fit(tmp_path, tiny_pool, monkeypatch):
    import fwllm.methods.fw_merging as fw

    monkeypatch.setattr(fw, "available_memory", lambda: 1 << 20)  # 1 MiB free: the tiny model does not fit
    e = tiny_pool["experts"]
    out = merge(
        tmp_path,
        "auto",
        "fisher",
        tiny_pool,
        [e["copy"]],
        {"calibration": str(tiny_pool["calib"]), "max_rows": 2, "fisher": "empirical"},
        per_model=[{"task": "copy"}],
    )
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    assert plan["candidates"][0]["meta"]["gradient"] == "layerwise"
    assert "would need" in plan["candidates"][0]["meta"]["reason"]
