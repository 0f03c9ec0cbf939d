"""`tiny` pools: seconds-sized models trained on synthetic tasks generated in code.

llama:        prompt "<task> : d d d d d =", response = the digits copied / reversed /
              sorted / incremented. One shared format and the same digits, so each task
              vector rewires the same attention/MLP paths differently and plain task
              arithmetic makes them interfere. Irrelevant experts learn random responses in
              that very format, which pulls a sum of task vectors towards noise. The base
              is pre-trained on other digit maps (rotate, decrement, swap ends): it has
              generic copy/position skills, like a real base model, but none of the tasks.
roberta:      RoBERTa sequence classifiers (each with its own head) on word-sequence tasks:
              two single-sentence tasks, one sentence-pair task and one regression task
              (the `label` of STS-B-like rows is a float);
              irrelevant experts learn shuffled labels. Base: a briefly MLM-trained body.
roberta-mlm:  masked LMs on distinct synthetic corpora.
"""

from __future__ import annotations

import json
import os
import random
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from fwllm.experts.pool import Expert, ExpertPool, TaskData
from fwllm.experts.rows import CAUSAL, CLASSIFICATION, MLM, REGRESSION, write_rows
from fwllm.experts.train import train

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2, unk 3
LLAMA_WORDS = (
    SPECIALS
    + [str(d) for d in range(10)]
    + ["copy", "rev", "sort", "inc", "rot", "dec", "swap", "neg", "first", ":", "="]
)
ROBERTA_WORDS = SPECIALS + [f"w{i}" for i in range(20)]
CALIB_ROWS, DEV_ROWS = 32, 64
DIGITS = 5  # llama task length


def word_tokenizer(words: List[str], encoder: bool):
    """A word-level tokenizer built offline: the vocabulary is the whole synthetic language."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if encoder:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def unique_rows(draw: Callable[[], dict], sizes: Sequence[int]) -> List[List[dict]]:
    """Split fresh draws into parts of `sizes` with no row in two parts (train/calibration/dev)."""
    seen, parts = set(), []
    for size in sizes:
        part = []
        while len(part) < size:
            row = draw()
            key = json.dumps(row, sort_keys=True)
            if key not in seen:
                seen.add(key)
                part.append(row)
        parts.append(part)
    return parts


def _save(model, tok, path: str) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _task_data(
    root: str, name: str, kind: str, calib: List[dict], dev: List[dict], fields=(), labels=None
) -> TaskData:
    folder = os.path.join(root, "data", name)
    return TaskData(
        name,
        kind,
        write_rows(os.path.join(folder, "calibration.jsonl"), calib),
        write_rows(os.path.join(folder, "dev.jsonl"), dev),
        list(fields),
        labels,
    )


# -- llama ----------------------------------------------------------------------------------
LLAMA_TASKS: Dict[str, Callable[[List[int]], List[int]]] = {
    "copy": lambda d: d,
    "rev": lambda d: d[::-1],
    "sort": lambda d: sorted(d),
    "inc": lambda d: [(x + 1) % 10 for x in d],
}
PRETRAIN_TASKS: Dict[str, Callable[[List[int]], List[int]]] = {
    "rot": lambda d: d[1:] + d[:1],
    "dec": lambda d: [(x - 1) % 10 for x in d],
    "swap": lambda d: d[-1:] + d[1:-1] + d[:1],
}
# irrelevant experts: maps nobody evaluates, plus pure noise
OTHER_TASKS: Dict[str, Callable[[List[int]], List[int]]] = {
    "neg": lambda d: [9 - x for x in d],
    "first": lambda d: d[:1] * len(d),
}
ALL_MAPS = {**LLAMA_TASKS, **PRETRAIN_TASKS, **OTHER_TASKS}


def llama_row(task: str, rng: random.Random, noise: bool = False) -> dict:
    """`noise`: the task's prompt answered by random vocabulary words (nothing learnable)."""
    digits = [rng.randint(0, 9) for _ in range(DIGITS)]
    if noise:
        out = [rng.choice(LLAMA_WORDS[len(SPECIALS) :]) for _ in range(DIGITS)]
    else:
        out = [str(x) for x in ALL_MAPS[task](digits)]
    return {"prompt": f"{task} : {' '.join(map(str, digits))} =", "response": " ".join(out)}


def build_llama(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, rng = word_tokenizer(LLAMA_WORDS, encoder=False), random.Random(seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(LLAMA_WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    mixed = [llama_row(t, rng) for t in PRETRAIN_TASKS for _ in range(256)]
    train(
        base,
        tok,
        mixed,
        CAUSAL,
        80,
        5e-3,
        32,
        seed=seed,
        device=device,
        desc="tiny llama base",
        progress=progress,
    )
    base_dir = _save(base.cpu(), tok, os.path.join(root, "base"))
    tasks, experts = {}, []
    for i, task in enumerate(LLAMA_TASKS):
        fit, calib, dev = unique_rows(lambda: llama_row(task, rng), (512, CALIB_ROWS, DEV_ROWS))
        tasks[task] = _task_data(root, task, CAUSAL, calib, dev)
        model = LlamaForCausalLM.from_pretrained(base_dir)
        train(
            model,
            tok,
            fit,
            CAUSAL,
            80,
            5e-3,
            16,
            seed=seed + i + 1,
            device=device,
            desc=f"expert {task}",
            progress=progress,
        )
        experts.append(Expert(task, _save(model.cpu(), tok, os.path.join(root, "experts", task)), task, True))
    irrelevant = {name: [llama_row(name, rng) for _ in range(512)] for name in OTHER_TASKS}
    irrelevant["noise"] = [llama_row(t, rng, noise=True) for t in LLAMA_TASKS for _ in range(128)]
    for j, (name, rows) in enumerate(irrelevant.items()):
        model = LlamaForCausalLM.from_pretrained(base_dir)
        train(
            model,
            tok,
            rows,
            CAUSAL,
            80,
            5e-3,
            16,
            seed=seed + 100 + j,
            device=device,
            desc=f"expert {name}",
            progress=progress,
        )
        experts.append(
            Expert(name, _save(model.cpu(), tok, os.path.join(root, "experts", name)), None, False)
        )
    return ExpertPool(root, "tiny", "llama", base_dir, experts, tasks, seed)


# -- roberta --------------------------------------------------------------------------------
def _sentence(rng: random.Random, n: int = 6) -> List[int]:
    return [rng.randint(0, 19) for _ in range(n)]


def _words(ids: List[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def _first_high(rng):
    a = _sentence(rng)
    return {"sentence": _words(a), "label": int(a[0] >= 10)}


def _has_w3(rng):
    a = _sentence(rng)
    if rng.random() < 0.5:  # balance the classes
        a[rng.randint(0, 5)] = 3
    return {"sentence": _words(a), "label": int(3 in a)}


def _more_high(rng):
    """Pair task: does sentence2 hold more "high" words (w10-w19) than sentence1? (no ties)"""
    while True:
        a, b = _sentence(rng, 4), _sentence(rng, 4)
        ca, cb = sum(x >= 10 for x in a), sum(x >= 10 for x in b)
        if ca != cb:
            return {"sentence1": _words(a), "sentence2": _words(b), "label": int(cb > ca)}


def _mean_score(rng):
    a = _sentence(rng)
    return {"sentence": _words(a), "label": round(sum(a) / len(a) / 4, 3)}  # 0-4.75, like STS-B's 0-5


# name -> (kind, num_labels, text fields, row generator, training steps)
ROBERTA_TASKS: Dict[str, Tuple[str, int, List[str], Callable, int]] = {
    "first_high": (CLASSIFICATION, 2, ["sentence"], _first_high, 60),
    "has_w3": (CLASSIFICATION, 2, ["sentence"], _has_w3, 60),
    "more_high": (CLASSIFICATION, 2, ["sentence1", "sentence2"], _more_high, 100),
    "mean_score": (REGRESSION, 1, ["sentence"], _mean_score, 60),
}


def _roberta_config(**extra):
    from transformers import RobertaConfig

    # no dropout: the tasks are tiny and noiseless; it also keeps training replayable
    return RobertaConfig(
        vocab_size=len(ROBERTA_WORDS),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=40,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def mlm_row(corpus: str, rng: random.Random) -> dict:
    if corpus == "low":
        ids = [rng.randint(0, 9) for _ in range(8)]
    elif corpus == "high":
        ids = [rng.randint(10, 19) for _ in range(8)]
    elif corpus == "repeat":
        ids = [rng.randint(0, 19), rng.randint(0, 19)] * 4
    else:
        ids = _sentence(rng, 8)
    return {"text": _words(ids)}


def _mlm_body(tok, rng, seed: int, device: str, progress: bool):
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    model = RobertaForMaskedLM(_roberta_config())
    rows = [mlm_row("mixed", rng) for _ in range(256)]
    train(
        model,
        tok,
        rows,
        MLM,
        40,
        2e-3,
        32,
        seed=seed,
        device=device,
        desc="tiny roberta base",
        progress=progress,
    )
    return model.cpu()


def build_roberta(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import RobertaForSequenceClassification

    tok, rng = word_tokenizer(ROBERTA_WORDS, encoder=True), random.Random(seed)
    body = _mlm_body(tok, rng, seed, device, progress)
    # the base is a classifier too (random head), so base and experts share one architecture
    torch.manual_seed(seed)
    base = RobertaForSequenceClassification(_roberta_config(num_labels=2))
    base.roberta.load_state_dict(body.roberta.state_dict())  # neither has a pooler
    base_dir = _save(base, tok, os.path.join(root, "base"))
    tasks, experts = {}, []
    for i, (task, (kind, labels, fields, draw, steps)) in enumerate(ROBERTA_TASKS.items()):
        # fresh rows for every step: with a few hundred rows the pair task is memorised, not learnt
        fit, calib, dev = unique_rows(lambda: draw(rng), (32 * steps, CALIB_ROWS, DEV_ROWS))
        tasks[task] = _task_data(root, task, kind, calib, dev, fields, labels)
        model = _classifier(base_dir, labels, seed + i + 1)
        train(
            model,
            tok,
            fit,
            kind,
            steps,
            2e-3,
            32,
            text_fields=fields,
            seed=seed + i + 1,
            device=device,
            desc=f"expert {task}",
            progress=progress,
        )
        experts.append(Expert(task, _save(model.cpu(), tok, os.path.join(root, "experts", task)), task, True))
    for j, source in enumerate(("first_high", "more_high")):
        name = f"shuffled_{source}"
        _, _, fields, draw, _ = ROBERTA_TASKS[source]
        rows = [draw(rng) for _ in range(256)]
        labels = [r["label"] for r in rows]
        rng.shuffle(labels)  # the text no longer predicts the label: nothing transferable to learn
        rows = [dict(r, label=lab) for r, lab in zip(rows, labels)]
        model = _classifier(base_dir, 2, seed + 100 + j)
        train(
            model,
            tok,
            rows,
            CLASSIFICATION,
            60,
            2e-3,
            32,
            text_fields=fields,
            seed=seed + 100 + j,
            device=device,
            desc=f"expert {name}",
            progress=progress,
        )
        experts.append(
            Expert(name, _save(model.cpu(), tok, os.path.join(root, "experts", name)), None, False)
        )
    return ExpertPool(root, "tiny", "roberta", base_dir, experts, tasks, seed)


def _classifier(base_dir: str, num_labels: int, seed: int):
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)  # each expert's fresh head
    extra = {"problem_type": "regression"} if num_labels == 1 else {}
    return RobertaForSequenceClassification.from_pretrained(
        base_dir, num_labels=num_labels, ignore_mismatched_sizes=True, **extra
    )


def build_roberta_mlm(root: str, seed: int, device: str, progress: bool) -> ExpertPool:
    from transformers import RobertaForMaskedLM

    tok, rng = word_tokenizer(ROBERTA_WORDS, encoder=True), random.Random(seed)
    base_dir = _save(_mlm_body(tok, rng, seed, device, progress), tok, os.path.join(root, "base"))
    tasks, experts = {}, []
    for i, corpus in enumerate(("low", "high", "repeat")):
        fit, calib, dev = unique_rows(lambda: mlm_row(corpus, rng), (256, CALIB_ROWS, DEV_ROWS))
        tasks[corpus] = _task_data(root, corpus, MLM, calib, dev)
        model = RobertaForMaskedLM.from_pretrained(base_dir)
        train(
            model,
            tok,
            fit,
            MLM,
            60,
            2e-3,
            32,
            seed=seed + i + 1,
            device=device,
            desc=f"expert {corpus}",
            progress=progress,
        )
        experts.append(
            Expert(corpus, _save(model.cpu(), tok, os.path.join(root, "experts", corpus)), corpus, True)
        )
    return ExpertPool(root, "tiny", "roberta-mlm", base_dir, experts, tasks, seed)


BUILDERS = {"llama": build_llama, "roberta": build_roberta, "roberta-mlm": build_roberta_mlm}
