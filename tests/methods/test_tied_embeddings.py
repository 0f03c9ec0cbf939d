"""Tied embeddings under LoRA adapters merge as peft's `merge_and_unload` does.

`modules_to_save=["embed_tokens"]` replaces only the embedding: peft leaves the LM head on the
base embedding and unties the config. LoRA factors on the embedding are merged in place into
the shared weight, so there the tie stays. The truth is peft itself.
"""

import json

import pytest
import torch
from mergekit.options import MergeOptions

from conftest import WORDS, task_rows, tiny_tokenizer, write_jsonl, write_recipe
from fwllm.mergekit_glue.merge import merge_recipe

IDS = torch.tensor([[1, 14, 16, 4, 5, 6, 7, 17, 8, 9]])


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "calib").mkdir()
    write_jsonl(root / "calib" / "copy.jsonl", task_rows("copy", 8, seed=1))
    return root


def make_adapter(root, name, **lora):
    """A peft adapter whose trainable weights (LoRA factors, saved modules) are set by hand."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.requires_grad:
                prm.add_(0.1 * torch.randn_like(prm))
    model.save_pretrained(root / name)
    return root / name


def peft_merged(root, adapter):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(root / "base")
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def fwllm_merged(root, adapter, method, out):
    """One adapter merged with coefficient 1: Fisher over one candidate is that candidate (the plan
    stores the merge, mergekit sees the base only); AdaMerging with no step keeps lambda = 1
    (mergekit merges the adapter itself and hands it over)."""
    from transformers import LlamaForCausalLM

    params = {"calibration": str(root / "calib")}
    if method == "adamerging":
        params.update(steps=0, init_lambda=1.0)
    recipe = write_recipe(
        root / f"{out}.yml",
        method,
        root / "base",
        [f"{root / 'base'}+{adapter}"],
        params,
        per_model=[{"task": "copy"}],
    )
    merge_recipe(str(recipe), str(root / out), MergeOptions(quiet=True, lora_merge_cache=str(root / "lc")))
    return LlamaForCausalLM.from_pretrained(root / out).eval()


def assert_same_model(ours, theirs):
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, theirs(IDS).logits, atol=1e-5)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.parametrize("method", ["fisher", "adamerging"])
def test_saved_embedding_unties_the_head_as_peft_does(tied_base, method, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tied_base / f"cache-{method}"))
    adapter = make_adapter(tied_base, "saved", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    theirs = peft_merged(tied_base, adapter)
    ours = fwllm_merged(tied_base, adapter, method, f"out-{method}")
    assert not theirs.config.tie_word_embeddings
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tied_base / "base")
    assert torch.equal(theirs.lm_head.weight, base.model.embed_tokens.weight)
    assert not torch.allclose(theirs.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=1e-3)
    assert_same_model(ours, theirs)
    config = json.loads((tied_base / f"out-{method}" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


def test_lora_factors_on_the_embedding_keep_the_tie(tied_base, monkeypatch):
    monkeypatch.setenv("FWLLM_CACHE", str(tied_base / "cache-factors"))
    adapter = make_adapter(tied_base, "factors", target_modules=["q_proj", "embed_tokens"])
    theirs = peft_merged(tied_base, adapter)
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight  # peft merged in place: still tied
    ours = fwllm_merged(tied_base, adapter, "fisher", "out-factors")
    assert_same_model(ours, theirs)
