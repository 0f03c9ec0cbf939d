"""Held-out GLUE tasks of the quality benchmark (tasks no expert trained on), prompted as in
fwllm's lm-eval YAMLs and scored as multiple choice by fwllm's likelihood scorer."""

from __future__ import annotations

import os
from typing import Iterable, List

import yaml

from fwllm.core.errors import FwllmError
from fwllm.core.paths import eval_tasks_dir
from fwllm.demo.dev_rows import DevBudget, DevTask, dev_task, read_jsonl
from fwllm.evaluation.figures import ACCURACY


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: None)  # hooks are not needed here


def glue_prompt_spec(task: str) -> dict:
    """doc_to_text (a jinja template) and doc_to_choice of `fwllm_glue_<task>`."""
    path = eval_tasks_dir() / f"fwllm_glue_{task}.yaml"
    if not path.is_file():
        raise FwllmError(f"no lm-eval task fwllm_glue_{task} ({path})")
    spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    if not isinstance(spec.get("doc_to_text"), str) or not isinstance(spec.get("doc_to_choice"), list):
        raise FwllmError(f"fwllm_glue_{task}: prompts made by a Python hook are not supported here")
    return spec


def glue_rows(data_root: str, task: str) -> List[dict]:
    import jinja2

    spec = glue_prompt_spec(task)
    template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(spec["doc_to_text"])
    choices = [" " + str(c) for c in spec["doc_to_choice"]]
    rows = read_jsonl(os.path.join(data_root, "glue", task, "dev.jsonl"))
    if any(isinstance(r["label"], float) for r in rows):
        raise FwllmError(f"glue {task}: regression labels are not multiple choice")
    return [{"prompt": template.render(**r), "choices": choices, "gold": int(r["label"])} for r in rows]


def held_out_tasks(names: Iterable[str], budget: DevBudget, data_root: str) -> List[DevTask]:
    return [
        dev_task(n, ACCURACY, glue_rows(data_root, n), False, f"glue/{n}/dev.jsonl", budget) for n in names
    ]
