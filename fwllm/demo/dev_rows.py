"""Dev rows of a pool's tasks: every held-out row they have (held-out GLUE tasks nobody
trained on are the benchmark's, eval/fwbench/held_out.py).

An expert pool stores a few dev rows per task (`<pool>/data/<task>/dev.jsonl`). For the
`smol` pool those are the start of a longer held-out part of the shared data: GSM8K's dev
file, the PubMedQA questions after the training and calibration slices, SST-2's GLUE
validation rows. `extend_pool_rows` finds where the pool's dev rows sit in that source
(and fails if they are not a contiguous run of it, i.e. if the prompt layouts drifted
apart) and takes the source from there on. Everything before that point is where the
builder cut training and calibration rows (`fwllm.experts.smol_data`).

Row kinds: multiple choice `{"prompt", "choices", "gold"}` (scored by accuracy) and
response `{"prompt", "response"}` (scored by the NLL of the reference response).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

from fwllm.core.errors import FwllmError
from fwllm.evaluation.figures import ACCURACY, LOSS


@dataclass
class DevTask:
    name: str
    metric: str  # ACCURACY (multiple-choice rows) | LOSS (response rows)
    rows: List[dict]
    held_in: bool  # an expert of the pool was trained on this task
    source: str = ""
    available: int = 0  # rows there are before a budget cut

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha1(
            json.dumps([self.name, self.metric, self.rows], sort_keys=True).encode()
        ).hexdigest()[:16]


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as fp:
        return [json.loads(line) for line in fp if line.strip()]


# -- the smol prompt layouts (the same as fwllm's lm-eval tasks and the experts' training rows)
def gsm8k_row(q: dict) -> dict:
    return {"prompt": f"Question: {q['question']}\nAnswer:", "response": " " + q["answer"]}


PUBMEDQA_CHOICES = ("yes", "no", "maybe")


def pubmedqa_row(r: dict) -> dict:
    abstract = "\n".join(r["contexts"])
    return {
        "prompt": f"Abstract: {abstract}\nQuestion: {r['question']}\nAnswer:",
        "choices": [" " + c for c in PUBMEDQA_CHOICES],
        "gold": PUBMEDQA_CHOICES.index(r["final_decision"].strip().lower()),
    }


SST2_CHOICES = ("negative", "positive")


def sst2_row(r: dict) -> dict:
    return {
        "prompt": f"{r['sentence']}\nQuestion: Is the sentiment of this sentence positive or negative?\nAnswer:",
        "choices": [" " + c for c in SST2_CHOICES],
        "gold": int(r["label"]),
    }


def as_response(row: dict) -> dict:
    """A row as the pool stores it: a choice row becomes prompt + its gold choice."""
    if "choices" in row:
        return {"prompt": row["prompt"], "response": row["choices"][row["gold"]]}
    return {"prompt": row["prompt"], "response": row["response"]}


def extend_pool_rows(pool_rows: Sequence[dict], source: Sequence[dict], task: str) -> List[dict]:
    """`source` from where the pool's dev rows start: they must be a contiguous run of it."""
    if not pool_rows:
        raise FwllmError(f"{task}: the pool has no dev rows")
    flat = [as_response(r) for r in source]
    try:
        start = flat.index(as_response(pool_rows[0]))
    except ValueError:
        raise FwllmError(
            f"{task}: the pool's first dev row is not in the shared data (prompt layouts differ?)"
        ) from None
    if flat[start : start + len(pool_rows)] != [as_response(r) for r in pool_rows]:
        raise FwllmError(f"{task}: the pool's dev rows are not a contiguous run of the shared data")
    return list(source[start:])


# -- building the dev tasks ---------------------------------------------------------
@dataclass
class DevBudget:
    """Rows per task (None = all there are) and token limits."""

    rows: Dict[str, Optional[int]] = field(default_factory=dict)
    default_rows: Optional[int] = None
    max_prompt_tokens: int = 160  # multiple choice: long prompts keep their end (as the experts trained)
    max_length: int = 384  # response rows: prompt + response

    def cut(self, name: str, rows: List[dict]) -> List[dict]:
        n = self.rows.get(name, self.default_rows)
        return rows if n is None else rows[:n]


def dev_task(
    name: str, metric: str, rows: List[dict], held_in: bool, source: str, budget: DevBudget
) -> DevTask:
    return DevTask(name, metric, budget.cut(name, rows), held_in, source, len(rows))


SMOL_SOURCES = {  # pool task -> (shared data file, row layout, metric)
    "math": ("gsm8k/dev.jsonl", gsm8k_row, LOSS),
    "pubmedqa": ("pubmedqa/train.jsonl", pubmedqa_row, ACCURACY),
    "sst2": ("glue/sst2/dev.jsonl", sst2_row, ACCURACY),
}


def pool_dev_tasks(
    pool, tasks: Sequence[str], budget: DevBudget, data_root: Optional[str] = None
) -> List[DevTask]:
    """The dev rows of the pool's tasks: for smol from the shared data where it has more
    (`SMOL_SOURCES`), else (code, every tiny task) the pool's own dev file."""
    out = []
    for name in tasks:
        own = read_jsonl(pool.tasks[name].dev)
        if pool.profile == "smol" and name in SMOL_SOURCES and data_root:
            rel, layout, metric = SMOL_SOURCES[name]
            source = [layout(r) for r in read_jsonl(os.path.join(data_root, rel))]
            out.append(dev_task(name, metric, extend_pool_rows(own, source, name), True, rel, budget))
        else:
            out.append(dev_task(name, LOSS, own, True, pool.tasks[name].dev, budget))
    return out


def check_disjoint(dev: Sequence[DevTask], calibration_files: Iterable[str]) -> int:
    """Raise unless no dev prompt is also a calibration prompt; returns the calibration rows checked."""
    seen = set()
    for path in calibration_files:
        for row in read_jsonl(path):
            text = row.get("prompt") if "prompt" in row else json.dumps(row, sort_keys=True)
            seen.add(text)
    for task in dev:
        shared = [r["prompt"] for r in task.rows if r["prompt"] in seen]
        if shared:
            raise FwllmError(
                f"dev task {task.name}: {len(shared)} row(s) are also calibration rows, "
                f"e.g. {shared[0][:80]!r}"
            )
    return len(seen)
