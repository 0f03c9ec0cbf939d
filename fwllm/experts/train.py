"""Small, deterministic fine-tuning loops used to build experts (full or LoRA)."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from fwllm.calibration import CalibrationTask
from fwllm.objectives import batch_loss_sum, encode_task


def mlm_batches(rows: List[dict], tokenizer, batch_size: int, max_length: int, seed: int, p: float = 0.15) -> List[Dict[str, torch.Tensor]]:
    """Masked-LM batches with a fixed (seeded) 15% mask, so training is reproducible."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    batches = []
    for start in range(0, len(rows), batch_size):
        enc = tokenizer([r["text"] for r in rows[start:start + batch_size]], truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt")
        ids = enc["input_ids"].clone()
        maskable = enc["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(special)))
        chosen = (torch.rand(ids.shape, generator=g) < p) & maskable
        chosen[:, 1] |= maskable[:, 1] & ~chosen.any(1)  # at least one target per row
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        ids[chosen] = tokenizer.mask_token_id
        batches.append({"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def _mlm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             batch["labels"].reshape(-1), ignore_index=-100)


def train(model, tokenizer, task: CalibrationTask, steps: int, lr: float, batch_size: int = 16,
          max_length: int = 128, seed: int = 0, device: str = "cpu", desc: Optional[str] = None,
          progress: bool = True, mlm: bool = False) -> float:
    """Adam on the task's own loss (response CE, CE/MSE on labels, or MLM); returns the last loss."""
    torch.manual_seed(seed)
    model.to(device).train()
    if mlm:
        batches = mlm_batches(task.rows, tokenizer, batch_size, max_length, seed)
    else:
        batches = encode_task(task, tokenizer, max_length, batch_size).batches
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    last = float("nan")
    cycle = itertools.cycle(batches)
    for _ in tqdm(range(steps), desc=desc or f"train {task.name}", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in next(cycle).items()}
        if mlm:
            loss = _mlm_loss(model, batch)
        else:
            denom = max(int((batch["labels"][:, 1:] != -100).sum()), 1) if task.kind == "causal_lm" else len(batch["labels"])
            loss = batch_loss_sum(model, task.kind, batch) / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = loss.item()
    model.eval()
    return last


@torch.no_grad()
def dev_loss(model, tokenizer, task: CalibrationTask, max_length: int = 128, mlm: bool = False, seed: int = 1) -> float:
    """Mean loss on held-out rows (the quantity the tests compare between base and expert)."""
    model.eval()
    if mlm:
        batches = mlm_batches(task.rows, tokenizer, 32, max_length, seed)
        return sum(_mlm_loss(model, b).item() for b in batches) / len(batches)
    enc = encode_task(task, tokenizer, max_length, 16)
    return sum(batch_loss_sum(model, task.kind, b).item() for b in enc.batches) / enc.units
