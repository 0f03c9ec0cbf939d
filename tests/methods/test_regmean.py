"""RegMean against independent truth: least squares, its limits, and the Grams it collects."""

import json
import logging

import pytest
import torch
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from conftest import (
    WORDS,
    load_tensors,
    save_tiny_llama_base,
    task_rows,
    tiny_tokenizer,
    write_jsonl,
    write_recipe,
)
from fwllm.data.calibration import load_calibration
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.plan import CandidateStats, Plan, StatsPlanRecord
from fwllm.core.errors import FwllmError
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.io.models import load_model, load_tokenizer
from fwllm.data.encoding import encode_task
from fwllm.methods.regmean import RegMean
from fwllm.core.params import RegMeanParams
from fwllm.solvers.grams import collect_grams, linear_layers
from fwllm.kernels.regmean import regmean_merge


pytestmark = pytest.mark.usefixtures("one_thread")
tensors = load_tensors


# -- pure math --------------------------------------------------------------------------------
def least_squares(x, y):
    return torch.linalg.lstsq(x, y).solution.T  # torch Linear layout [out, in]


def test_alpha_one_is_the_joint_least_squares_solution():
    """Two bias-free linear models fitted on disjoint data; RegMean(alpha=1) = the fit on both."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.randn(30, 6, generator=g, dtype=torch.float64),
        torch.randn(45, 6, generator=g, dtype=torch.float64),
    )
    noise = 0.1 * torch.randn(30, 3, generator=g, dtype=torch.float64)
    y1 = x1 @ torch.randn(6, 3, generator=g, dtype=torch.float64) + noise
    y2 = x2 @ torch.randn(6, 3, generator=g, dtype=torch.float64)
    w1, w2 = least_squares(x1, y1), least_squares(x2, y2)
    # through nn.Linear, as the method sees real layers
    models = []
    for w in (w1, w2):
        lin = torch.nn.Linear(6, 3, bias=False).double()
        lin.weight.data.copy_(w)
        models.append(lin)
    merged, lam = regmean_merge(
        [(m.weight.detach(), x.T @ x, 1.0) for m, x in zip(models, (x1, x2))], 1.0, 1e-5
    )
    joint = least_squares(torch.cat([x1, x2]), torch.cat([y1, y2]))
    assert lam == 0.0
    assert torch.allclose(merged.double(), joint, atol=1e-5)


def test_identical_grams_give_the_weighted_average():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5, generator=g)
    ws = [torch.randn(4, 5, generator=g) for _ in range(3)]
    c = [1.0, 2.0, 0.5]
    merged, _ = regmean_merge([(w, x.T @ x, ci) for w, ci in zip(ws, c)], 0.9, 1e-5)
    assert torch.allclose(merged, sum(ci * w for ci, w in zip(c, ws)) / sum(c), atol=1e-5)


def test_alpha_zero_weighs_each_input_column_by_its_energy():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(15, 4, generator=g) * torch.tensor([1.0, 3.0, 0.2, 1.0]) for _ in range(2)]
    ws = [torch.randn(2, 4, generator=g) for _ in range(2)]
    merged, _ = regmean_merge([(w, x.T @ x, 1.0) for w, x in zip(ws, xs)], 0.0, 1e-5)
    d = [x.square().sum(0) for x in xs]  # diag(G_i)
    assert torch.allclose(merged, (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]), atol=1e-5)


def test_singular_gram_sum_gets_a_ridge_towards_the_average():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(25, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        x[:, 2] = 0.0  # an input feature no calibration row ever sets
    ws = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    merged, lam = regmean_merge([(w, x.T @ x, 1.0) for w, x in zip(ws, xs)], 1.0, 1e-6)
    assert lam > 0
    assert torch.allclose(merged[:, 2].double(), (ws[0][:, 2] + ws[1][:, 2]) / 2, atol=1e-6)
    seen = [0, 1, 3, 4]
    exact, _ = regmean_merge([(w[:, seen], x[:, seen].T @ x[:, seen], 1.0) for w, x in zip(ws, xs)], 1.0, 0.0)
    assert torch.allclose(merged[:, seen], exact, atol=1e-4)


# -- a tiny LLaMA pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory, one_thread):
    """A tiny LLaMA base and two candidates perturbed from it, with copy/rev calibration rows."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("regmean_pool")
    base = LlamaForCausalLM.from_pretrained(
        save_tiny_llama_base(root, intermediate_size=48, num_hidden_layers=1)
    )
    models = []
    for i, task in enumerate(("copy", "rev")):
        write_jsonl(root / "calib" / f"{task}.jsonl", task_rows(task, 10, seed=i))
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for prm in base.parameters():
                prm.add_(0.05 * torch.randn_like(prm))
        base.save_pretrained(root / task)
        models.append(root / task)
    return {"root": root, "base": root / "base", "calib": root / "calib", "models": models}


def test_grams_are_the_layer_inputs_over_real_tokens(pool):
    model, tok = load_model(str(pool["models"][0])), load_tokenizer(str(pool["base"]))
    task = load_calibration(str(pool["calib"] / "copy.jsonl"))[0]
    padded, tokens = collect_grams(model, encode_task(task, tok, batch_size=4).batches)
    # independent truth: final hidden states (the LM head's input), one row at a time, no padding
    expected, count = torch.zeros(32, 32), 0
    with torch.no_grad():
        for batch in encode_task(task, tok, batch_size=1).batches:
            h = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1][0]
            expected += h.T @ h
            count += h.shape[0]
    assert tokens == count
    assert torch.allclose(padded["lm_head.weight"], expected, rtol=1e-4, atol=1e-4)
    assert set(padded) == set(linear_layers(model)) and "model.layers.0.mlp.down_proj.weight" in padded
    assert padded["model.layers.0.mlp.down_proj.weight"].shape == (48, 48)


def test_tied_lm_head_is_left_to_averaging():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    assert "lm_head.weight" not in linear_layers(LlamaForCausalLM(cfg))


def grams_by_hand(model_dir, calib_file, names):
    """X^T X of each named linear layer's inputs over every token of every row (prompt,
    response, EOS), one row at a time so no padding is ever seen; captured by our own hooks."""
    from transformers import LlamaForCausalLM

    model, tok = LlamaForCausalLM.from_pretrained(model_dir).eval(), tiny_tokenizer()
    grams = {n: None for n in names}

    def hook_for(name):
        def hook(module, args):
            x = args[0][0].double()  # [tokens, in]
            grams[name] = x.T @ x if grams[name] is None else grams[name] + x.T @ x

        return hook

    modules = dict(model.named_modules())
    handles = [modules[n[: -len(".weight")]].register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for line in calib_file.read_text().splitlines():
            row = json.loads(line)
            ids = (
                tok(row["prompt"])["input_ids"] + tok(row["response"], add_special_tokens=False)["input_ids"]
            )
            model(input_ids=torch.tensor([ids + [tok.eos_token_id]]))
    for h in handles:
        h.remove()
    return grams


def regmean_by_hand(ws, grams, weights, alpha):
    """Jin et al.: W^T = (sum_i c_i G~_i)^-1 sum_i c_i G~_i W_i^T, G~ = alpha G + (1 - alpha) diag(G)."""
    reduced = [c * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))) for g, c in zip(grams, weights)]
    lhs = sum(reduced)
    rhs = sum(g @ w.double().T for g, w in zip(reduced, ws))
    return torch.linalg.solve(lhs, rhs).T.float()


def test_merge_is_the_closed_form_over_each_candidates_layer_inputs(tmp_path, pool, monkeypatch, caplog):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(
        tmp_path / "r.yml",
        "regmean",
        pool["base"],
        pool["models"],
        {"calibration": str(pool["calib"]), "batch_size": 3},
        per_model=[{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 2.0}],
    )
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fwllm.regmean"):
        merge_recipe(str(recipe), str(out), MergeOptions(quiet=True))
    plan_dir = out / "fwllm_plan"
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert [c["file"] for c in plan["candidates"]] == ["gram/0.safetensors", "gram/1.safetensors"]
    assert (plan_dir / "DONE").exists()
    checked = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "lm_head.weight",
    )
    grams = [
        grams_by_hand(m, pool["calib"] / f"{t}.jsonl", checked)
        for m, t in zip(pool["models"], ("copy", "rev"))
    ]
    for c, g in zip(plan["candidates"], grams):  # what the plan stored: the same sums, padding left out
        stored = load_file(plan_dir / c["file"])
        assert all(torch.allclose(stored[n].double(), g[n], rtol=1e-4, atol=1e-3) for n in checked)
    cands = [tensors(m) for m in pool["models"]]
    merged = tensors(out)
    for name in checked:
        expected = regmean_by_hand([c[name] for c in cands], [g[name] for g in grams], (1.0, 2.0), alpha=0.9)
        assert torch.allclose(merged[name], expected, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(merged[name], (cands[0][name] + 2 * cands[1][name]) / 3, atol=1e-4)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.allclose(merged[name], (cands[0][name] + 2 * cands[1][name]) / 3, atol=1e-6), name
    assert "singular" not in caplog.text  # alpha < 1 keeps these sums well conditioned


def test_bad_input(tmp_path, pool, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))

    def job(per_model, **params):
        specs = [
            CandidateSpec(str(m), str(m), None, {"weight": 1.0, **pm})
            for m, pm in zip(pool["models"], per_model)
        ]
        return MergeJob(
            "regmean",
            str(pool["base"]),
            specs,
            RegMeanParams(calibration=str(pool["calib"]), **params),
            plan_dir=str(tmp_path / "plan"),
            progress=False,
        )

    with pytest.raises(FwllmError, match="has no calibration task; set parameters.task"):
        RegMean().solve(job([{"task": "copy"}, {"task": ""}]))
    with pytest.raises(FwllmError, match=r"alpha must be <= 1 \(got 1.5\)"):
        RegMean().validate_params({"calibration": str(pool["calib"]), "alpha": 1.5})
    plan = Plan(
        "",
        StatsPlanRecord(
            method="regmean",
            base="b",
            settings={},
            candidates=[
                CandidateStats(label="a", task="t", file="gram/0.safetensors", meta={}, cached=False)
            ],
        ),
        RegMeanParams(),
    )
    with pytest.raises(FwllmError, match="weights must be >= 0"):
        RegMean().merge_tensor(
            plan, "x.weight", torch.zeros(2, 2), {"a": torch.zeros(2, 2)}, {"a": {"weight": -1.0}}
        )
