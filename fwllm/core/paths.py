"""Where fwllm finds its data, its lm-eval task YAMLs and its cache.

Data and task YAMLs ship inside the package (`fwllm/_data/datasets`, `fwllm/_data/eval_tasks`,
as mergekit keeps its data in `mergekit/_data`), found from this file, so the working
directory never matters. `$FWLLM_DATA` overrides the data folder (same layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from fwllm.core.errors import FwllmError

_PACKAGE = Path(__file__).resolve().parent.parent
PACKAGED_DATA = _PACKAGE / "_data" / "datasets"


def is_hub_id(path: str) -> bool:
    """Whether a model reference can name a Hugging Face Hub repo ("name" or "org/name"), not a local path."""
    return not path.startswith((".", "/", "~")) and path.count("/") <= 1


def data_root(required: bool = True) -> Optional[str]:
    """The data folder (GLUE, GSM8K, PubMedQA, calibration prompts): `$FWLLM_DATA`, else the packaged copy.

    A `$FWLLM_DATA` that is not a folder is an error, not a silent fall-back to other data."""
    override = os.environ.get("FWLLM_DATA")
    if override:
        if os.path.isdir(os.path.expanduser(override)):
            return os.path.abspath(os.path.expanduser(override))
        if required:
            raise FwllmError(f"FWLLM_DATA={override} is not a folder (unset it to use fwllm's packaged data)")
        return None
    if PACKAGED_DATA.is_dir():
        return str(PACKAGED_DATA)
    if required:
        raise FwllmError(
            f"fwllm's packaged data is missing ({PACKAGED_DATA}): reinstall fwllm or set FWLLM_DATA"
        )
    return None


def eval_tasks_dir() -> Path:
    """fwllm's lm-eval task YAMLs (package data)."""
    return _PACKAGE / "_data" / "eval_tasks"


def cache_root() -> str:
    return os.environ.get("FWLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fwllm")
