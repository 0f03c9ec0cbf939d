"""Small, deterministic fine-tuning loops used to build experts (full or LoRA)."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from fwllm.experts.rows import Batch, loss_sum, make_batches


def _to(batch: Batch, device: str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def train(
    model,
    tokenizer,
    rows: Sequence[dict],
    kind: str,
    steps: int,
    lr: float,
    batch_size: int = 16,
    max_length: int = 128,
    text_fields: Sequence[str] = (),
    seed: int = 0,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> List[float]:
    """AdamW on the task's own loss for `steps` batches (cycling the rows); returns the losses.

    Rows are shuffled once with `seed` and batches are built up front, so the same seed
    replays the same updates bit for bit.
    """
    if steps <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=gen).tolist()
    batches = make_batches(
        [rows[i] for i in order], tokenizer, kind, batch_size, max_length, text_fields, seed
    )
    torch.manual_seed(seed)  # dropout (RoBERTa) and anything else drawing from the global generator
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # short runs: warm up briefly then decay linearly, so the last steps settle rather than bounce
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.05, (steps - s) / (steps - warm + 1)))
    )
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        total, units = loss_sum(model, kind, _to(batches[step % len(batches)], device))
        loss = total / max(units, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def dev_loss(
    model,
    tokenizer,
    rows: Sequence[dict],
    kind: str,
    text_fields: Sequence[str] = (),
    max_length: int = 128,
    batch_size: int = 16,
    device: Optional[str] = None,
    seed: int = 1,
) -> float:
    """Mean held-out loss per unit: response token (causal), masked token (MLM) or row."""
    model.eval()
    device = device or str(next(model.parameters()).device)
    total, units = 0.0, 0
    for batch in make_batches(list(rows), tokenizer, kind, batch_size, max_length, text_fields, seed):
        s, n = loss_sum(model, kind, _to(batch, device))
        total, units = total + s.item(), units + n
    return total / max(units, 1)
