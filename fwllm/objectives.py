"""Losses on calibration rows: the objective every data-informed method minimises.

Rows are tokenized once (`encode_tasks`) into micro-batches of rows of similar length (the
objective is a sum over rows, so their order is free, and sorted rows waste no compute on
padding); `Objective.backward(model)` then runs each micro-batch forward and backward, so
only one micro-batch of activations is alive at a time, and returns the objective value:
the mean over tasks of each task's mean loss. `Objective.sample` gives the minibatch
objective a stochastic FW iteration uses.

* causal LM rows     -> token-mean cross-entropy on response tokens only
* classification     -> cross-entropy; regression (float label) -> squared error
* unlabeled ``text`` -> mean entropy of the model's predictive distribution
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from fwllm.calibration import CAUSAL, CLASSIFICATION, REGRESSION, UNLABELED, CalibrationTask
from fwllm.errors import FwllmError

CAUSAL_MODEL, CLASSIFIER_MODEL, MASKED_MODEL = "causal", "classifier", "masked"
# Attribute holding a sequence classifier's task head (RoBERTa/BERT: classifier, LLaMA: score).
HEAD_ATTRIBUTES = ("classifier", "score")


def model_kind(model: torch.nn.Module) -> str:
    return architecture_kind(type(model).__name__)


def architecture_kind(name: str) -> str:
    """causal / classifier / masked for a transformers class name (as in config.architectures)."""
    if name.endswith("ForCausalLM"):
        return CAUSAL_MODEL
    if name.endswith("ForSequenceClassification"):
        return CLASSIFIER_MODEL
    if name.endswith("ForMaskedLM"):
        return MASKED_MODEL
    raise FwllmError(f"unsupported model class {name} (need *ForCausalLM, *ForSequenceClassification or *ForMaskedLM)")


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
    kind: str
    batches: List[Dict[str, torch.Tensor]]
    units: int  # response tokens (causal), rows, or predicted positions (entropy)
    head: Optional[torch.nn.Module] = field(default=None, repr=False)
    batch_units: List[int] = field(default_factory=list)  # units of each micro-batch


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
        response = response[:max_length - 1]
        prompt = prompt[-(max_length - len(response)):]  # keep the end of long prompts
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


def _by_length(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Row indices in micro-batches of similar length (longest first, ties in file order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_task(task: CalibrationTask, tokenizer, max_length: int = 256, batch_size: int = 8) -> EncodedTask:
    """Tokenize a task once into padded micro-batches of rows of similar length."""
    batches, batch_units = [], []
    if task.kind == CAUSAL:
        encoded = _encode_causal(task.rows, tokenizer, max_length)
        for chunk in _by_length([len(ids) for ids, _ in encoded], batch_size):
            batch = _collate_causal([encoded[i] for i in chunk], _pad_id(tokenizer))
            batches.append(batch)
            batch_units.append(int((batch["labels"][:, 1:] != -100).sum()))
        return EncodedTask(task.name, task.kind, batches, max(sum(batch_units), 1), batch_units=batch_units)
    fields = task.text_fields or ["text"]
    texts = [r[fields[0]] for r in task.rows]
    pairs = [r[fields[1]] for r in task.rows] if len(fields) > 1 else None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = _pad_id(tokenizer)
    lengths = [len(ids) for ids in tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]]
    for chunk in _by_length(lengths, batch_size):
        batch = dict(tokenizer([texts[i] for i in chunk], [pairs[i] for i in chunk] if pairs else None,
                               truncation=True, max_length=max_length, padding=True, return_tensors="pt"))
        if task.kind in (CLASSIFICATION, REGRESSION):
            dtype = torch.float32 if task.kind == REGRESSION else torch.long
            batch["labels"] = torch.tensor([task.rows[i]["label"] for i in chunk], dtype=dtype)
            batch_units.append(len(chunk))
        else:
            batch_units.append(int(batch["attention_mask"].sum()))
        batches.append(batch)
    return EncodedTask(task.name, task.kind, batches, max(sum(batch_units), 1), batch_units=batch_units)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# Causal LMs whose logits are a plain linear map (`lm_head`) of the decoder's last hidden
# state. For them only the positions that carry a label (response tokens) are projected:
# the vocabulary matmul is a fifth of a small model's compute, and prompts are often half
# the tokens or more. Other classes (logit soft-capping, scaled heads, wrappers) take the
# general path.
PLAIN_HEAD_CAUSAL_LMS = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})


def causal_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy; labels are the unshifted ids with -100 on prompts."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
        reduction="sum",
    )


def _causal_loss_sum(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    if type(model).__name__ not in PLAIN_HEAD_CAUSAL_LMS:
        return causal_loss_from_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                       batch["labels"])
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.lm_head(hidden.last_hidden_state[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


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
    # unlabeled: entropy per predicted position (sequence classifiers predict once per row)
    if logits.dim() == 2:
        return _entropy(logits).sum()
    return (_entropy(logits) * batch["attention_mask"]).sum()


def head_attribute(model: torch.nn.Module) -> Optional[str]:
    return next((a for a in HEAD_ATTRIBUTES if isinstance(getattr(model, a, None), torch.nn.Module)), None)


@contextlib.contextmanager
def using_head(model: torch.nn.Module, head: Optional[torch.nn.Module]) -> Iterator[None]:
    """Run the shared body under one task's own classification head."""
    if head is None:
        yield
        return
    attr = head_attribute(model)
    original = getattr(model, attr)
    setattr(model, attr, head)
    try:
        yield
    finally:
        setattr(model, attr, original)


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
            picked = torch.randperm(count, generator=gen)[window * per_task : (window + 1) * per_task].tolist()
            units = [task.batch_units[i] for i in picked]
            tasks.append(EncodedTask(task.name, task.kind, [task.batches[i] for i in picked], max(sum(units), 1),
                                     task.head, units))
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
            out[task.name] = out.get(task.name, 0.0) + batch_loss_sum(model, task.kind, batch).item() / task.units
        return out


def encode_tasks(
    tasks: Sequence[CalibrationTask], tokenizer, model: torch.nn.Module, max_length: int = 256, batch_size: int = 8,
    heads: Optional[Dict[str, torch.nn.Module]] = None,
) -> Objective:
    """Validate rows against the model type, tokenize them, and attach per-task heads."""
    kind = model_kind(model)
    encoded = []
    for task in tasks:
        check_rows_fit(task, kind)
        enc = encode_task(task, tokenizer, max_length, batch_size)
        if heads and task.name in heads:
            enc.head = heads[task.name]
        encoded.append(enc)
    return Objective(encoded)
