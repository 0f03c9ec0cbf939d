"""Where fwllm finds shared data, its evaluation task YAMLs, and its cache.

The package may run from a checkout (editable) or from site-packages, so each lookup
tries, in order: an environment variable, the current directory's checkout layout,
then the layout around the package's own source tree.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from fwllm.errors import FwllmError

_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_dir(candidates: List[Optional[str]]) -> Optional[str]:
    for c in candidates:
        if c and os.path.isdir(c):
            return os.path.abspath(c)
    return None


def data_root(required: bool = True) -> Optional[str]:
    """The shared data folder (GLUE, GSM8K, PubMedQA, calibration prompts)."""
    found = _first_dir([
        os.environ.get("FWLLM_DATA"),
        os.path.join(os.getcwd(), "..", "shared", "data"),
        os.path.join(os.getcwd(), "shared", "data"),
        os.path.join(_PKG_PARENT, "..", "shared", "data"),
    ])
    if found is None and required:
        raise FwllmError("shared data folder not found: set FWLLM_DATA or run from the repository root (../shared/data)")
    return found


def eval_tasks_dir(required: bool = True) -> Optional[str]:
    """The lm-eval task YAMLs (eval/tasks in a checkout, share/fwllm/eval_tasks when installed)."""
    found = _first_dir([
        os.environ.get("FWLLM_EVAL_TASKS"),
        os.path.join(os.getcwd(), "eval", "tasks"),
        os.path.join(_PKG_PARENT, "eval", "tasks"),
        os.path.join(sys.prefix, "share", "fwllm", "eval_tasks"),
    ])
    if found is None and required:
        raise FwllmError("fwllm's lm-eval task folder not found: set FWLLM_EVAL_TASKS or run from the repository root")
    return found


def cache_root() -> str:
    return os.environ.get("FWLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fwllm")
