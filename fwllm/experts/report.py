"""How much each expert learnt: own-task dev loss of the base vs the expert."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from fwllm.experts.pool import Expert, ExpertPool
from fwllm.experts.rows import read_rows
from fwllm.experts.train import dev_loss


def load_model(path: str, architecture: Optional[str] = None, device: str = "cpu", **kwargs):
    """A saved model as the class its config names (or `architecture`), in float32."""
    import transformers
    from transformers import AutoConfig

    name = architecture or AutoConfig.from_pretrained(path).architectures[0]
    model = getattr(transformers, name).from_pretrained(path, dtype=torch.float32, **kwargs)
    return model.to(device).eval()


def base_for(pool: ExpertPool, expert_model, device: str = "cpu"):
    """The base as the expert's class; a classifier gets the expert's own head, so the two
    differ only in the fine-tuned body (the base's head never saw the task)."""
    if not hasattr(expert_model, "classifier"):
        return load_model(pool.base, device=device)
    base = load_model(
        pool.base,
        type(expert_model).__name__,
        device,
        num_labels=expert_model.config.num_labels,
        ignore_mismatched_sizes=True,
    )
    base.classifier.load_state_dict(expert_model.classifier.state_dict())
    return base


def own_task_losses(
    pool: ExpertPool,
    expert: Expert,
    max_rows: Optional[int] = None,
    max_length: int = 256,
    device: str = "cpu",
) -> Dict[str, float]:
    """{'base_loss': ..., 'expert_loss': ...} on the dev rows of the expert's task."""
    from transformers import AutoTokenizer

    task = pool.tasks[expert.task]
    rows = read_rows(task.dev, max_rows)
    tok = AutoTokenizer.from_pretrained(expert.path)
    tuned = load_model(expert.path, device=device)
    base = base_for(pool, tuned, device)
    bs = 4 if pool.profile == "smol" else 16
    kw = dict(text_fields=task.text_fields, max_length=max_length, batch_size=bs)
    return {
        "base_loss": dev_loss(base, tok, rows, task.kind, **kw),
        "expert_loss": dev_loss(tuned, tok, rows, task.kind, **kw),
    }


def own_task_table(pool: ExpertPool, max_rows: Optional[int] = 32, device: str = "cpu") -> List[dict]:
    """One row per expert; irrelevant experts have no task, hence no losses."""
    table = []
    for e in pool.experts:
        losses = own_task_losses(pool, e, max_rows, device=device) if e.task else {}
        table.append({"expert": e.name, "task": e.task or "-", "relevant": e.relevant, **losses})
    return table


def format_table(table: List[dict]) -> str:
    lines = ["| expert | task | relevant | base dev loss | expert dev loss |", "|---|---|---|---|---|"]
    for r in table:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("base_loss", "expert_loss")]
        lines.append(
            f"| {r['expert']} | {r['task']} | {'yes' if r['relevant'] else 'no'} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines)
