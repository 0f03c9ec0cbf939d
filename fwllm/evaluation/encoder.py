"""GLUE evaluation of encoder classifiers (RoBERTa/BERT `...ForSequenceClassification`).

lm-eval scores language-model likelihoods, not classification heads, so encoders are
scored here directly: each GLUE dev row is tokenized as (text, text_pair) with
truncation to 128 tokens (FW-Merging's setting), the head's argmax (or the
regression output for STS-B) is compared with the label using the task's metric
from glue/tasks.json.

A merged encoder keeps one head per task in ``fwllm_heads/`` (see `fwllm.heads`);
each task is scored with its own head on the shared body. A plain fine-tuned
expert without that folder is scored on its config's `finetuning_task` or on the
tasks the caller names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np

from fwllm.arch.heads import HEADS_DIR, apply_head, load_heads
from fwllm.core.errors import FwllmError
from fwllm.io.models import read_config
from fwllm.evaluation import metrics
from fwllm.evaluation.tasks import GLUE_TASKS, eval_data

MAX_LENGTH = 128


def is_encoder_dir(model_dir: str) -> bool:
    """True when the folder's config names a sequence-classification architecture."""
    config = read_config(model_dir)
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_task_info(root: Optional[Path] = None) -> Dict[str, dict]:
    """Per-task metadata from glue/tasks.json (text fields, metric, reference scores)."""
    path = (root or eval_data()) / "glue" / "tasks.json"
    if not path.is_file():
        raise FwllmError(f"GLUE task metadata {path} is missing")
    with open(path, encoding="utf-8") as fp:
        return json.load(fp)["tasks"]


def load_rows(
    task: str, root: Optional[Path] = None, split: str = "dev", limit: Optional[int] = None
) -> List[dict]:
    path = (root or eval_data()) / "glue" / task / f"{split}.jsonl"
    if not path.is_file():
        raise FwllmError(f"GLUE data file {path} is missing")
    rows = []
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def heads_tasks(model_dir: str, config: Optional[dict] = None) -> List[str]:
    """GLUE tasks a model folder can be scored on, in GLUE order."""
    index = os.path.join(model_dir, HEADS_DIR, "heads.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fp:
            names = set(json.load(fp)["tasks"])
        return [t for t in GLUE_TASKS if t in names]
    config = config if config is not None else read_config(model_dir)
    task = (config.get("finetuning_task") or "").lower().replace("-", "")
    return [task] if task in GLUE_TASKS else []


def predict(
    model,
    tokenizer,
    rows: List[dict],
    text_fields: List[str],
    regression: bool,
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    progress=None,
) -> np.ndarray:
    """Class ids (or regression values) for `rows`, in row order."""
    import torch

    device = next(model.parameters()).device
    # RoBERTa has a single token type; a tokenizer that still emits segment ids
    # for the second text would index past its embedding table.
    drop_token_types = getattr(model.config, "type_vocab_size", 2) <= 1
    outputs = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            texts = [[r[f] for r in batch] for f in text_fields]
            enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            if drop_token_types:
                enc.pop("token_type_ids", None)
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()
            outputs.append(logits[:, 0] if regression else logits.argmax(dim=-1))
            if progress is not None:
                progress.update(len(batch))
    return torch.cat(outputs).cpu().numpy()


def evaluate_encoder(
    model_dir: str,
    tasks: Optional[Iterable[str]] = None,
    data: Optional[str] = None,
    batch_size: int = 32,
    max_length: int = MAX_LENGTH,
    device: str = "cpu",
    limit: Optional[int] = None,
    expert_scores: Optional[Dict[str, float]] = None,
    progress: bool = True,
) -> Dict[str, dict]:
    """Score an encoder folder on GLUE dev; {task: {score, metrics, n, normalized, expert_score}}.

    `tasks` defaults to every task the folder has a head for. `score` and the
    metrics are x100; `normalized` = score / expert score x 100, where the expert
    score comes from `expert_scores` (x100, e.g. the experts' own `fwllm eval`
    results) or else glue/tasks.json's reference_finetuned_score.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = eval_data(data)
    info = load_task_info(root)
    config = read_config(model_dir)
    available = heads_tasks(model_dir, config)
    wanted = list(tasks) if tasks is not None else available
    if not wanted:
        raise FwllmError(
            f"{model_dir} has no fwllm_heads/ and no GLUE finetuning_task in its config; "
            "name the GLUE task(s) to score it on"
        )
    heads = load_heads(model_dir)
    missing_heads = [t for t in wanted if heads and t not in heads]
    if missing_heads:
        raise FwllmError(
            f"{model_dir} has no head for {', '.join(missing_heads)} (has: {', '.join(sorted(heads))})"
        )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    results = {}
    for task in wanted:
        meta = info[task]
        if task in heads:
            model = apply_head(model, heads[task])
        elif model.config.num_labels != meta["num_labels"]:
            raise FwllmError(
                f"{model_dir} has {model.config.num_labels} labels but {task} needs {meta['num_labels']}"
            )
        model = model.to(torch.device(device))
        rows = load_rows(task, root, "dev", limit)
        regression = meta["problem_type"] == "regression"
        with tqdm(
            total=len(rows), desc=f"{Path(model_dir).name}:{task}", disable=not progress, leave=False
        ) as bar:
            preds = predict(
                model, tokenizer, rows, meta["text_fields"], regression, batch_size, max_length, bar
            )
        labels = [r["label"] for r in rows]
        parts = metrics.glue_metrics(meta["metric"], labels, preds.tolist())
        score = parts["score"] * 100.0
        expert = (expert_scores or {}).get(task, meta.get("reference_finetuned_score"))
        results[task] = {
            "score": score,
            "metrics": {k: v * 100.0 for k, v in parts.items() if k != "score"},
            "n": len(rows),
            "expert_score": expert,
            "normalized": metrics.normalized_score(score, expert) if expert else None,
        }
    return results
