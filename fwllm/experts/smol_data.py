"""Training / calibration / dev rows for the `smol` pool, cut from the shared real data.

Prompt layouts follow fwllm's lm-eval tasks (fwllm/_data/eval_tasks), so an expert's training helps
on the very prompts it is later scored on. Every split is a fixed slice of its source
file, disjoint from the other splits of the same task.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Dict, List

from fwllm.experts.rows import read_rows

CALIB_ROWS, DEV_ROWS = 32, 64


@dataclass
class SmolTask:
    """Rows of one expert: `fit` trains it; `calibration` / `dev` exist only for relevant tasks."""

    name: str
    fit: List[dict]
    calibration: List[dict] = field(default_factory=list)
    dev: List[dict] = field(default_factory=list)


def _read(root: str, rel: str) -> List[dict]:
    return read_rows(os.path.join(root, rel))


def _gsm8k(q: dict) -> dict:
    return {"prompt": f"Question: {q['question']}\nAnswer:", "response": " " + q["answer"]}


def _pubmedqa(r: dict) -> dict:
    abstract = "\n".join(r["contexts"])
    return {
        "prompt": f"Abstract: {abstract}\nQuestion: {r['question']}\nAnswer:",
        "response": " " + r["final_decision"],
    }


def _sst2(r: dict) -> dict:
    label = ["negative", "positive"][int(r["label"])]
    return {
        "prompt": f"{r['sentence']}\nQuestion: Is the sentiment of this sentence positive or negative?\nAnswer:",
        "response": " " + label,
    }


def _code(r: dict) -> dict:
    # the source's literal "</s>" is a LLaMA-2 end marker, not text; our rows end with the tokenizer's eos
    response = r["response"][:-4] if r["response"].endswith("</s>") else r["response"]
    return {"prompt": r["prompt"], "response": response}


def _article(prompt: str) -> str:
    return prompt.split(":", 1)[1].strip() if prompt.startswith("Summarize") else prompt


def relevant_tasks(root: str) -> Dict[str, SmolTask]:
    gsm_train = _read(root, "gsm8k/train.jsonl")
    pubmed = _read(root, "pubmedqa/train.jsonl")
    code = _read(root, "calibration/code.jsonl")
    sst2 = _read(root, "glue/sst2/calibration.jsonl")
    n = CALIB_ROWS
    return {
        # GSM8K: dev from gsm8k/dev.jsonl (test lines 1-319), never trained on
        "math": SmolTask(
            "math",
            [_gsm8k(r) for r in gsm_train[:240]],
            [_gsm8k(r) for r in gsm_train[240 : 240 + n]],
            [_gsm8k(r) for r in _read(root, "gsm8k/dev.jsonl")[:DEV_ROWS]],
        ),
        "pubmedqa": SmolTask(
            "pubmedqa",
            [_pubmedqa(r) for r in pubmed[:200]],
            [_pubmedqa(r) for r in pubmed[200 : 200 + n]],
            [_pubmedqa(r) for r in pubmed[200 + n : 200 + n + DEV_ROWS]],
        ),
        # only 100 code rows exist: 44 train, 24 calibration, 32 dev
        "code": SmolTask(
            "code",
            [_code(r) for r in code[:44]],
            [_code(r) for r in code[44:68]],
            [_code(r) for r in code[68:100]],
        ),
        # SST-2 train rows (the GLUE calibration file) for training + calibration; dev from GLUE validation
        "sst2": SmolTask(
            "sst2",
            [_sst2(r) for r in sst2[:68]],
            [_sst2(r) for r in sst2[68:100]],
            [_sst2(r) for r in _read(root, "glue/sst2/dev.jsonl")[:DEV_ROWS]],
        ),
    }


def irrelevant_tasks(root: str, tokenizer, seed: int) -> Dict[str, SmolTask]:
    """Experts nobody evaluates: real but off-target skills, and pure noise."""
    rng = random.Random(seed)
    cnn = _read(root, "calibration/cnn.jsonl")
    gsm_train = _read(root, "gsm8k/train.jsonl")
    # summaries of the start of each article (the whole article would not fit our 192 tokens)
    summarize = [
        {
            "prompt": "Summarize the following article: " + " ".join(_article(r["prompt"]).split()[:90]),
            "response": " " + r["response"],
        }
        for r in cnn
    ]
    # word reversal on news text: a real, learnable skill unrelated to the eval tasks
    reverse = []
    for r in cnn:
        words = _article(r["prompt"]).split()
        for start in (0, 40):
            chunk = words[start : start + 24]
            reverse.append(
                {
                    "prompt": "Reverse the order of the words: " + " ".join(chunk) + "\nReversed:",
                    "response": " " + " ".join(reversed(chunk)),
                }
            )
    # prompts answered by another prompt's response: nothing to learn but the noise
    mixed = [_gsm8k(r) for r in gsm_train[2000:2100]] + summarize
    responses = [r["response"] for r in mixed]
    rng.shuffle(responses)
    shuffled = [dict(r, response=resp) for r, resp in zip(mixed, responses)]
    # random tokens in, random tokens out
    vocab = len(tokenizer)
    noise = [
        {
            "prompt": tokenizer.decode([rng.randrange(200, vocab) for _ in range(48)]),
            "response": " " + tokenizer.decode([rng.randrange(200, vocab) for _ in range(32)]),
        }
        for _ in range(200)
    ]
    return {
        name: SmolTask(name, rows)
        for name, rows in {
            "summarize": summarize,
            "reverse": reverse,
            "shuffled": shuffled,
            "noise": noise,
        }.items()
    }
