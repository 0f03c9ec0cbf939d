"""Output folders that never look finished before they are.

Work happens in a hidden temporary sibling of OUT_DIR and is renamed into place only
at the end; a user's existing, non-empty OUT_DIR is replaced only with `--force`, and
even then only after the new output is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from fwllm.core.errors import FwllmError


def check_target(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise FwllmError(f"output path {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FwllmError(f"output folder {out_dir} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def staged_output(out_dir: str, force: bool = False) -> Iterator[str]:
    """Yield a temporary folder; on success it becomes `out_dir`, on failure it vanishes."""
    out_dir = os.path.abspath(out_dir)
    check_target(out_dir, force)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "previous"))
        else:
            os.rmdir(out_dir)
    os.rename(staging, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
