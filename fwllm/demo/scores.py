"""Per-row scores of a model on dev tasks, cached on disk, and the keys that name what was scored.

A model is scored on a task once: its per-row scores go to WORK/scores/<model key>/<task>-<fingerprint>.json,
where the fingerprint covers the task's rows, the scoring budget, the scoring code and the dtype. Model keys
are content hashes (`model_stamp` of a folder, `digest` of a recipe plus `source_hash` of fwllm's code), so a
score or merge made by other code or from other inputs is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fwllm.demo.dev_rows import DevBudget, DevTask
from fwllm.evaluation import figures as q
from fwllm.evaluation.likelihood import choice_logprobs, response_nll

PACKAGE = Path(__file__).resolve().parent.parent


def digest(*parts) -> str:
    """A short, stable key of JSON-able parts."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_hash(files: Optional[Sequence[Path]] = None, root: Path = PACKAGE) -> str:
    """Hash of fwllm's Python sources (or of `files` under `root`): a merge or score made by
    other code is never reused."""
    h = hashlib.sha1()
    for path in sorted(files if files is not None else root.rglob("*.py")):
        h.update(str(Path(path).relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def files_hash(paths: Sequence[str]) -> str:
    h = hashlib.sha1()
    for p in sorted(paths):
        h.update(os.path.basename(p).encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def model_stamp(folder: str) -> str:
    """A reference model's identity: its path and its weight files' sizes and times."""
    stats = [
        (f, os.path.getsize(os.path.join(folder, f)), int(os.path.getmtime(os.path.join(folder, f))))
        for f in sorted(os.listdir(folder))
        if f.endswith(".safetensors")
    ]
    return digest(os.path.realpath(folder), stats)


class ScoreStore:
    """Per-row scores on disk: OUT/scores/<model key>/<task>-<rows+scoring fingerprint>.json."""

    def __init__(
        self, folder: str, budget: DevBudget, enabled: bool = True, dtype: torch.dtype = torch.float32
    ):
        self.folder, self.enabled = folder, enabled
        scoring = [PACKAGE / "evaluation" / "likelihood.py", PACKAGE / "demo" / "dev_rows.py"]
        self.salt = digest(budget.max_prompt_tokens, budget.max_length, source_hash(scoring), str(dtype))

    def _path(self, key: str, task: DevTask) -> str:
        return os.path.join(self.folder, key, f"{task.name}-{digest(task.fingerprint(), self.salt)}.json")

    def get(self, key: str, task: DevTask) -> Optional[q.RowScores]:
        path = self._path(key, task)
        if not self.enabled or not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        return q.RowScores(
            np.array(data["values"]), None if data["weights"] is None else np.array(data["weights"])
        )

    def put(self, key: str, task: DevTask, scores: q.RowScores, extra: Optional[dict] = None) -> None:
        path = self._path(key, task)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = {
            "task": task.name,
            "values": scores.values.tolist(),
            "weights": None if scores.weights is None else scores.weights.tolist(),
            **(extra or {}),
        }
        with open(path + ".tmp", "w", encoding="utf-8") as fp:
            json.dump(data, fp)
        os.replace(path + ".tmp", path)


def score_task(
    model, tokenizer, task: DevTask, budget: DevBudget, max_batch_tokens: int
) -> Tuple[q.RowScores, dict]:
    if task.metric == q.ACCURACY:
        logprobs = choice_logprobs(model, tokenizer, task.rows, budget.max_prompt_tokens, max_batch_tokens)
        return q.RowScores(q.accuracy_rows(logprobs, [r["gold"] for r in task.rows])), {"logprobs": logprobs}
    nll, count = response_nll(model, tokenizer, task.rows, budget.max_length, max_batch_tokens)
    return q.RowScores(nll, count), {}


class Scorer:
    """Scores models on tasks through the store; a model is loaded only when a score is missing.
    `s` is the run's settings (its `budget` and `max_batch_tokens` are read)."""

    def __init__(
        self,
        store: ScoreStore,
        tokenizer,
        s,
        log: Callable[[str], None],
        dtype: torch.dtype = torch.float32,
    ):
        self.store, self.tokenizer, self.s, self.log, self.dtype = store, tokenizer, s, log, dtype
        self.tokens = 0
        self.seconds = 0.0

    def missing(self, key: str, tasks: Sequence[DevTask]) -> List[DevTask]:
        return [t for t in tasks if self.store.get(key, t) is None]

    def scores(
        self, key: str, tasks: Sequence[DevTask], model_fn: Callable[[], torch.nn.Module]
    ) -> Dict[str, q.RowScores]:
        todo = self.missing(key, tasks)
        if todo:
            model = model_fn().to(self.dtype)
            model.eval()
            for task in todo:
                t0 = time.time()
                scores, extra = score_task(
                    model, self.tokenizer, task, self.s.budget, self.s.max_batch_tokens
                )
                self.seconds += time.time() - t0
                self.store.put(key, task, scores, extra)
                self.log(f"   scored {task.name} ({len(task.rows)} rows, {time.time() - t0:.0f} s)")
        return {t.name: self.store.get(key, t) for t in tasks}
