"""Result cache for `fwllm eval`: one JSON file per (model weights, task, settings).

A model is identified by the content of its weight, config, tokenizer and head
files, not by its path or mtimes, so re-running a comparison after re-merging only one
model evaluates only that model. The identity is fwllm's one rule for models
(`fwllm.io.identity`: small files hashed whole, large shards by header and samples).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from fwllm.io.identity import folder_identity


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fp:
        json.dump(payload, fp, indent=1, sort_keys=True)
    os.replace(tmp, path)


class ResultCache:
    """Evaluation results keyed by a settings dict; `None` directory disables caching."""

    def __init__(self, directory: Optional[str]):
        self.directory = Path(directory).expanduser() if directory else None

    @staticmethod
    def key(settings: Dict[str, Any]) -> str:
        blob = json.dumps(settings, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def get(self, settings: Dict[str, Any]) -> Optional[dict]:
        if self.directory is None:
            return None
        path = self.directory / "results" / f"{self.key(settings)}.json"
        try:
            with open(path, encoding="utf-8") as fp:
                return json.load(fp)["result"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, settings: Dict[str, Any], result: dict) -> None:
        if self.directory is None:
            return
        path = self.directory / "results" / f"{self.key(settings)}.json"
        _write_json_atomic(path, {"settings": settings, "result": result})

    # ------------------------------------------------------------------ model identity
    @staticmethod
    def model_fingerprint(model_dir: str) -> str:
        """The model folder's content identity (its relevant files by name and content)."""
        return folder_identity(model_dir)[len("sha256:") :]
