"""Fisher merging against independent truth: closed forms, the averaging limit, a win over averaging."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from mergekit.options import MergeOptions
from safetensors.torch import load_file

from conftest import (
    ENC_WORDS,
    finetune,
    load_tensors,
    perturbed_copies,
    roberta_tokenizer,
    save_tiny_llama_base,
    task_rows,
    tiny_llama,
    tiny_tokenizer,
    two_head_encoder_pool,
    write_jsonl,
    write_recipe,
)
from fwllm.data.calibration import CAUSAL, CalibrationTask, load_calibration
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.errors import FwllmError
from fwllm.methods.fisher import FisherMerging
from fwllm.core.params import FisherParams
from fwllm.solvers.fisher import add_example_fisher, candidate_fisher
from fwllm.kernels.fisher import fisher_merge, gaussian_terms, prediction_terms
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.io.models import load_model, load_tokenizer
from fwllm.data.objective import encode_tasks


pytestmark = pytest.mark.usefixtures("one_thread")
tensors = load_tensors


# -- pure math --------------------------------------------------------------------------------
def test_identical_fishers_give_the_weighted_average():
    torch.manual_seed(0)
    thetas = [torch.randn(5, 7) for _ in range(3)]
    weights = [0.5, 1.0, 2.5]
    average = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
    shared = torch.rand(5, 7) + 0.1
    assert torch.allclose(fisher_merge(thetas, [shared] * 3, weights, 1e-8), average, atol=1e-6)
    # coordinates no model is sensitive to: the epsilon floor makes them the plain weighted average
    zeros = [torch.zeros(5, 7)] * 3
    assert torch.allclose(fisher_merge(thetas, zeros, weights, 1e-8), average, atol=1e-6)


def test_fisher_weights_pull_towards_the_sensitive_model():
    a, b = torch.zeros(4), torch.ones(4)
    merged = fisher_merge(
        [a, b], [torch.tensor([1.0, 1.0, 9.0, 0.0]), torch.tensor([1.0, 3.0, 1.0, 5.0])], [1.0, 1.0], 1e-8
    )
    assert torch.allclose(merged, torch.tensor([0.5, 0.75, 0.1, 1.0]), atol=1e-6)


def _softmax_classifier(d=4, c=3, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, c, bias=False)
    with torch.no_grad():
        lin.weight.mul_(3.0)  # confident enough that the classes weigh differently
    return lin


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_softmax_classifier_fisher_matches_the_closed_form(kind):
    lin = _softmax_classifier()
    xs, ys = torch.randn(6, 4), torch.tensor([0, 2, 1, 1, 0, 2])
    acc = [torch.zeros_like(lin.weight)]
    for x, y in zip(xs, ys):
        terms = prediction_terms(lin(x)[None], y.view(1), kind, top_k=0)
        add_example_fisher([lin.weight], terms, acc)
    got = acc[0] / len(xs)

    # d log p(y|x) / dW = (e_y - p) x^T for logits z = W x
    expected = torch.zeros(3, 4)
    with torch.no_grad():
        for x, y in zip(xs, ys):
            p = torch.softmax(lin.weight @ x, -1)
            eye = torch.eye(3)
            if kind == "exact":
                expected += sum(p[k] * torch.outer(eye[k] - p, x).square() for k in range(3))
            else:
                expected += torch.outer(eye[y] - p, x).square()
    expected /= len(xs)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    # and it is not the batch shortcut (square of the summed gradient)
    batch_grad = torch.autograd.grad(F.log_softmax(lin(xs), -1).gather(1, ys.view(-1, 1)).sum(), lin.weight)[
        0
    ]
    assert not torch.allclose(got, batch_grad.square() / len(xs), rtol=1e-2)


def test_top_k_renormalises_over_the_most_likely_classes():
    lin = _softmax_classifier()
    x = torch.randn(4)
    acc = [torch.zeros_like(lin.weight)]
    add_example_fisher([lin.weight], prediction_terms(lin(x)[None], None, "exact", top_k=2), acc)
    with torch.no_grad():
        p = torch.softmax(lin.weight @ x, -1)
        top = p.topk(2)
        eye = torch.eye(3)
        expected = sum(
            w / top.values.sum() * torch.outer(eye[k] - p, x).square()
            for w, k in zip(top.values, top.indices)
        )
    assert torch.allclose(acc[0], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_regression_fisher_is_the_unit_gaussian_one(kind):
    torch.manual_seed(1)
    lin = torch.nn.Linear(3, 1, bias=False)
    xs, ys = torch.randn(5, 3), torch.randn(5)
    acc = [torch.zeros_like(lin.weight)]
    for x, y in zip(xs, ys):
        add_example_fisher([lin.weight], gaussian_terms(lin(x), y.view(1), kind), acc)
    with torch.no_grad():
        resid = (ys - xs @ lin.weight[0]).view(-1, 1)
        expected = (xs.square() * (1 if kind == "exact" else resid.square())).mean(0, keepdim=True)
    assert torch.allclose(acc[0] / 5, expected, rtol=1e-5)


def test_fisher_merge_recovers_experts_on_disjoint_features():
    """Two softmax experts from a zero base, each seeing only its own half of the features:
    averaging halves every expert's logits; the Fisher merge keeps each expert's half."""
    torch.manual_seed(3)
    d, c, n = 10, 3, 64
    data = {}
    for name, cols in (("a", slice(0, 5)), ("b", slice(5, 10))):
        x = torch.zeros(n, d)
        x[:, cols] = torch.randn(n, 5)
        y = (x @ torch.randn(d, c)).argmax(1)
        data[name] = (x, y)
    experts = {}
    for name, (x, y) in data.items():
        w = torch.zeros(c, d, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.1)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(x @ w.T, y).backward()
            opt.step()
        experts[name] = w.detach()
    fishers = []
    for name, (x, _) in data.items():
        lin = torch.nn.Linear(d, c, bias=False)
        lin.weight.data.copy_(experts[name])
        acc = [torch.zeros(c, d)]
        for row in x:
            add_example_fisher([lin.weight], prediction_terms(lin(row)[None], None, "exact", 0), acc)
        fishers.append(acc[0] / n)

    def loss(w):
        return sum(F.cross_entropy(x @ w.T, y).item() for x, y in data.values()) / 2

    merged = fisher_merge([experts["a"], experts["b"]], fishers, [1.0, 1.0], 1e-8)
    average = (experts["a"] + experts["b"]) / 2
    own = (
        F.cross_entropy(data["a"][0] @ experts["a"].T, data["a"][1]).item()
        + F.cross_entropy(data["b"][0] @ experts["b"].T, data["b"][1]).item()
    ) / 2
    assert loss(merged) == pytest.approx(own, abs=1e-4)
    assert loss(merged) < 0.7 * loss(average)


# -- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_experts(tmp_path_factory, one_thread):
    """A tiny LLaMA base and two experts on conflicting tasks (copy / reverse the digits)."""
    from transformers import LlamaForCausalLM

    root, tok = tmp_path_factory.mktemp("fisher_pool"), tiny_tokenizer()
    save_tiny_llama_base(root)
    experts = {}
    for task in ("copy", "rev"):
        write_jsonl(root / "calib" / f"{task}.jsonl", task_rows(task, 12, seed=1))
        torch.manual_seed(1)
        model = LlamaForCausalLM.from_pretrained(root / "base")
        finetune(model, tok, task_rows(task, 48, seed=3))
        model.save_pretrained(root / task)
        tok.save_pretrained(root / task)
        experts[task] = root / task
    return {"root": root, "base": root / "base", "calib": root / "calib", "experts": experts}


def fisher_recipe(path, pool, params=None, weights=(1.0, 1.0)):
    e = pool["experts"]
    per_model = [{"task": "copy", "weight": weights[0]}, {"task": "rev", "weight": weights[1]}]
    return write_recipe(
        path,
        "fisher",
        pool["base"],
        [e["copy"], e["rev"]],
        {"calibration": str(pool["calib"]), **(params or {})},
        per_model=per_model,
    )


def calibration_loss(state, pool):
    model, tok = load_model(str(pool["base"])), load_tokenizer(str(pool["base"]))
    model.load_state_dict(state, strict=False)
    return encode_tasks(load_calibration(str(pool["calib"])), tok, model).value(model)


def own_rows(pool, task, n):
    """The first n rows of a task's calibration file (what max_rows keeps)."""
    lines = (pool["calib"] / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def causal_ids(tok, row):
    """(prompt ids, response ids): the response ends with EOS; its tokens are the predictions."""
    return tok(row["prompt"])["input_ids"], tok(row["response"], add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]


def merge_by_hand(thetas, fishers, weights, epsilon=1e-8):
    """Matena & Raffel: sum_i w_i F_i theta_i / sum_i w_i F_i, every F floored at epsilon."""
    floored = [w * f.double().clamp_min(epsilon) for w, f in zip(weights, fishers)]
    return (sum(f * t.double() for f, t in zip(floored, thetas)) / sum(floored)).float()


def empirical_fisher_by_hand(model_dir, rows):
    """Per row, the squared gradient of log p(response | prompt) by torch autograd; averaged over rows."""
    from transformers import LlamaForCausalLM

    model, tok = LlamaForCausalLM.from_pretrained(model_dir).eval(), tiny_tokenizer()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(prm) for n, prm in params.items()}
    for row in rows:
        prompt, response = causal_ids(tok, row)
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], -1)
        at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)  # position t predicts token t + 1
        loglik = logp[at, torch.tensor(response)].sum()
        for n, g in zip(params, torch.autograd.grad(loglik, list(params.values()))):
            acc[n] += g.square()
    return {n: a / len(rows) for n, a in acc.items()}


def exact_output_fishers(model, rows, top_k):
    """The exact causal-LM Fisher of lm_head.weight (W) and model.norm.weight (g) in closed form.

    logits = W h with h = g * n (RMSNorm), so d log p_v / dW = (e_v - p) h^T and
    d log p_v / dg = n * W^T (e_v - p). Per response position: the top_k tokens v with p
    renormalised over them; summed over positions, averaged over rows.
    """
    from transformers import LlamaForCausalLM

    if not isinstance(model, torch.nn.Module):
        model = LlamaForCausalLM.from_pretrained(model).eval()
    tok, seen = tiny_tokenizer(), {}
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0][0]))
    w, g = model.lm_head.weight.detach().double(), model.model.norm.weight.detach().double()
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    f_w, f_g = torch.zeros_like(w), torch.zeros_like(g)
    with torch.no_grad():
        for row in rows:
            prompt, response = causal_ids(tok, row)
            model(input_ids=torch.tensor([prompt + response]))
            for h in seen["h"][len(prompt) - 1 : len(prompt) + len(response) - 1].double():
                p = torch.softmax(w @ h, -1)
                ranked = p.sort(descending=True).values
                assert ranked[top_k - 1] > ranked[top_k] * (
                    1 + 1e-4
                )  # no near tie at the cut: top_k is well defined
                top = p.topk(top_k)
                for v, weight in zip(top.indices, top.values / top.values.sum()):
                    f_w += weight * torch.outer(eye[v] - p, h).square()
                    f_g += weight * ((w.T @ (eye[v] - p)) * h / g).square()
    handle.remove()
    return {"lm_head.weight": (f_w / len(rows)).float(), "model.norm.weight": (f_g / len(rows)).float()}


def test_fisher_merge_beats_plain_averaging_on_the_calibration_objective(
    tmp_path, llama_experts, monkeypatch
):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fisher"
    merge_recipe(str(fisher_recipe(tmp_path / "f.yml", llama_experts)), str(out), MergeOptions(quiet=True))
    a, b = (tensors(llama_experts["experts"][t]) for t in ("copy", "rev"))
    average = {k: (a[k] + b[k]) / 2 for k in a}
    assert calibration_loss(tensors(out), llama_experts) < calibration_loss(average, llama_experts)

    # the output layer's merge against the exact Fisher in closed form (default top_k = 5)
    merged = tensors(out)
    by_hand = [
        exact_output_fishers(llama_experts["experts"][t], own_rows(llama_experts, t, 12), 5)
        for t in ("copy", "rev")
    ]
    for name in ("lm_head.weight", "model.norm.weight"):
        expected = merge_by_hand([a[name], b[name]], [f[name] for f in by_hand], [1.0, 1.0])
        assert torch.allclose(merged[name], expected, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(merged[name], average[name], atol=1e-4), name  # the Fishers matter here


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_streamed_merge_holds_one_candidate_tensor_at_a_time(
    tmp_path, llama_experts, monkeypatch, method, resident
):
    """fwllm merge runs the per-tensor merge itself over lazily read candidates: how many
    candidate tensors are alive at once does not grow with the pool (1 -> 6 candidates)."""
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    pool = perturbed_copies(llama_experts["experts"]["copy"], tmp_path, 6, 0.05, seed=50, prefix="c")
    peaks = {}
    for n in (1, 6):
        recipe = write_recipe(
            tmp_path / f"{method}{n}.yml",
            method,
            llama_experts["base"],
            pool[:n],
            {"calibration": str(llama_experts["calib"]), "max_rows": 2, "keep_merged": True},
            per_model=[{"task": "copy"}] * n,
        )
        resident.reset_peak()
        merge_recipe(str(recipe), str(tmp_path / f"out{method}{n}"), MergeOptions(quiet=True))
        peaks[n] = resident.peak
        assert os.path.isfile(tmp_path / f"out{method}{n}" / "fwllm_plan" / "merged" / "index.json")
    assert 1 <= peaks[6] == peaks[1] <= 2, peaks


def test_lazy_solve_through_plain_mergekit_and_fisher_reuse(tmp_path, llama_experts, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    from fwllm.mergekit_glue.adapter import default_plan_root, forget_plans, register_all

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    register_all()
    forget_plans()
    e = llama_experts["experts"]
    outs = {}
    for weights in ((1.0, 1.0), (3.0, 1.0)):
        params = {"max_rows": 3, "fisher": "empirical"}
        raw = yaml.safe_load(fisher_recipe(tmp_path / "r.yml", llama_experts, params, weights).read_text())
        outs[weights] = tmp_path / f"out{weights[0]}"
        run_merge(MergeConfiguration.model_validate(raw), str(outs[weights]), MergeOptions(quiet=True))
    plans = sorted(os.listdir(default_plan_root()))
    assert len(plans) == 2 and all(p.startswith("fisher-") for p in plans)
    records = [
        json.loads(open(os.path.join(default_plan_root(), p, "plan.json")).read())["candidates"]
        for p in plans
    ]
    assert sorted(r["cached"] for rec in records for r in rec) == [False, False, True, True]  # Fishers reused

    # new weights, same Fishers: theta = sum w F theta / sum w F with w = (3, 1), F by autograd here
    fishers = [empirical_fisher_by_hand(e[t], own_rows(llama_experts, t, 3)) for t in ("copy", "rev")]
    a, b = tensors(e["copy"]), tensors(e["rev"])
    for weights, out in outs.items():
        merged = tensors(out)
        for name in merged:
            expected = merge_by_hand([a[name], b[name]], [fishers[0][name], fishers[1][name]], weights)
            assert torch.allclose(merged[name], expected, rtol=1e-4, atol=1e-5), (weights, name)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(tensors(outs[(3.0, 1.0)])[name], tensors(outs[(1.0, 1.0)])[name], atol=1e-4)
    forget_plans()


def test_normalized_fisher_divides_by_each_models_mean(tmp_path, llama_experts, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "norm"
    recipe = fisher_recipe(
        tmp_path / "n.yml", llama_experts, {"normalize_fisher": True, "fisher": "empirical", "max_rows": 6}
    )
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True))
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    fishers = [
        empirical_fisher_by_hand(llama_experts["experts"][t], own_rows(llama_experts, t, 6))
        for t in ("copy", "rev")
    ]
    # each model's mean Fisher entry, over every entry of every tensor
    means = [
        float(sum(t.double().sum() for t in f.values()) / sum(t.numel() for t in f.values())) for f in fishers
    ]
    assert [c["meta"]["mean"] for c in plan["candidates"]] == pytest.approx(means, rel=1e-4)
    assert means[0] != pytest.approx(means[1], rel=0.05)  # so the normalisation changes the merge
    a, b = (tensors(llama_experts["experts"][t]) for t in ("copy", "rev"))
    merged = tensors(out)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ):
        expected = merge_by_hand(
            [a[name], b[name]], [fishers[0][name] / means[0], fishers[1][name] / means[1]], [1.0, 1.0]
        )
        assert torch.allclose(merged[name], expected, rtol=1e-4, atol=1e-5), name
        unnormalised = merge_by_hand([a[name], b[name]], [fishers[0][name], fishers[1][name]], [1.0, 1.0])
        assert not torch.allclose(merged[name], unnormalised, atol=1e-4), name


# -- the Fisher a candidate gets, against autograd and closed forms -----------------------------------
def test_causal_lm_exact_fisher_is_the_closed_form_over_top_k_tokens():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a spread next-token distribution: the top 5 of 18 hold 60-95% of it
    rows = task_rows("copy", 3, seed=5)
    fisher, meta = candidate_fisher(
        model, CalibrationTask("copy", CAUSAL, rows), tiny_tokenizer(), FisherParams()
    )
    expected = exact_output_fishers(model, rows, top_k=5)
    for name, f in expected.items():
        assert torch.allclose(fisher[name], f, rtol=1e-4, atol=1e-6 * float(f.max())), name
    assert meta["examples"] == 3 and meta["terms"] == 3 * 5 * 5  # rows x response positions x top_k


def seven_class_classifier(root):
    """A RoBERTa MLM base and a 7-label sequence classifier on it, with 4 calibration rows."""
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=len(ENC_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(root / "base")
    roberta_tokenizer().save_pretrained(root / "base")
    torch.manual_seed(7)
    model = RobertaForSequenceClassification.from_pretrained(root / "base", num_labels=7)
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(10.0)  # the 7 classes weigh differently
    model.save_pretrained(root / "seven")
    rows = [
        {"sentence": s, "label": y}
        for s, y in (("w1 w5 w9", 6), ("w3 w3 w12 w0", 0), ("w17 w2", 4), ("w8 w11 w19 w4 w6", 2))
    ]
    (root / "calib").mkdir()
    write_jsonl(root / "calib" / "seven.jsonl", rows)
    return root / "seven", rows


def test_classifier_exact_fisher_sums_over_every_class_beyond_top_k(tmp_path, monkeypatch):
    """Seven classes and the default top_k = 5: the expectation still runs over all seven
    (top_k only bounds a causal LM's vocabulary)."""
    from transformers import RobertaForSequenceClassification

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    expert, rows = seven_class_classifier(tmp_path)
    recipe = write_recipe(
        tmp_path / "c.yml",
        "fisher",
        tmp_path / "base",
        [expert],
        {"calibration": str(tmp_path / "calib")},
        per_model=[{"task": "seven"}],
    )
    merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    plan = json.loads((tmp_path / "out" / "fwllm_plan" / "plan.json").read_text())
    got = load_file(tmp_path / "out" / "fwllm_plan" / plan["candidates"][0]["file"])

    # independent truth: sum_v p_v (grad log p_v)^2 over all 7 classes, one autograd pass per class
    model, tok = RobertaForSequenceClassification.from_pretrained(expert).eval(), roberta_tokenizer()
    body = {n: prm for n, prm in model.named_parameters() if not n.startswith("classifier.")}
    expected = {n: torch.zeros_like(prm) for n, prm in body.items()}
    smallest_two = 0.0
    for row in rows:
        logp = torch.log_softmax(model(**tok(row["sentence"], return_tensors="pt")).logits[0], -1)
        smallest_two += float(logp.detach().exp().sort().values[:2].sum()) / len(rows)
        for v in range(7):
            grads = torch.autograd.grad(logp[v], list(body.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(body, grads):
                if g is not None:
                    expected[n] += logp[v].exp().detach() * g.square() / len(rows)
    assert smallest_two > 0.01  # the two classes a top-5 cut would drop carry real probability
    assert got.keys() == expected.keys()
    for name, f in expected.items():
        assert torch.allclose(got[name], f, rtol=1e-4, atol=1e-6 * float(f.max()) + 1e-12), name


def test_rows_without_a_prediction_do_not_dilute_the_fisher(tmp_path, llama_experts, monkeypatch):
    """A one-token text row predicts nothing on a causal LM (no next token): it is not an
    example, so the Fisher is the mean over the other rows only."""
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    texts = ["1 2 3 =", "copy : 4 5", "7 8 9 0 1", "5"]
    calib = tmp_path / "calib"
    calib.mkdir()
    write_jsonl(calib / "text.jsonl", [{"text": t} for t in texts])
    expert = llama_experts["experts"]["copy"]
    recipe = write_recipe(
        tmp_path / "t.yml",
        "fisher",
        llama_experts["base"],
        [expert],
        {"calibration": str(calib), "fisher": "empirical"},
        per_model=[{"task": "text"}],
    )
    merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    plan = json.loads((tmp_path / "out" / "fwllm_plan" / "plan.json").read_text())
    got = load_file(tmp_path / "out" / "fwllm_plan" / plan["candidates"][0]["file"])

    # independent truth over the three rows that predict: (grad sum_t log p(x_t+1 | x_<=t))^2, averaged
    from transformers import LlamaForCausalLM

    model, tok = LlamaForCausalLM.from_pretrained(expert).eval(), tiny_tokenizer()
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(prm) for n, prm in params.items()}
    for text in texts[:3]:
        ids = torch.tensor([tok(text)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        loglik = logp.gather(1, ids[0, 1:, None]).sum()
        for n, g in zip(params, torch.autograd.grad(loglik, list(params.values()))):
            expected[n] += g.square() / 3
    assert got.keys() == expected.keys()
    for name, f in expected.items():
        assert torch.allclose(got[name], f, rtol=1e-4, atol=1e-6 * float(f.max()) + 1e-12), name
    assert plan["candidates"][0]["meta"]["examples"] == 3


# -- bad input ------------------------------------------------------------------------------------
def job_for(tmp_path, pool, models, per_model, **params):
    specs = [CandidateSpec(str(m), str(m), None, {"weight": 1.0, **pm}) for m, pm in zip(models, per_model)]
    p = FisherParams(calibration=str(pool["calib"]), max_rows=2, **params)
    return MergeJob("fisher", str(pool["base"]), specs, p, plan_dir=str(tmp_path / "plan"), progress=False)


def test_candidate_without_a_task_is_an_error(tmp_path, llama_experts, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    e = llama_experts["experts"]
    with pytest.raises(FwllmError, match=r"candidate .*rev has no calibration task; set parameters.task"):
        FisherMerging().solve(job_for(tmp_path, llama_experts, [e["copy"], e["rev"]], [{"task": "copy"}, {}]))
    with pytest.raises(FwllmError, match="names task 'sort'"):
        FisherMerging().solve(job_for(tmp_path, llama_experts, [e["copy"]], [{"task": "sort"}]))


def test_rows_the_model_cannot_score_are_an_error(tmp_path, llama_experts, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    calib = tmp_path / "calib"
    calib.mkdir()
    write_jsonl(calib / "senti.jsonl", [{"sentence": "1 2", "label": 1}, {"sentence": "3", "label": 0}])
    pool = dict(llama_experts, calib=calib)
    with pytest.raises(FwllmError, match="classification rows, which a causal model cannot score"):
        FisherMerging().solve(
            job_for(tmp_path, pool, [llama_experts["experts"]["copy"]], [{"task": "senti"}])
        )


def test_nan_fisher_is_one_clear_error(tmp_path, llama_experts, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    model = LlamaForCausalLM.from_pretrained(llama_experts["experts"]["copy"])
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    with pytest.raises(FwllmError, match=r"Fisher of candidate .*broken is not finite in"):
        FisherMerging().solve(job_for(tmp_path, llama_experts, [tmp_path / "broken"], [{"task": "copy"}]))
    assert not os.path.exists(tmp_path / "plan" / "DONE")


def test_unknown_parameter_and_bad_epsilon(tmp_path, llama_experts, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FwllmError, match="unknown parameter 'fisher_mode'"):
        FisherMerging().validate_params({"fisher_mode": "exact"})
    with pytest.raises(FwllmError, match=r"epsilon must be > 0 \(got 0.0\)"):
        FisherMerging().validate_params({"calibration": str(llama_experts["calib"]), "epsilon": 0.0})


# -- encoder pools: heads are kept, not merged ------------------------------------------------------
def test_classifier_candidates_keep_their_own_heads(tmp_path, monkeypatch):
    from transformers import RobertaForSequenceClassification

    from fwllm.arch.heads import load_heads

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    experts = two_head_encoder_pool(tmp_path)
    recipe = write_recipe(
        tmp_path / "enc.yml",
        "fisher",
        tmp_path / "base",
        experts,
        {"calibration": str(tmp_path / "calib")},
        per_model=[{"task": "two"}, {"task": "three"}],
    )
    out = tmp_path / "merged"
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True))
    heads = load_heads(str(out))
    assert set(heads) == {"two", "three"} and heads["three"].num_labels == 3
    for task, path in zip(("two", "three"), experts):
        expert = tensors(path)
        assert all(torch.equal(t, expert[n]) for n, t in heads[task].tensors.items())
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    fisher = load_file(out / "fwllm_plan" / plan["candidates"][0]["file"])
    assert not any(n.startswith("classifier.") for n in fisher)  # heads are outside the Fisher
    merged = tensors(out)
    assert all(torch.isfinite(t).all() for t in merged.values())
    RobertaForSequenceClassification.from_pretrained(out)  # loads as a normal checkpoint


def test_lora_candidate_has_the_fisher_of_its_merged_weights(tmp_path, llama_experts, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    base = llama_experts["base"]
    torch.manual_seed(4)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for n, prm in peft_model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.5)  # peft starts B at zero: make the adapter change something
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "full")

    def fisher_of(spec):
        p = FisherParams(calibration=str(llama_experts["calib"]), max_rows=3)
        plan = tmp_path / f"plan_{spec.lora is not None}"
        FisherMerging().solve(MergeJob("fisher", str(base), [spec], p, plan_dir=str(plan), progress=False))
        return load_file(plan / "fisher" / "0.safetensors")

    lora = fisher_of(
        CandidateSpec(
            f"{base}+{tmp_path / 'adapter'}",
            str(base),
            str(tmp_path / "adapter"),
            {"task": "rev", "weight": 1.0},
        )
    )
    full = fisher_of(
        CandidateSpec(str(tmp_path / "full"), str(tmp_path / "full"), None, {"task": "rev", "weight": 1.0})
    )
    assert lora.keys() == full.keys()
    for name in full:
        assert torch.allclose(lora[name], full[name], rtol=1e-3, atol=1e-8), name
