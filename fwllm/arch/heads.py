"""Per-task classification heads: kept beside a merged encoder body, and swapped in to
score each task with its own expert's head.

Layout inside a merged (or expert) model folder::

    fwllm_heads/heads.json          {"tasks": {TASK: {"file": "TASK.safetensors",
                                                     "num_labels": int,
                                                     "problem_type": str | null}}}
    fwllm_heads/TASK.safetensors    the head tensors under their model names
                                    (RoBERTa: classifier.dense.*, classifier.out_proj.*)

The folder's own config/weights stay a normal, loadable transformers checkpoint; the
heads let every task be scored with its own expert's classifier on the merged body.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file

from fwllm.arch.kinds import CLASSIFIER_MODEL, architecture_kind
from fwllm.core.errors import FwllmError
from fwllm.io.models import read_config
from fwllm.io.tensors import TensorReader

HEADS_DIR = "fwllm_heads"
# Encoder heads by architecture prefix: tensors starting with these are task specific.
HEAD_PREFIXES = ("classifier.", "score.")
# Attribute holding a sequence classifier's task head (RoBERTa/BERT: classifier, LLaMA: score).
HEAD_ATTRIBUTES = ("classifier", "score")


@dataclass
class TaskHead:
    tensors: Dict[str, torch.Tensor]
    num_labels: int
    problem_type: Optional[str] = None


def is_head_tensor(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def save_heads(model_dir: str, heads: Dict[str, TaskHead]) -> None:
    folder = os.path.join(model_dir, HEADS_DIR)
    os.makedirs(folder, exist_ok=True)
    index = {}
    for task, head in sorted(heads.items()):
        file = f"{task}.safetensors"
        save_file({k: v.contiguous() for k, v in head.tensors.items()}, os.path.join(folder, file))
        index[task] = {"file": file, "num_labels": head.num_labels, "problem_type": head.problem_type}
    with open(os.path.join(folder, "heads.json"), "w", encoding="utf-8") as fp:
        json.dump({"tasks": index}, fp, indent=2)


def load_heads(model_dir: str) -> Dict[str, TaskHead]:
    """The heads stored with a model folder ({} when it has none)."""
    index_path = os.path.join(model_dir, HEADS_DIR, "heads.json")
    if not os.path.exists(index_path):
        return {}
    with open(index_path, encoding="utf-8") as fp:
        index = json.load(fp)["tasks"]
    return {
        task: TaskHead(
            tensors=load_file(os.path.join(model_dir, HEADS_DIR, meta["file"])),
            num_labels=int(meta["num_labels"]),
            problem_type=meta.get("problem_type"),
        )
        for task, meta in index.items()
    }


def apply_head(model: torch.nn.Module, head: TaskHead) -> torch.nn.Module:
    """Install `head` on a sequence-classification model in place (num_labels may change)."""
    config = model.config
    if config.num_labels != head.num_labels:
        # Rebuild the head modules at the new width, then load the stored tensors.
        config.num_labels = head.num_labels
        config.problem_type = head.problem_type
        fresh = type(model)(config)
        body = {k: v for k, v in model.state_dict().items() if not is_head_tensor(k)}
        fresh.load_state_dict({**body, **head.tensors}, strict=True)
        return fresh
    config.problem_type = head.problem_type
    missing = set(head.tensors) - set(model.state_dict())
    if missing:
        raise FwllmError(f"head tensors {sorted(missing)} do not belong to {type(model).__name__}")
    model.load_state_dict(head.tensors, strict=False)
    return model


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


def head_module(model: torch.nn.Module, head: TaskHead, device) -> torch.nn.Module:
    """A frozen float32 module of `model`'s head class carrying `head`'s tensors (its own width),
    built on the meta device and filled by assignment, so `model` may itself be a skeleton."""
    attr = head_attribute(model)
    cfg = copy.deepcopy(model.config)
    cfg.num_labels = head.num_labels
    with init_empty_weights(include_buffers=False):
        module = getattr(type(model)(cfg), attr)
    prefix = attr + "."
    module.load_state_dict({k[len(prefix) :]: v for k, v in head.tensors.items()}, assign=True)
    module.requires_grad_(False)
    module.eval()  # a freshly built model starts in training mode: its head's dropout would be on
    return module.to(device=device, dtype=torch.float32)


def checkpoint_head(model_dir: str) -> Optional[TaskHead]:
    """A full classifier checkpoint's head, read from its files (no model load)."""
    cfg = read_config(model_dir)
    if architecture_kind((cfg.get("architectures") or ["?"])[0]) != CLASSIFIER_MODEL:
        return None
    reader = TensorReader(model_dir)
    tensors = {n: reader.get(n, dtype=None) for n in reader.names() if is_head_tensor(n)}
    if not tensors:
        return None
    num_labels = len(cfg["id2label"]) if cfg.get("id2label") else int(cfg.get("num_labels", 2))
    return TaskHead(tensors, num_labels, cfg.get("problem_type"))


def task_heads(owners: Dict[str, Tuple[str, Optional[str]]], tasks: Sequence[str]) -> Dict[str, TaskHead]:
    """Each task's head, from the full checkpoint whose per-model `task` names it; `owners[task]` is
    that candidate's (label, checkpoint folder), the folder None for an adapter."""
    heads = {}
    for task in tasks:
        label, folder = owners.get(task, (None, None))
        head = checkpoint_head(folder) if folder else None
        if head is None:
            needs = f"calibration task {task!r} needs a classification head"
            if label is None:
                raise FwllmError(
                    f"{needs}: give the candidate trained on it `parameters: {{task: {task}}}` "
                    "(a full classifier checkpoint, not an adapter)"
                )
            if folder is None:  # the user did name the owner: say why it cannot serve
                raise FwllmError(
                    f"{needs}, but {label} (given `task: {task}`) is an adapter, which "
                    "carries no head fwllm reads; name a full classifier checkpoint trained "
                    "on the task instead"
                )
            raise FwllmError(
                f"{needs}, but {label} (given `task: {task}`) is not a classifier "
                "checkpoint with a head (no *ForSequenceClassification head tensors)"
            )
        heads[task] = head
    return heads
