"""`tiny` pools: seconds-sized models trained on synthetic tasks generated in code.

llama:        prompt "<task> : d d d d d =", response = the digits copied / reversed /
              sorted / incremented. One shared format, so the task vectors conflict under
              plain task arithmetic. Irrelevant experts learn random responses.
roberta:      RoBERTa classifiers (own heads) on word-sequence tasks, one regression task;
              irrelevant experts learn shuffled labels. Base: a briefly MLM-trained body.
roberta-mlm:  masked LMs on distinct synthetic corpora.
"""

from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Tuple

import torch

from fwllm.calibration import CAUSAL, CLASSIFICATION, REGRESSION, UNLABELED, CalibrationTask
from fwllm.experts.pool import Expert, ExpertPool, TaskData, write_rows
from fwllm.experts.train import train

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
LLAMA_WORDS = SPECIALS + [str(d) for d in range(10)] + ["copy", "rev", "sort", "inc", ":", "="]
ROBERTA_WORDS = SPECIALS + [f"w{i}" for i in range(20)]


def word_tokenizer(words: List[str], encoder: bool):
    """A word-level tokenizer trained offline (the vocabulary is the synthetic language)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


# -- llama tasks ------------------------------------------------------------------------
LLAMA_TASKS: Dict[str, Callable[[List[int]], List[int]]] = {
    "copy": lambda d: d,
    "rev": lambda d: d[::-1],
    "sort": lambda d: sorted(d),
    "inc": lambda d: [(x + 1) % 10 for x in d],
}


def llama_rows(task: str, n: int, rng: random.Random, noise: bool = False) -> List[dict]:
    rows = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(5)]
        out = [rng.randint(0, 9) for _ in range(5)] if noise else LLAMA_TASKS[task](digits)
        rows.append({"prompt": f"{task} : {' '.join(map(str, digits))} =", "response": " ".join(map(str, out))})
    return rows


# -- roberta tasks ------------------------------------------------------------------------
def _sentence(rng: random.Random) -> List[int]:
    return [rng.randint(0, 19) for _ in range(6)]


def _words(ids: List[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


ROBERTA_TASKS: Dict[str, Tuple[str, int]] = {  # name -> (kind, num_labels)
    "first_high": (CLASSIFICATION, 2),
    "has_w3": (CLASSIFICATION, 2),
    "last_high": (CLASSIFICATION, 2),
    "mean_score": (REGRESSION, 1),
}


def roberta_rows(task: str, n: int, rng: random.Random) -> List[dict]:
    rows = []
    for _ in range(n):
        a = _sentence(rng)
        if task == "first_high":
            rows.append({"sentence": _words(a), "label": int(a[0] >= 10)})
        elif task == "has_w3":
            if rng.random() < 0.5:
                a[rng.randint(0, 5)] = 3
            rows.append({"sentence": _words(a), "label": int(3 in a)})
        elif task == "last_high":
            rows.append({"sentence": _words(a), "label": int(a[-1] >= 10)})
        else:
            rows.append({"sentence": _words(a), "label": round(sum(a) / len(a) / 4, 3)})
    return rows


def mlm_rows(corpus: str, n: int, rng: random.Random) -> List[dict]:
    rows = []
    for _ in range(n):
        if corpus == "low":
            ids = [rng.randint(0, 9) for _ in range(8)]
        elif corpus == "high":
            ids = [rng.randint(10, 19) for _ in range(8)]
        elif corpus == "repeat":
            x, y = rng.randint(0, 19), rng.randint(0, 19)
            ids = [x, y] * 4
        else:
            ids = [rng.randint(0, 19) for _ in range(8)]
        rows.append({"text": _words(ids)})
    return rows


# -- builders ------------------------------------------------------------------------------
def _save(model, tok, path: str) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _task_data(root: str, name: str, kind: str, calib: List[dict], dev: List[dict], fields=(), labels=None) -> TaskData:
    folder = os.path.join(root, "data", name)
    return TaskData(name, kind, write_rows(os.path.join(folder, "calibration.jsonl"), calib),
                    write_rows(os.path.join(folder, "dev.jsonl"), dev), list(fields), labels)


def build_llama(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(LLAMA_WORDS, encoder=False)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(LLAMA_WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg)
    rng = random.Random(seed)
    # a little generic pre-training: the format, with random targets (no task is learnt)
    mixed = [r for t in LLAMA_TASKS for r in llama_rows(t, 32, rng, noise=True)]
    train(base, tok, CalibrationTask("pretrain", CAUSAL, mixed), 40, 3e-3, 32, seed=seed, device=device, progress=progress)
    base_dir = _save(base.cpu(), tok, os.path.join(root, "base"))
    tasks, experts = {}, []
    for i, task in enumerate(LLAMA_TASKS):
        tasks[task] = _task_data(root, task, CAUSAL, llama_rows(task, 32, rng), llama_rows(task, 64, rng))
        model = LlamaForCausalLM.from_pretrained(base_dir)
        train(model, tok, CalibrationTask(task, CAUSAL, llama_rows(task, 256, rng)), 80, 3e-3, 32,
              seed=seed + i + 1, device=device, progress=progress)
        experts.append(Expert(task, _save(model.cpu(), tok, os.path.join(root, "experts", task)), task, True))
    for j in range(2):
        name = f"noise{j}"
        model = LlamaForCausalLM.from_pretrained(base_dir)
        rows = [r for t in LLAMA_TASKS for r in llama_rows(t, 64, rng, noise=True)]
        train(model, tok, CalibrationTask(name, CAUSAL, rows), 80, 3e-3, 32, seed=seed + 100 + j, device=device, progress=progress)
        experts.append(Expert(name, _save(model.cpu(), tok, os.path.join(root, "experts", name)), None, False))
    return ExpertPool(root, "tiny", "llama", base_dir, experts, tasks, seed)


def _roberta_config(num_labels: int = 2):
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=len(ROBERTA_WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2, num_labels=num_labels)


def _mlm_base(root: str, tok, rng, seed: int, device: str, progress: bool) -> str:
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    base = RobertaForMaskedLM(_roberta_config())
    rows = mlm_rows("mixed", 256, rng)
    train(base, tok, CalibrationTask("pretrain", UNLABELED, rows), 40, 2e-3, 32, seed=seed, device=device,
          progress=progress, mlm=True)
    return _save(base.cpu(), tok, os.path.join(root, "base"))


def build_roberta(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import RobertaForSequenceClassification

    tok, rng = word_tokenizer(ROBERTA_WORDS, encoder=True), random.Random(seed)
    base_dir = _mlm_base(root, tok, rng, seed, device, progress)
    tasks, experts = {}, []
    for i, (task, (kind, labels)) in enumerate(ROBERTA_TASKS.items()):
        calib, dev, fit = roberta_rows(task, 32, rng), roberta_rows(task, 96, rng), roberta_rows(task, 256, rng)
        fields = ["sentence"]
        tasks[task] = _task_data(root, task, kind, calib, dev, fields, labels)
        torch.manual_seed(seed + i + 1)
        model = RobertaForSequenceClassification.from_pretrained(base_dir, num_labels=labels)
        train(model, tok, CalibrationTask(task, kind, fit, fields), 120, 2e-3, 32, seed=seed + i + 1,
              device=device, progress=progress)
        experts.append(Expert(task, _save(model.cpu(), tok, os.path.join(root, "experts", task)), task, True))
    for j, source in enumerate(("first_high", "has_w3")):
        name = f"shuffled_{source}"
        rows = roberta_rows(source, 256, rng)
        labels = [r["label"] for r in rows]
        rng.shuffle(labels)
        rows = [dict(r, label=lab) for r, lab in zip(rows, labels)]
        torch.manual_seed(seed + 100 + j)
        model = RobertaForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        train(model, tok, CalibrationTask(name, CLASSIFICATION, rows, ["sentence"]), 120, 2e-3, 32,
              seed=seed + 100 + j, device=device, progress=progress)
        experts.append(Expert(name, _save(model.cpu(), tok, os.path.join(root, "experts", name)), None, False))
    return ExpertPool(root, "tiny", "roberta", base_dir, experts, tasks, seed)


def build_roberta_mlm(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import RobertaForMaskedLM

    tok, rng = word_tokenizer(ROBERTA_WORDS, encoder=True), random.Random(seed)
    base_dir = _mlm_base(root, tok, rng, seed, device, progress)
    tasks, experts = {}, []
    for i, corpus in enumerate(("low", "high", "repeat")):
        tasks[corpus] = _task_data(root, corpus, "mlm", mlm_rows(corpus, 32, rng), mlm_rows(corpus, 96, rng))
        model = RobertaForMaskedLM.from_pretrained(base_dir)
        train(model, tok, CalibrationTask(corpus, UNLABELED, mlm_rows(corpus, 256, rng)), 80, 2e-3, 32,
              seed=seed + i + 1, device=device, progress=progress, mlm=True)
        experts.append(Expert(corpus, _save(model.cpu(), tok, os.path.join(root, "experts", corpus)), corpus, True))
    return ExpertPool(root, "tiny", "roberta-mlm", base_dir, experts, tasks, seed)


BUILDERS = {"llama": build_llama, "roberta": build_roberta, "roberta-mlm": build_roberta_mlm}
