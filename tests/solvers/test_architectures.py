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

    small = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "gpt2": lambda: GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "mistral": lambda: MistralConfig(**small, tie_word_embeddings=False),
        "qwen2": lambda: Qwen2Config(**small, tie_word_embeddings=False),
        "gemma2": lambda: Gemma2Config(**small, head_dim=8, sliding_window=4, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2),  # a window shorter than a row: both layer types matter
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
        params = {"calibration": str(pool["calib"]), "iterations": 3, "step_size": 0.5, "scaling": 1.0,
                  "init": "base", "gradient": mode}
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
