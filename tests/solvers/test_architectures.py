"""FW-Merging on tiny random models of the architectures mergekit pools hold (GPT-2, Mistral, Qwen2,
Gemma2, Phi3), built offline from transformers' config classes. Each pool is solved from the base
(`init: base`) in RAM (`gradient: full`) and one layer at a time (`gradient: layerwise`, the iterate
in the on-disk store): the two merges are the same merge."""

import json

import pytest
import torch

from conftest import WORDS, load_tensors, merge, task_rows, tiny_tokenizer, write_jsonl


def _configs():
    from transformers import Gemma2Config, GPT2Config, MistralConfig, Phi3Config, Qwen2Config

    small = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "gpt2": lambda: GPT2Config(
            vocab_size=len(WORDS),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        "mistral": lambda: MistralConfig(**small, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**small, tie_word_embeddings=False),
        # a window shorter than a row: both of Gemma2's layer types matter
        "gemma2": lambda: Gemma2Config(
            **small, head_dim=8, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2
        ),
        "phi3": lambda: Phi3Config(**small, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


ARCHITECTURES = ["gpt2", "mistral", "qwen2", "gemma2", "phi3"]


def tiny_arch_pool(root, arch, experts=2, scale=0.05):
    """A random tiny `arch` base with the digit tokenizer, `experts` copies perturbed by scale x std
    noise, and calibration rows of the copy task."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch]())
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "calib").mkdir()
    write_jsonl(root / "calib" / "copy.jsonl", task_rows("copy", 6, seed=1))
    paths = []
    for i in range(experts):
        expert = AutoModelForCausalLM.from_pretrained(root / "base")
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for prm in expert.parameters():
                prm.add_(scale * prm.std() * torch.randn_like(prm))
        expert.save_pretrained(root / f"e{i}")
        paths.append(root / f"e{i}")
    return {"base": root / "base", "calib": root / "calib"}, paths


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_init_base_full_and_layerwise_give_the_same_merge(tmp_path, arch, one_thread):
    pool, experts = tiny_arch_pool(tmp_path, arch)
    outs, traces = {}, {}
    for mode in ("full", "layerwise"):
        params = {
            "calibration": str(pool["calib"]),
            "preset": "paper",
            "iterations": 3,
            "step_size": 0.5,
            "scaling": 1.0,
            "init": "base",
            "gradient": mode,
        }
        outs[mode] = merge(tmp_path, f"{arch}_{mode}", "fw_merging", pool, experts, params)
        traces[mode] = json.loads((outs[mode] / "fwllm_plan" / "trace.json").read_text())["trace"]
    full, layer = load_tensors(outs["full"]), load_tensors(outs["layerwise"])
    assert set(full) == set(layer)
    for name in full:
        assert torch.allclose(full[name], layer[name], atol=1e-5, rtol=1e-5), name
    assert [t["chosen"] for t in traces["full"]] == [t["chosen"] for t in traces["layerwise"]]
    objectives = [[t["objective"] for t in traces[m]] for m in ("full", "layerwise")]
    assert objectives[1] == pytest.approx(objectives[0], rel=1e-5)
    # the solve left the base: some tensor moved (else the two paths would agree trivially)
    base = load_tensors(pool["base"])
    assert any(not torch.equal(full[n], base[n]) for n in full if n in base)


# -- GPT-2 through the other methods: Conv1D weights are [in, out] ------------------------------
# the attention's c_proj is square: its layout cannot be told from its shape
CONV1D_WEIGHTS = (
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.h.1.mlp.c_fc.weight",
    "transformer.h.1.mlp.c_proj.weight",
)


@pytest.fixture(scope="module")
def gpt2_pool(tmp_path_factory):
    """A tiny GPT-2 base and two perturbed experts with a task each (copy, rev)."""
    root = tmp_path_factory.mktemp("gpt2_pool")
    pool, experts = tiny_arch_pool(root, "gpt2", scale=0.1)
    write_jsonl(root / "calib" / "rev.jsonl", task_rows("rev", 6, seed=2))
    return pool, experts


def conv1d_grams_by_hand(model_dir, calib_file, names):
    """X^T X of each Conv1D layer's input over every token of every row, one row at a time (no
    padding), captured by our own hooks."""
    from transformers import GPT2LMHeadModel

    model, tok = GPT2LMHeadModel.from_pretrained(model_dir).eval(), tiny_tokenizer()
    modules, grams = dict(model.named_modules()), {}

    def hook_for(name):
        def hook(module, args):
            x = args[0][0].double()
            grams[name] = x.T @ x + grams.get(name, 0)

        return hook

    handles = [modules[n[: -len(".weight")]].register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for line in calib_file.read_text().splitlines():
            row = json.loads(line)
            response = tok(row["response"], add_special_tokens=False)["input_ids"]
            ids = tok(row["prompt"])["input_ids"] + response
            model(input_ids=torch.tensor([ids + [tok.eos_token_id]]))
    for h in handles:
        h.remove()
    return grams


def test_gpt2_regmean_merges_conv1d_weights_in_their_own_layout(tmp_path, gpt2_pool, monkeypatch, one_thread):
    """y = x W (W [in, out]): RegMean's merge is W = (sum c G~)^-1 sum c G~ W_i, no transpose."""
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    pool, experts = gpt2_pool
    params = {"calibration": str(pool["calib"]), "alpha": 0.9}
    out = merge(
        tmp_path,
        "regmean",
        "regmean",
        pool,
        experts,
        params,
        per_model=[{"task": "copy", "weight": 1.0}, {"task": "rev", "weight": 2.0}],
    )
    grams = [
        conv1d_grams_by_hand(e, pool["calib"] / f"{t}.jsonl", CONV1D_WEIGHTS)
        for e, t in zip(experts, ("copy", "rev"))
    ]
    cands, merged = [load_tensors(e) for e in experts], load_tensors(out)
    for name in CONV1D_WEIGHTS:
        reduced = [
            c * (0.9 * g[name] + 0.1 * torch.diag(torch.diagonal(g[name]))) for g, c in zip(grams, (1, 2))
        ]
        expected = torch.linalg.solve(sum(reduced), sum(r @ w[name].double() for r, w in zip(reduced, cands)))
        assert torch.allclose(merged[name].double(), expected, rtol=1e-4, atol=1e-4), name
        assert not torch.allclose(merged[name], (cands[0][name] + 2 * cands[1][name]) / 3, atol=1e-3), name


def test_gpt2_fisher_and_adamerging(tmp_path, gpt2_pool, monkeypatch, one_thread):
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    pool, experts = gpt2_pool
    base, cands = load_tensors(pool["base"]), [load_tensors(e) for e in experts]
    tasks, params = [{"task": "copy"}, {"task": "rev"}], {"calibration": str(pool["calib"])}
    fisher = load_tensors(merge(tmp_path, "fisher", "fisher", pool, experts, params, per_model=tasks))
    # a Fisher merge is a per-entry weighted mean with weights >= 0: between the two experts, entry by entry
    for name, value in fisher.items():
        lo, hi = torch.minimum(cands[0][name], cands[1][name]), torch.maximum(cands[0][name], cands[1][name])
        assert bool(((value >= lo - 1e-6) & (value <= hi + 1e-6)).all()), name
    average = {n: (cands[0][n] + cands[1][n]) / 2 for n in CONV1D_WEIGHTS}
    assert any(not torch.allclose(fisher[n], average[n], atol=1e-5) for n in CONV1D_WEIGHTS)

    out = merge(tmp_path, "ada", "adamerging", pool, experts, {"calibration": str(pool["calib"]), "steps": 3})
    coefficients = json.loads((out / "fwllm_plan" / "coefficients.json").read_text())["coefficients"]
    merged = load_tensors(out)
    assert set(CONV1D_WEIGHTS) <= set(coefficients)
    for name, cs in coefficients.items():
        expected = base[name] + sum(c * (cand[name] - base[name]) for c, cand in zip(cs, cands))
        assert torch.allclose(merged[name], expected, atol=1e-6), name
