"""Reading and validating calibration rows.

A calibration source is a `.jsonl` file (one task, named after the file) or a folder of
`.jsonl` files (one task per file). Each row is one JSON object of one of three kinds:

* ``{"prompt", "response"}``            causal LM: cross-entropy on the response tokens
* ``{<text fields>, "label"}``           classification (int label) or regression (float)
* ``{"text"}``                           unlabeled: entropy of the model's predictions

All rows of one task must be of the same kind; a broken row is reported with its file and
line: bytes that are not UTF-8, lines over `MAX_ROW_BYTES`, invalid JSON, a key given twice,
wrong types, and empty `response`, `text` or text fields. `check_labels` then checks
labels against the head that scores them, from its config alone. A source of more than
`MAX_TASKS` tasks, or a task of more than `MAX_TASK_ROWS` rows (unless `max_rows` reads
fewer), is refused before it is read: every task and row costs every iteration.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from fwllm.core.errors import FwllmError

CAUSAL = "causal_lm"
CLASSIFICATION = "classification"
REGRESSION = "regression"
UNLABELED = "unlabeled"

MAX_ROW_BYTES = 1 << 20  # one example; longer lines are mistakes (a data set on one line, a binary file)
MAX_TASKS = 256  # tasks of one source: more than any pool has experts (not a folder of one-row files)
MAX_TASK_ROWS = 100_000  # rows of one task (fwllm.core.params.MAX_ROWS bounds max_rows alike)
_BOM = b"\xef\xbb\xbf"

# GLUE-style text field order: the first two present become (text, text_pair).
TEXT_FIELD_ORDER = (
    "sentence",
    "sentence1",
    "sentence2",
    "question",
    "question1",
    "question2",
    "premise",
    "hypothesis",
    "text",
    "text_pair",
)


@dataclass
class CalibrationTask:
    name: str
    kind: str
    rows: List[dict]
    text_fields: List[str] = field(default_factory=list)
    source: str = ""
    lines: List[int] = field(default_factory=list)  # each row's line in `source`
    float_lines: List[int] = field(default_factory=list)  # lines whose label was written as a float

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
        if not row["response"].strip():
            raise FwllmError(f"{where}: 'response' is empty; there is nothing to score")
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
        if not row["text"].strip():
            raise FwllmError(f"{where}: 'text' is empty; there is nothing to score")
        return UNLABELED
    raise FwllmError(
        f"{where}: row has none of 'prompt'+'response', '<text>'+'label' or 'text' (keys: {sorted(row)})"
    )


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json's object hook: a key given twice is an error (json itself would keep the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_row(raw: bytes, where: str) -> Optional[dict]:
    """One line as a JSON object (None for a blank line); every problem names the file and line."""
    if len(raw) > MAX_ROW_BYTES:
        raise FwllmError(
            f"{where}: the row is longer than {MAX_ROW_BYTES >> 20} MiB; a calibration row is one example"
        )
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FwllmError(
            f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
            f"calibration files are UTF-8 JSON lines"
        ) from None
    if not line.strip():
        return None
    try:
        row = json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise FwllmError(f"{where}: key {err.args[0]!r} appears twice in one row") from None
    except json.JSONDecodeError as err:
        raise FwllmError(f"{where}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise FwllmError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise FwllmError(f"{where}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(row, dict):
        raise FwllmError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _check_text_fields(path: str, rows: List[dict], lines: List[int], fields: List[str]) -> None:
    """Every labelled row carries the task's text fields (those of its first row), non-empty."""
    for row, lineno in zip(rows, lines):
        for f in fields:
            value = row.get(f)
            if not isinstance(value, str) or not value.strip():
                raise FwllmError(
                    f"{path}:{lineno}: {f!r} must be a non-empty string (the task's text fields, "
                    f"from line {lines[0]}, are {fields})"
                )


def read_task(path: str, name: Optional[str] = None, max_rows: Optional[int] = None) -> CalibrationTask:
    """Read one `.jsonl` file as a task; every problem names the file and line."""
    if not os.path.isfile(path):
        raise FwllmError(f"calibration file not found: {path}")
    rows, lines, float_lines, kinds = [], [], [], set()
    with open(path, "rb") as fp:
        # bounded reads: a binary file or a whole data set on one line is refused, not slurped
        for lineno, raw in enumerate(iter(lambda: fp.readline(MAX_ROW_BYTES + 1), b""), start=1):
            where = f"{path}:{lineno}"
            row = _parse_row(raw[3:] if lineno == 1 and raw.startswith(_BOM) else raw, where)
            if row is None:
                continue
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
            lines.append(lineno)
            if isinstance(row.get("label"), float):
                float_lines.append(lineno)
            if max_rows is not None and len(rows) >= max_rows:
                break
            if len(rows) > MAX_TASK_ROWS:
                raise FwllmError(
                    f"{where}: the task has over {MAX_TASK_ROWS} rows, each scored at every "
                    f"iteration: set max_rows (at most {MAX_TASK_ROWS}) to read its first rows"
                )
    if not rows:
        raise FwllmError(f"{path}: no calibration rows")
    kind = kinds.pop()
    if kind == REGRESSION:
        for row in rows:
            row["label"] = float(row["label"])
    elif kind == CLASSIFICATION:
        negative = next((ln for r, ln in zip(rows, lines) if r["label"] < 0), None)
        if negative is not None:
            raise FwllmError(f"{path}:{negative}: classification labels must be >= 0")
    fields = [f for f in TEXT_FIELD_ORDER if f in rows[0] and f != "label"][:2] if kind != CAUSAL else []
    if kind in (CLASSIFICATION, REGRESSION):
        _check_text_fields(path, rows, lines, fields)
    task_name = name or os.path.splitext(os.path.basename(path))[0]
    return CalibrationTask(task_name, kind, rows, fields, source=path, lines=lines, float_lines=float_lines)


def check_labels(task: CalibrationTask, num_labels: int, scorer: str) -> None:
    """A labelled task against the head that scores it (read from its config, no model loaded).

    A K-class classifier (K > 1) needs integer labels 0..K-1; a one-output head is a
    regression head and needs float labels (an integer-only file reads as classification)."""
    if task.kind not in (CLASSIFICATION, REGRESSION):
        return
    if num_labels <= 1:
        if task.kind == CLASSIFICATION:
            raise FwllmError(
                f"{task.source}: task {task.name!r} has integer labels, but {scorer} has a one-output "
                f"(regression) head: write the labels as floats (3.0, not 3)"
            )
        return
    if task.float_lines:
        line = task.float_lines[0]
        label = task.rows[task.lines.index(line)]["label"] if line in task.lines else "?"
        raise FwllmError(
            f"{task.source}:{line}: label {label!r} is not an integer, but {scorer} is a "
            f"{num_labels}-class classifier (labels 0..{num_labels - 1})"
        )
    for row, line in zip(task.rows, task.lines):
        if row["label"] >= num_labels:
            raise FwllmError(
                f"{task.source}:{line}: label {row['label']} is out of range: {scorer} is a "
                f"{num_labels}-class classifier (labels 0..{num_labels - 1})"
            )


def calibration_files(path: str) -> List[Tuple[str, str]]:
    """(task name, file) for every task of a calibration source, as `load_calibration` reads them:
    a `.jsonl` file, a folder of them (task = file stem), or a folder of task folders each
    holding `calibration.jsonl` (task = folder name, the shared GLUE layout)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
        if files:
            return [(os.path.splitext(f)[0], os.path.join(path, f)) for f in files]
        nested = sorted(
            d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "calibration.jsonl"))
        )
        if not nested:
            raise FwllmError(
                f"calibration folder {path} holds no .jsonl files (nor <task>/calibration.jsonl)"
            )
        return [(d, os.path.join(path, d, "calibration.jsonl")) for d in nested]
    if not os.path.exists(path):
        raise FwllmError(f"calibration data not found: {path}")
    return [(os.path.splitext(os.path.basename(path))[0], path)]


def load_calibration(path: str, max_rows: Optional[int] = None) -> List[CalibrationTask]:
    """All tasks of a calibration source (see `calibration_files`); at most `MAX_TASKS`, counted
    before any file is read."""
    files = calibration_files(path)
    if len(files) > MAX_TASKS:
        raise FwllmError(
            f"calibration source {path} holds {len(files)} tasks (one per .jsonl file); at most "
            f"{MAX_TASKS} are allowed: put a task's rows in one file"
        )
    return [read_task(file, name=name, max_rows=max_rows) for name, file in files]


def token_bound(task: CalibrationTask) -> int:
    """An upper bound of the tokens of the task's longest row, from its UTF-8 bytes: a tokenizer makes
    at most one token per byte (byte-level BPE, byte fallback, WordPiece) plus a lone word-start
    marker per text and a few special tokens; doubled for normalisations that expand a character."""
    if task.kind == CAUSAL:
        fields = ["prompt", "response"]
    else:
        fields = task.text_fields or ["text"]
    longest = max(sum(len(str(r.get(f, "")).encode("utf-8")) for f in fields) for r in task.rows)
    return 2 * longest + 8


def micro_batch_shape(tasks: Sequence[CalibrationTask], batch_size: int, max_length: int) -> Tuple[int, int]:
    """(rows, tokens) of the largest micro-batch the tasks can make: rows are batched by length, so
    the longest rows pad to at most `max_length` in a batch of at most `batch_size` rows."""
    rows = min(batch_size, max(len(t.rows) for t in tasks))
    tokens = min(max_length, max(token_bound(t) for t in tasks))
    return rows, tokens
