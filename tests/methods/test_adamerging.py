"""Layer-wise AdaMerging: exact coefficient gradients, entropy going down, and a plain-mergekit twin."""

import json
import os

import pytest
import torch
import yaml
from mergekit.options import MergeOptions

from conftest import (
    load_tensors,
    perturbed_copies,
    roberta_tokenizer,
    save_tiny_llama_base,
    task_rows,
    two_head_encoder_pool,
    write_jsonl,
    write_recipe,
)
from fwllm.core.params import AdaMergingParams
from fwllm.kernels.adamerging import coefficient_gradient, merged_tensor
from fwllm.methods.adamerging import AdaMerging
from fwllm.methods.common import reproducible as _reproducible
from fwllm.solvers.adamerging import entropy_backward
from fwllm.data.calibration import load_calibration
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.errors import FwllmError
from fwllm.mergekit_glue.merge import merge_recipe
from fwllm.io.models import load_model, load_tokenizer
from fwllm.io.candidates import open_candidate
from fwllm.data.encoding import encode_task

OPTS = MergeOptions(quiet=True)


pytestmark = pytest.mark.usefixtures("one_thread")
tensors = load_tensors


@pytest.fixture(scope="module")
def pool(tmp_path_factory, one_thread):
    """A tiny LLaMA base and three candidates perturbed from it; copy/rev calibration rows."""
    root = tmp_path_factory.mktemp("ada_pool")
    save_tiny_llama_base(root, intermediate_size=48)
    for i, task in enumerate(("copy", "rev")):
        write_jsonl(root / "calib" / f"{task}.jsonl", task_rows(task, 8, seed=i))
    models = perturbed_copies(root / "base", root, 3, 0.3, seed=10)
    return {"root": root, "base": root / "base", "calib": root / "calib", "models": models}


def test_coefficient_gradient_equals_autograd_through_functional_call(pool):
    from torch.func import functional_call

    model, tok = load_model(str(pool["base"])), load_tokenizer(str(pool["base"]))
    tasks = [encode_task(t, tok, batch_size=3) for t in load_calibration(str(pool["calib"]))]
    params = dict(model.named_parameters())
    names = list(params)
    theta0 = [params[n].detach().clone() for n in names]
    cands = [open_candidate(str(m)) for m in pool["models"]]
    taus = [torch.stack([c.task_vector(n, t0) for c in cands]) for n, t0 in zip(names, theta0)]
    lambdas = torch.rand(len(names), len(cands), generator=torch.Generator().manual_seed(0))

    # independent truth: differentiate through theta(lambda) itself
    lam = lambdas.clone().requires_grad_(True)
    total = 0.0
    for task in tasks:
        for batch in task.batches:
            theta = {
                n: merged_tensor(t0, tau, lam[i]) for i, (n, t0, tau) in enumerate(zip(names, theta0, taus))
            }
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = functional_call(model, theta, args=(), kwargs=inputs).logits
            # entropy of the next-token distribution at every response position, by hand
            logp = torch.log_softmax(logits[:, :-1][batch["labels"][:, 1:] != -100].float(), -1)
            total = total - (logp.exp() * logp).sum() / (task.units * len(tasks))
    total.backward()

    # the method: theta(lambda) written into the model, weight gradients contracted with the taus
    with torch.no_grad():
        for i, (n, t0, tau) in enumerate(zip(names, theta0, taus)):
            params[n].copy_(merged_tensor(t0, tau, lambdas[i]))
    model.zero_grad()
    value = entropy_backward(model, tasks)
    got = coefficient_gradient([params[n].grad for n in names], taus)
    assert value == pytest.approx(total.item(), rel=1e-5)
    assert torch.allclose(got, lam.grad, rtol=1e-4, atol=1e-7)


def test_entropy_decreases_and_the_reproduce_recipe_gives_the_same_tensors(tmp_path, pool, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(
        tmp_path / "ada.yml",
        "adamerging",
        pool["base"],
        pool["models"],
        {"calibration": str(pool["calib"]), "steps": 6, "lr": 0.05},
    )
    out = tmp_path / "ada"
    merge_recipe(str(recipe), str(out), OPTS)
    plan_dir = out / "fwllm_plan"
    for f in ("plan.json", "coefficients.json", "trace.json", "reproduce.yml", "DONE"):
        assert (plan_dir / f).exists(), f

    entropy = json.loads((plan_dir / "trace.json").read_text())["entropy"]
    assert len(entropy) == 7
    assert all(b < a for a, b in zip(entropy, entropy[1:])), entropy

    coefficients = json.loads((plan_dir / "coefficients.json").read_text())["coefficients"]
    base, cands, merged = tensors(pool["base"]), [tensors(m) for m in pool["models"]], tensors(out)
    assert set(coefficients) == set(base)
    assert all(0.0 <= c <= 1.0 for cs in coefficients.values() for c in cs)
    assert len({round(c, 6) for cs in coefficients.values() for c in cs}) > 1  # not one global lambda
    for name, cs in coefficients.items():
        expected = base[name] + sum(c * (cand[name] - base[name]) for c, cand in zip(cs, cands))
        assert torch.allclose(merged[name], expected, atol=1e-6), name

    # plain mergekit, task_arithmetic with per-tensor conditional weights, no fwllm involved
    raw = yaml.safe_load((plan_dir / "reproduce.yml").read_text())
    assert raw["merge_method"] == "task_arithmetic" and raw["parameters"] == {
        "normalize": False,
        "lambda": 1.0,
    }
    twin = tmp_path / "twin"
    run_merge(MergeConfiguration.model_validate(raw), str(twin), OPTS)
    reproduced = tensors(twin)
    assert reproduced.keys() == merged.keys()
    for name in merged:
        assert torch.allclose(reproduced[name], merged[name], atol=1e-6), name


def test_substring_names_resolve_to_their_own_filter():
    coefficients = {"layers.1.w": [0.1], "layers.11.w": [0.2], "x.layers.1.w": [0.3]}
    assert _reproducible(coefficients, list(coefficients))  # longest first: each hits its own entry
    # a tensor *without* a coefficient that contains a coefficient's name would pick it up
    assert not _reproducible(coefficients, [*coefficients, "head.layers.1.w.scale"])


def job_for(tmp_path, pool, calib, **params):
    specs = [CandidateSpec(str(m), str(m), None, {"task": ""}) for m in pool["models"]]
    p = AdaMergingParams(calibration=str(calib), **params)
    return MergeJob(
        "adamerging", str(pool["base"]), specs, p, plan_dir=str(tmp_path / "plan"), progress=False
    )


def test_bad_input(tmp_path, pool):
    calib = tmp_path / "calib"
    calib.mkdir()
    write_jsonl(calib / "score.jsonl", [{"sentence": "1 2", "label": 0.5}, {"sentence": "3", "label": 1.5}])
    with pytest.raises(FwllmError, match="no calibration task with a predictive distribution"):
        AdaMerging().solve(job_for(tmp_path, pool, calib))
    write_jsonl(calib / "senti.jsonl", [{"sentence": "1 2", "label": 1}, {"sentence": "3", "label": 0}])
    with pytest.raises(FwllmError, match="classification rows, which a causal model cannot score"):
        AdaMerging().solve(job_for(tmp_path, pool, calib))
    with pytest.raises(FwllmError, match="unknown parameter 'lambda_init'"):
        AdaMerging().validate_params({"lambda_init": 0.3})
    assert not os.path.exists(tmp_path / "plan" / "DONE")


def entropy_at_init(root, experts, head_of, init_lambda=0.3):
    """Mean over tasks of the mean prediction entropy of base + init_lambda * sum_i tau_i,
    each task's rows scored one at a time under the head of the expert `head_of[task]`."""
    from transformers import RobertaForSequenceClassification

    base, cands, tok = tensors(root / "base"), [tensors(e) for e in experts], roberta_tokenizer()
    per_task = []
    for task, head_owner in head_of.items():
        model = RobertaForSequenceClassification.from_pretrained(head_owner).eval()
        body = {
            n: base[n] + init_lambda * sum(c[n] - base[n] for c in cands)
            for n, _ in model.named_parameters()
            if not n.startswith("classifier.")
        }
        model.load_state_dict(body, strict=False)
        rows = [json.loads(line) for line in (root / "calib" / f"{task}.jsonl").read_text().splitlines()]
        with torch.no_grad():
            logps = [
                torch.log_softmax(model(**tok(r["sentence"], return_tensors="pt")).logits[0], -1)
                for r in rows
            ]
        per_task.append(sum(float(-(lp.exp() * lp).sum()) for lp in logps) / len(rows))
    return sum(per_task) / len(per_task)


def sharpen_heads(experts):
    """Redraw each expert's head so its logits are O(1) and move with the body's features (the
    fixture's near-zero heads give every row ~ln(classes), whichever head scores it)."""
    from transformers import RobertaForSequenceClassification

    for seed, path in enumerate(experts):
        model = RobertaForSequenceClassification.from_pretrained(path)
        torch.manual_seed(seed)
        with torch.no_grad():
            for prm in model.classifier.dense.parameters():
                prm.normal_(0.0, 0.25)  # tanh stays off saturation, so it passes on row differences
            for prm in model.classifier.out_proj.parameters():
                prm.normal_(0.0, 3.0)
        model.save_pretrained(path)


def test_encoder_pool_uses_each_tasks_own_head(tmp_path, monkeypatch):
    from transformers import RobertaForSequenceClassification

    from fwllm.arch.heads import load_heads

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    experts = two_head_encoder_pool(tmp_path, body_noise=0.2)
    sharpen_heads(experts)
    # one-word rows for one task, twelve-word rows for the other: the body's features differ between them
    write_jsonl(tmp_path / "calib" / "two.jsonl", [{"sentence": f"w{i}", "label": i % 2} for i in range(6)])
    write_jsonl(
        tmp_path / "calib" / "three.jsonl",
        [{"sentence": " ".join(f"w{(i * 7 + j) % 20}" for j in range(12)), "label": i % 3} for i in range(6)],
    )
    recipe = write_recipe(
        tmp_path / "enc.yml",
        "adamerging",
        tmp_path / "base",
        experts,
        {"calibration": str(tmp_path / "calib"), "steps": 3, "lr": 0.05},
        per_model=[{"task": "two"}, {"task": "three"}],
    )
    out = tmp_path / "merged"
    merge_recipe(str(recipe), str(out), OPTS)
    assert set(load_heads(str(out))) == {"two", "three"}
    entropy = json.loads((out / "fwllm_plan" / "trace.json").read_text())["entropy"]
    assert entropy[-1] < entropy[0]
    # the first entry is the entropy at lambda = 0.3 everywhere, each task under its own head (in
    # eval mode: no dropout); swapped heads, or one head for both tasks, give other values
    two, three = experts
    own = entropy_at_init(tmp_path, experts, {"two": two, "three": three})
    assert entropy[0] == pytest.approx(own, rel=1e-5)
    for wrong in ({"two": three, "three": two}, {"two": two, "three": two}, {"two": three, "three": three}):
        assert abs(entropy_at_init(tmp_path, experts, wrong) - own) > 1e-3 > 1e-5 * own, wrong
    coefficients = json.loads((out / "fwllm_plan" / "coefficients.json").read_text())["coefficients"]
    assert not any(n.startswith("classifier.") for n in coefficients)
    RobertaForSequenceClassification.from_pretrained(out)
