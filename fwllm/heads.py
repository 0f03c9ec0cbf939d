"""Per-task classification heads kept beside a merged encoder body.

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

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from fwllm.errors import FwllmError

HEADS_DIR = "fwllm_heads"
# Encoder heads by architecture prefix: tensors starting with these are task specific.
HEAD_PREFIXES = ("classifier.", "score.")


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


def head_from_model(model: torch.nn.Module) -> TaskHead:
    """Copy the classification head out of a loaded sequence-classification model."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if is_head_tensor(k)}
    if not tensors:
        raise FwllmError(f"{type(model).__name__} has no classification head to keep")
    return TaskHead(tensors, int(model.config.num_labels), getattr(model.config, "problem_type", None))


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
