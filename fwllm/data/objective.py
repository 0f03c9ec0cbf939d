"""The calibration objective every data-informed method minimises or measures.

`Objective.backward(model)` runs each micro-batch forward and backward, so only one
micro-batch of activations is alive at a time, and returns the objective value: the mean
over tasks of each task's mean loss. `Objective.sample` gives the minibatch objective a
stochastic FW iteration uses.

* causal LM rows     -> token-mean cross-entropy on response tokens only
* classification     -> cross-entropy; regression (float label) -> squared error
* unlabeled ``text`` -> mean entropy of the model's predictions (`fwllm.data.positions`)
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from fwllm.arch.heads import using_head
from fwllm.arch.kinds import CAUSAL_MODEL, PLAIN_HEAD_CAUSAL_LMS, model_kind
from fwllm.core.errors import FwllmError
from fwllm.data.calibration import CAUSAL, CLASSIFICATION, REGRESSION, CalibrationTask
from fwllm.data.encoding import EncodedTask, check_rows_fit, encode_task
from fwllm.data.positions import predicted_positions


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of logits [P, C]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _causal_loss_sum(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if type(model).__name__ in PLAIN_HEAD_CAUSAL_LMS:  # project only the response positions
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        at, targets = predicted_positions(hidden, batch, CAUSAL, CAUSAL_MODEL)
        logits = model.lm_head(at)
    else:
        logits, targets = predicted_positions(model(**inputs).logits, batch, CAUSAL, CAUSAL_MODEL)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def batch_loss_sum(model: torch.nn.Module, kind: str, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed (not averaged) loss of one micro-batch, so tasks can be averaged exactly."""
    if kind == CAUSAL:
        return _causal_loss_sum(model, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    if kind == CLASSIFICATION:
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    if kind == REGRESSION:
        return F.mse_loss(logits.float().squeeze(-1), batch["labels"], reduction="sum")
    at, _ = predicted_positions(logits, batch, kind, model_kind(model))
    return entropy(at).sum()  # unlabeled rows: the entropy of each prediction


def _move(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Objective:
    """Mean over tasks of the task's mean loss, on fixed pre-tokenized calibration rows."""

    def __init__(self, tasks: Sequence[EncodedTask]):
        if not tasks:
            raise FwllmError("the objective needs at least one calibration task")
        self.tasks = list(tasks)

    def terms(self, model, device=None):
        """(task, weight, micro-batch on `device`) for every micro-batch, under the task's head."""
        device = device if device is not None else next(model.parameters()).device
        for task in self.tasks:
            scale = 1.0 / (task.units * len(self.tasks))
            with using_head(model, task.head):
                for batch in task.batches:
                    yield task, scale, _move(batch, device)

    def sample(self, step: int, per_task: int, seed: int = 0) -> "Objective":
        """The minibatch objective of stochastic iteration `step`: `per_task` micro-batches of
        each task, each task's loss averaged over the units it drew.

        Each task's micro-batches are dealt in epochs: a seeded shuffle cut into windows of
        `per_task`, one window per step, so every row is used once per epoch. A task with no
        more micro-batches than `per_task` is used whole."""
        tasks = []
        for task in self.tasks:
            count = len(task.batches)
            if per_task <= 0 or count <= per_task:
                tasks.append(task)
                continue
            windows = -(-count // per_task)
            epoch, window = divmod(step, windows)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{task.name}/{epoch}".encode()))
            picked = torch.randperm(count, generator=gen)[
                window * per_task : (window + 1) * per_task
            ].tolist()
            units = [task.batch_units[i] for i in picked]
            tasks.append(
                replace(
                    task,
                    batches=[task.batches[i] for i in picked],
                    units=max(sum(units), 1),
                    batch_units=units,
                )
            )
        return Objective(tasks)

    def is_sampled_by(self, per_task: int) -> bool:
        """Whether `sample(.., per_task)` leaves any task out in part (else it is this objective)."""
        return per_task > 0 and any(len(t.batches) > per_task for t in self.tasks)

    @staticmethod
    def check_finite(task: EncodedTask, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FwllmError(f"calibration loss on task {task.name!r} is not finite ({loss.item()})")

    def backward(self, model: torch.nn.Module) -> float:
        """Accumulate d(objective)/d(params) into `.grad`; return the objective value."""
        total = 0.0
        for task, scale, batch in self.terms(model):
            loss = batch_loss_sum(model, task.kind, batch) * scale
            self.check_finite(task, loss)
            loss.backward()
            total += loss.item()
        return total

    @torch.no_grad()
    def value(self, model: torch.nn.Module, device=None) -> float:
        return sum((batch_loss_sum(model, t.kind, b) * s).item() for t, s, b in self.terms(model, device))

    @torch.no_grad()
    def per_task(self, model: torch.nn.Module) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for task, scale, batch in self.terms(model):
            out[task.name] = (
                out.get(task.name, 0.0) + batch_loss_sum(model, task.kind, batch).item() / task.units
            )
        return out


def encode_tasks(
    tasks: Sequence[CalibrationTask],
    tokenizer,
    model: torch.nn.Module,
    max_length: int = 256,
    batch_size: int = 8,
    heads: Optional[Dict[str, torch.nn.Module]] = None,
) -> Objective:
    """Validate rows against the model type, tokenize them, and attach per-task heads."""
    kind = model_kind(model)
    encoded = []
    for task in tasks:
        check_rows_fit(task, kind)
        enc = encode_task(task, tokenizer, max_length, batch_size, kind)
        if heads and task.name in heads:
            enc.head = heads[task.name]
        encoded.append(enc)
    return Objective(encoded)
