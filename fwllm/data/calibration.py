"""Reading and validating calibration rows.

A calibration source is a `.jsonl` file (one task, named after the file) or a folder of
`.jsonl` files (one task per file). Each row is one JSON object of one of three kinds:

* ``{"prompt", "response"}``            causal LM: cross-entropy on the response tokens
* ``{<text fields>, "label"}``           classification (int label) or regression (float)
* ``{"text"}``                           unlabeled: entropy of the model's predictions

All rows of one task must be of the same kind; a broken row is reported with its line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from fwllm.core.errors import FwllmError

CAUSAL = "causal_lm"
CLASSIFICATION = "classification"
REGRESSION = "regression"
UNLABELED = "unlabeled"

# GLUE-style text field order: the first two present become (text, text_pair).
TEXT_FIELD_ORDER = (
    "sentence", "sentence1", "sentence2", "question", "question1", "question2",
    "premise", "hypothesis", "text", "text_pair",
)


@dataclass
class CalibrationTask:
    name: str
    kind: str
    rows: List[dict]
    text_fields: List[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_labels(self) -> Optional[int]:
        if self.kind == CLASSIFICATION:
            return max(int(r["label"]) for r in self.rows) + 1
        if self.kind == REGRESSION:
            return 1
        return None


def _row_kind(row: dict, where: str) -> str:
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise FwllmError(f"{where}: causal-LM rows need string 'prompt' and 'response'")
        return CAUSAL
    if "label" in row:
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise FwllmError(f"{where}: 'label' must be a number, got {label!r}")
        if isinstance(label, float) and not math.isfinite(label):
            raise FwllmError(f"{where}: 'label' is not finite ({label!r})")
        if not any(isinstance(row.get(f), str) for f in TEXT_FIELD_ORDER):
            raise FwllmError(
                f"{where}: labelled rows need a text field (one of {', '.join(TEXT_FIELD_ORDER)})"
            )
        return REGRESSION if isinstance(label, float) else CLASSIFICATION
    if isinstance(row.get("text"), str):
        return UNLABELED
    raise FwllmError(
        f"{where}: row has none of 'prompt'+'response', '<text>'+'label' or 'text' (keys: {sorted(row)})"
    )


def read_task(path: str, name: Optional[str] = None, max_rows: Optional[int] = None) -> CalibrationTask:
    """Read one `.jsonl` file as a task; every problem names the file and line."""
    if not os.path.isfile(path):
        raise FwllmError(f"calibration file not found: {path}")
    rows, kinds = [], set()
    with open(path, encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FwllmError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise FwllmError(f"{where}: expected a JSON object, got {type(row).__name__}")
            kind = _row_kind(row, where)
            if kinds and kind not in kinds:
                # int and float labels may mix in a regression file (e.g. 3 and 2.5).
                if {kind} | kinds == {CLASSIFICATION, REGRESSION}:
                    kind = REGRESSION
                    kinds = {REGRESSION}
                else:
                    raise FwllmError(f"{where}: row kind {kind} differs from earlier rows ({kinds.pop()})")
            kinds.add(kind)
            rows.append(row)
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise FwllmError(f"{path}: no calibration rows")
    kind = kinds.pop()
    if kind == REGRESSION:
        for row in rows:
            row["label"] = float(row["label"])
    elif kind == CLASSIFICATION and any(int(r["label"]) < 0 for r in rows):
        raise FwllmError(f"{path}: classification labels must be >= 0")
    fields = [f for f in TEXT_FIELD_ORDER if f in rows[0] and f != "label"][:2] if kind != CAUSAL else []
    task_name = name or os.path.splitext(os.path.basename(path))[0]
    return CalibrationTask(task_name, kind, rows, fields, source=path)


def load_calibration(path: str, max_rows: Optional[int] = None) -> List[CalibrationTask]:
    """All tasks in a `.jsonl` file, a folder of them (task = file stem), or a folder of
    task folders each holding `calibration.jsonl` (task = folder name, the shared GLUE layout)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
        if files:
            return [read_task(os.path.join(path, f), max_rows=max_rows) for f in files]
        nested = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "calibration.jsonl")))
        if not nested:
            raise FwllmError(f"calibration folder {path} holds no .jsonl files (nor <task>/calibration.jsonl)")
        return [read_task(os.path.join(path, d, "calibration.jsonl"), name=d, max_rows=max_rows) for d in nested]
    if not os.path.exists(path):
        raise FwllmError(f"calibration data not found: {path}")
    return [read_task(path, max_rows=max_rows)]


def select_tasks(tasks: Sequence[CalibrationTask], names: Sequence[str]) -> List[CalibrationTask]:
    by_name = {t.name: t for t in tasks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FwllmError(f"no calibration task named {missing}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]
