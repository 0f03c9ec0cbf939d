"""Task rows (the project's jsonl contract) turned into padded tensor batches.

Kept inside `fwllm.experts` on purpose: pools must build the same way whatever the
merging code's objectives do, so the expert builder owns its own (small) encoders.

Row formats: causal LM `{"prompt", "response"}`; classification / regression
`{<text fields>, "label"}`; MLM `{"text"}`.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import torch

CAUSAL, CLASSIFICATION, REGRESSION, MLM = "causal_lm", "classification", "regression", "mlm"
Batch = Dict[str, torch.Tensor]


def read_rows(path: str, max_rows: Optional[int] = None) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            if line.strip():
                rows.append(json.loads(line))
                if max_rows is not None and len(rows) >= max_rows:
                    break
    return rows


def write_rows(path: str, rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        for row in rows:
            fp.write(json.dumps(row) + "\n")
    return path


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def causal_batch(rows: Sequence[dict], tokenizer, max_length: int) -> Batch:
    """Prompt (with the tokenizer's specials) + response + eos; labels only on the response.

    Left padding puts every response at the end of its row, so the loss only needs the
    logits of the last `keep` positions: on a 49k vocabulary that is most of the saving
    when prompts are long and answers short. Position ids restart after the padding.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pairs = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        response = (tokenizer(row["response"], add_special_tokens=False)["input_ids"] + eos)[: max_length - 1]
        prompt = prompt[-(max_length - len(response)) :]  # long prompts keep their end (the question)
        pairs.append((prompt, response))
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, width - n :] = torch.tensor(p + r)
        labels[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - n :] = 1
    keep = max(len(r) for _, r in pairs) + 1  # the position before the first response token predicts it
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
        "keep": torch.tensor(keep),
    }


def labelled_batch(
    rows: Sequence[dict], tokenizer, text_fields: Sequence[str], kind: str, max_length: int
) -> Batch:
    texts = [r[text_fields[0]] for r in rows]
    pairs = [r[text_fields[1]] for r in rows] if len(text_fields) > 1 else None
    batch = dict(
        tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    )
    dtype = torch.float32 if kind == REGRESSION else torch.long
    batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
    return batch


def mlm_batch(
    rows: Sequence[dict], tokenizer, max_length: int, generator: torch.Generator, p: float = 0.15
) -> Batch:
    """A fixed 15% mask drawn from `generator`, so training and dev losses are reproducible."""
    enc = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    ids = enc["input_ids"].clone()
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    maskable = enc["attention_mask"].bool() & ~torch.isin(ids, special)
    chosen = (torch.rand(ids.shape, generator=generator) < p) & maskable
    first = maskable.float().argmax(1)  # every row gets at least one target
    rows_without = ~chosen.any(1)
    chosen[rows_without, first[rows_without]] = maskable[rows_without, first[rows_without]]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids[chosen] = tokenizer.mask_token_id
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}


def make_batches(
    rows: Sequence[dict],
    tokenizer,
    kind: str,
    batch_size: int,
    max_length: int,
    text_fields: Sequence[str] = (),
    seed: int = 0,
) -> List[Batch]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if kind == CAUSAL:
            batches.append(causal_batch(chunk, tokenizer, max_length))
        elif kind == MLM:
            batches.append(mlm_batch(chunk, tokenizer, max_length, generator))
        else:
            batches.append(labelled_batch(chunk, tokenizer, text_fields, kind, max_length))
    return batches


def loss_sum(model, kind: str, batch: Batch) -> tuple:
    """(summed loss, units): units are response tokens, masked tokens or rows."""
    labels = batch["labels"]
    if kind == CAUSAL:
        keep = int(batch["keep"])
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            logits_to_keep=keep,
        ).logits
        targets = labels[:, -keep + 1 :] if keep > 1 else labels[:, :0]
        logits = logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, int((targets != -100).sum())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if kind == MLM:
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, int((labels != -100).sum())
    if kind == REGRESSION:
        return torch.nn.functional.mse_loss(logits.float().squeeze(-1), labels, reduction="sum"), len(labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), len(labels)
