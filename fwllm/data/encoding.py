"""Calibration rows tokenized once into padded micro-batches of rows of similar length.

The objective is a sum over rows, so their order is free, and sorted rows waste no compute
on padding. Each micro-batch records its *units*: how many predictions it holds
(`fwllm.data.positions`), so every task's loss is a mean over its own predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from fwllm.arch.kinds import CAUSAL_MODEL, CLASSIFIER_MODEL, MASKED_MODEL
from fwllm.core.errors import FwllmError
from fwllm.data.calibration import CAUSAL, CLASSIFICATION, REGRESSION, UNLABELED, CalibrationTask
from fwllm.data.positions import position_count

ALLOWED_ROWS = {
    CAUSAL_MODEL: {CAUSAL, UNLABELED},
    CLASSIFIER_MODEL: {CLASSIFICATION, REGRESSION, UNLABELED},
    MASKED_MODEL: {UNLABELED},
}


def check_rows_fit(task: CalibrationTask, kind: str) -> None:
    if task.kind not in ALLOWED_ROWS[kind]:
        raise FwllmError(
            f"calibration task {task.name!r} has {task.kind} rows, which a {kind} model cannot score "
            f"(allowed: {sorted(ALLOWED_ROWS[kind])})"
        )


@dataclass
class EncodedTask:
    name: str
    kind: str  # the rows' kind
    batches: List[Dict[str, torch.Tensor]]
    units: int  # predictions over all micro-batches (response tokens, rows or positions)
    head: Optional[torch.nn.Module] = field(default=None, repr=False)
    batch_units: List[int] = field(default_factory=list)  # units of each micro-batch
    model_kind: str = CAUSAL_MODEL


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _encode_causal(rows, tokenizer, max_length) -> List[tuple]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + eos
        response = response[: max_length - 1]
        prompt = prompt[-(max_length - len(response)) :]  # keep the end of long prompts
        encoded.append((prompt + response, [-100] * len(prompt) + response))
    return encoded


def _collate_causal(items, pad_id) -> Dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (tok, lab) in enumerate(items):
        ids[i, : len(tok)] = torch.tensor(tok)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(tok)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def by_length(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Row indices in micro-batches of similar length (longest first, ties in file order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_task(
    task: CalibrationTask,
    tokenizer,
    max_length: int = 256,
    batch_size: int = 8,
    model_kind: str = CAUSAL_MODEL,
) -> EncodedTask:
    """Tokenize a task once into padded micro-batches of rows of similar length."""
    batches = []
    if task.kind == CAUSAL:
        encoded = _encode_causal(task.rows, tokenizer, max_length)
        for chunk in by_length([len(ids) for ids, _ in encoded], batch_size):
            batches.append(_collate_causal([encoded[i] for i in chunk], _pad_id(tokenizer)))
    else:
        fields = task.text_fields or ["text"]
        texts = [r[fields[0]] for r in task.rows]
        pairs = [r[fields[1]] for r in task.rows] if len(fields) > 1 else None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token_id = _pad_id(tokenizer)
        lengths = [
            len(ids) for ids in tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
        ]
        for chunk in by_length(lengths, batch_size):
            batch = dict(
                tokenizer(
                    [texts[i] for i in chunk],
                    [pairs[i] for i in chunk] if pairs else None,
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                )
            )
            if task.kind in (CLASSIFICATION, REGRESSION):
                dtype = torch.float32 if task.kind == REGRESSION else torch.long
                batch["labels"] = torch.tensor([task.rows[i]["label"] for i in chunk], dtype=dtype)
            batches.append(batch)
    batch_units = [position_count(b, task.kind, model_kind) for b in batches]
    return EncodedTask(
        task.name,
        task.kind,
        batches,
        max(sum(batch_units), 1),
        batch_units=batch_units,
        model_kind=model_kind,
    )
