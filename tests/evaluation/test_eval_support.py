"""Tiny offline models for the evaluation tests (helpers only; no tests here).

A byte-level BPE tokenizer is trained on a few lines of the real data with the
`tokenizers` library, so nothing is downloaded; the models are random and small
enough (hidden 32, 2 layers) to run lm-eval end to end in seconds on CPU.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import fwllm

# Same default as fwllm.evaluation.tasks.eval_data (the data shipped in the package), spelled out so
# tests do not lean on it.
DATA = Path(os.environ.get("FWLLM_DATA") or Path(fwllm.__file__).resolve().parent / "_data" / "datasets")
DATA = DATA.resolve()


def _corpus(max_lines: int = 200):
    lines = []
    for rel in ("gsm8k/train.jsonl", "pubmedqa/train.jsonl", "glue/mnli/dev.jsonl", "glue/stsb/dev.jsonl"):
        with open(DATA / rel, encoding="utf-8") as fp:
            for i, line in enumerate(fp):
                if i >= max_lines // 4:
                    break
                lines.append(" ".join(str(v) for v in json.loads(line).values()))
    return lines


def train_tokenizer(kind: str = "llama"):
    """A PreTrainedTokenizerFast with ~400 tokens; `kind` picks LLaMA- or RoBERTa-style specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "llama":
        specials = ["<unk>", "<s>", "</s>"]
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            model_input_names=["input_ids", "attention_mask"],
        )
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer("llama")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_roberta(folder: Path, tasks=("cola", "stsb", "mnli"), seed: int = 0) -> Path:
    """A random RoBERTa body saved with per-task heads (fwllm_heads/) for `tasks`."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fwllm.arch.heads import TaskHead, is_head_tensor, save_heads

    def head_from_model(model):  # the classification head of a freshly built model
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if is_head_tensor(k)}
        return TaskHead(tensors, int(model.config.num_labels), model.config.problem_type)

    labels = {"stsb": 1, "mnli": 3}
    tokenizer = train_tokenizer("roberta")
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=160,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        num_labels=2,
    )
    body = RobertaForSequenceClassification(config)
    heads = {}
    for task in tasks:
        n = labels.get(task, 2)
        cfg = copy.deepcopy(config)
        cfg.num_labels = n
        cfg.problem_type = "regression" if n == 1 else "single_label_classification"
        heads[task] = head_from_model(RobertaForSequenceClassification(cfg))
    body.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_heads(str(folder), heads)
    return folder
