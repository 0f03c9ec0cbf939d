"""Encoder pools: the body is merged, each task keeps its own expert's head."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENC_WORDS as WORDS, encoder_rows as rows, roberta_tokenizer, write_jsonl, write_recipe
from fwllm.arch.heads import load_heads
from fwllm.mergekit_glue.merge import merge_recipe
from mergekit.options import MergeOptions


@pytest.fixture(scope="module")
def encoder_pool(tmp_path_factory):
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification

    from fwllm.data.calibration import CLASSIFICATION, CalibrationTask
    from fwllm.data.objective import encode_tasks

    root, tok = tmp_path_factory.mktemp("enc"), roberta_tokenizer()
    cfg = RobertaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=20,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    (root / "calib").mkdir()
    experts = {}
    for task, labels in (("first_high", 2), ("sum_mod3", 3)):
        write_jsonl(root / "calib" / f"{task}.jsonl", rows(task, 24, 1))
        torch.manual_seed(1)
        model = RobertaForSequenceClassification.from_pretrained(root / "base", num_labels=labels)
        obj = encode_tasks(
            [CalibrationTask(task, CLASSIFICATION, rows(task, 64, 2), ["sentence"])], tok, model
        )
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(30):
            opt.zero_grad()
            obj.backward(model)
            opt.step()
        model.save_pretrained(root / task)
        tok.save_pretrained(root / task)
        experts[task] = root / task
    return root, experts


@pytest.mark.parametrize("gradient", ["full", "layerwise"])
def test_encoder_pool_keeps_each_task_head(tmp_path, encoder_pool, gradient):
    from transformers import RobertaForSequenceClassification

    root, experts = encoder_pool
    recipe = write_recipe(
        tmp_path / "enc.yml",
        "fw_merging",
        root / "base",
        list(experts.values()),
        {
            "calibration": str(root / "calib"),
            "preset": "paper",
            "iterations": 4,
            "scaling": 1.0,
            "step_size": 0.5,
            "gradient": gradient,
        },
        per_model=[{"task": "first_high"}, {"task": "sum_mod3"}],
    )
    out = tmp_path / "merged"
    merge_recipe(str(recipe), str(out), MergeOptions(quiet=True))

    heads = load_heads(str(out))
    assert set(heads) == {"first_high", "sum_mod3"}
    for task, path in experts.items():
        expert = load_file(path / "model.safetensors")
        for name, tensor in heads[task].tensors.items():
            assert torch.equal(tensor, expert[name]), (task, name)
    assert heads["sum_mod3"].num_labels == 3

    model = RobertaForSequenceClassification.from_pretrained(out)  # loads as a normal checkpoint
    assert model.config.num_labels == 2
    merged = load_file(out / "model.safetensors")
    first = load_file(experts["first_high"] / "model.safetensors")
    assert torch.equal(merged["classifier.out_proj.weight"], first["classifier.out_proj.weight"])

    # the body is base + sum_i c_i tau_i with the plan's coefficients
    plan = json.loads((out / "fwllm_plan" / "plan.json").read_text())
    base = load_file(root / "base" / "model.safetensors")
    cands = [load_file(p / "model.safetensors") for p in experts.values()]
    name = "roberta.encoder.layer.0.attention.self.query.weight"
    expected = base[name] + sum(
        c * (cand[name] - base[name]) for c, cand in zip(plan["coefficients"][name], cands)
    )
    assert torch.allclose(merged[name], expected, atol=1e-6)
    assert not any(k.startswith("lm_head") for k in merged)
    assert plan["objective"]["final"] < plan["objective"]["initial"]


def test_adapter_candidate_named_by_task_gets_a_message_that_does_not_ask_for_task(tmp_path, encoder_pool):
    """Regression: a LoRA candidate given `task:` was told to add `task:`; the message must name the
    adapter as the reason (fwllm reads a task's head from a full classifier checkpoint only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaForSequenceClassification

    from fwllm.core.errors import FwllmError

    root, experts = encoder_pool
    base = experts["first_high"]  # a classifier base: the pool is a classifier pool
    torch.manual_seed(3)
    peft_model = get_peft_model(
        RobertaForSequenceClassification.from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "calib").mkdir()
    write_jsonl(tmp_path / "calib" / "first_high.jsonl", rows("first_high", 4, 1))
    adapter = f"{base}+{tmp_path / 'adapter'}"
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        base,
        [adapter, experts["sum_mod3"]],
        {"calibration": str(tmp_path / "calib"), "preset": "paper", "iterations": 1},
        per_model=[{"task": "first_high"}, {"task": "sum_mod3"}],
    )
    with pytest.raises(FwllmError) as err:
        merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    message = str(err.value)
    assert "adapter" in message and "tmp" in message and "first_high" in message
    assert "give the candidate trained on it" not in message  # it was given: do not ask again
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))
