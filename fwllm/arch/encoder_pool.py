"""Encoder pools whose experts carry task-specific heads (RoBERTa GLUE experts).

Heads differ in shape between tasks (MNLI 3 labels, STS-B 1) and the base may be a
masked LM, so mergekit cannot merge them as one architecture. For fwllm's methods:

* mergekit merges a *body-only* architecture: mergekit's own definition of the experts'
  class with the head weights removed, registered under a derived name and selected
  through each model reference's `override_architecture`;
* the solve keeps every task's head (from the candidate whose `task` names it) in
  `fwllm_heads/`;
* the output folder is then completed with the first task's head and that expert's
  label config, so it loads as a normal `*ForSequenceClassification` checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

from safetensors.torch import load_file, save_file

from fwllm.arch.heads import is_head_tensor, load_heads
from fwllm.core.errors import FwllmError
from fwllm.io.models import read_config

BODY_PREFIX = "fwllm-body:"
LABEL_KEYS = ("num_labels", "id2label", "label2id", "problem_type", "finetuning_task")


def classifier_arch(model_dirs: List[str]) -> Optional[str]:
    """The sequence-classification class shared by the pool's experts, if it is an encoder pool."""
    archs = {(read_config(d).get("architectures") or [""])[0] for d in model_dirs}
    heads = {a for a in archs if a.endswith("ForSequenceClassification")}
    if not heads:
        return None
    if len(heads) > 1:
        raise FwllmError(f"the pool mixes classifier classes {sorted(heads)}")
    return heads.pop()


def register_body_architecture(arch: str) -> str:
    """mergekit's definition of `arch` minus its head weights, under a derived name."""
    from mergekit.architecture import json_definitions as jd
    from mergekit.architecture.base import ModelArchitecture, ModuleDefinition

    name = BODY_PREFIX + arch
    if name in jd.NAME_TO_ARCH:
        return name
    known = jd.NAME_TO_ARCH.get(arch)
    if not known:
        raise FwllmError(f"mergekit has no architecture definition for {arch}")
    module = known[0].modules["default"].architecture
    definition = module.definition.model_copy(
        update={
            "architectures": [name],
            "pre_weights": [w for w in module.definition.pre_weights if not is_head_tensor(w.name)],
            "post_weights": [w for w in module.definition.post_weights if not is_head_tensor(w.name)],
        }
    )
    body = ModelArchitecture(
        modules={"default": ModuleDefinition(architecture=jd.JsonModuleArchitecture(definition=definition))},
        architectures=[name],
        model_type=known[0].expected_model_type,
    )
    jd.NAME_TO_ARCH[name] = [body]
    return name


def with_body_architecture(config, name: str):
    """A copy of a MergeConfiguration whose every model reference uses the body-only architecture."""

    def override(ref):
        return ref.model_copy(update={"override_architecture": name}) if ref is not None else None

    models = [m.model_copy(update={"model": override(m.model)}) for m in (config.models or [])]
    return config.model_copy(update={"models": models, "base_model": override(config.base_model)})


def attach_primary_head(out_dir: str, task: str, expert_dir: str) -> None:
    """Put `task`'s head into the merged checkpoint and give it that expert's label config."""
    heads = load_heads(out_dir)
    if task not in heads:
        raise FwllmError(f"no head for task {task!r} in {out_dir}")
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as fp:
            index = json.load(fp)
        shard = "model-fwllm-head.safetensors"
        save_file({k: v.contiguous() for k, v in heads[task].tensors.items()}, os.path.join(out_dir, shard))
        index["weight_map"].update({k: shard for k in heads[task].tensors})
        with open(index_path, "w", encoding="utf-8") as fp:
            json.dump(index, fp, indent=2)
    else:
        path = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(path)
        tensors.update(heads[task].tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    cfg = read_config(out_dir)
    expert_cfg = read_config(expert_dir)
    cfg["architectures"] = expert_cfg["architectures"]
    for key in LABEL_KEYS:
        if key in expert_cfg:
            cfg[key] = expert_cfg[key]
    if "id2label" not in expert_cfg:
        cfg["num_labels"] = heads[task].num_labels
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fp:
        json.dump(cfg, fp, indent=2)


def attach_first_task_head(out_dir: str, candidates) -> None:
    """The merged checkpoint carries the head of the first candidate (in recipe order) whose
    `task` has a head in `out_dir/fwllm_heads`."""
    tasks = load_heads(out_dir)
    first = next((c for c in candidates if c.params.get("task") in tasks), None)
    if first is not None:
        attach_primary_head(out_dir, first.params["task"], first.model)
