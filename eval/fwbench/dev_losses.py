"""Mean dev loss per task: the calibration objective on a task's held-out rows."""

from __future__ import annotations

from typing import Dict, List

import torch

from fwllm.data.calibration import read_task
from fwllm.data.objective import encode_tasks
from fwllm.io.models import load_model, load_tokenizer


def dev_losses(model_dir: str, pool, tasks: List[str], max_rows: int, max_length: int) -> Dict[str, float]:
    model, tok = load_model(model_dir, torch.float32), load_tokenizer(model_dir)
    rows = [read_task(pool.tasks[t].dev, name=t, max_rows=max_rows) for t in tasks]
    return encode_tasks(rows, tok, model, max_length=max_length).per_task(model)
