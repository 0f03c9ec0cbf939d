"""Where fwllm finds the shared data, its lm-eval task YAMLs and its cache.

The task YAMLs ship inside the package (`fwllm/_data/eval_tasks`, as mergekit keeps its
data in `mergekit/_data`). The shared data lives beside a checkout; the package may run
from the checkout or from site-packages, so `data_root` tries `$FWLLM_DATA`, then the
current directory's checkout layout, then the layout around the package's source tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from fwllm.core.errors import FwllmError

_PACKAGE = Path(__file__).resolve().parent.parent


def data_root(required: bool = True) -> Optional[str]:
    """The shared data folder (GLUE, GSM8K, PubMedQA, calibration prompts)."""
    for candidate in (os.environ.get("FWLLM_DATA"), os.path.join(os.getcwd(), "..", "shared", "data"),
                      os.path.join(os.getcwd(), "shared", "data"), str(_PACKAGE.parent.parent / "shared" / "data")):
        if candidate and os.path.isdir(candidate):
            return os.path.abspath(candidate)
    if required:
        raise FwllmError("shared data folder not found: set FWLLM_DATA or run from the repository root (../shared/data)")
    return None


def eval_tasks_dir() -> Path:
    """fwllm's lm-eval task YAMLs (package data)."""
    return _PACKAGE / "_data" / "eval_tasks"


def cache_root() -> str:
    return os.environ.get("FWLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fwllm")
