"""Result cache for `fwllm eval`: one JSON file per (model weights, task, settings).

A model is identified by the content of its weight, config, tokenizer and head
files, not by its path, so re-running a comparison after re-merging only one model
evaluates only that model. Hashing multi-GB weights is slow, so each file's digest
is memoised under (absolute path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from fwllm.arch.heads import HEADS_DIR

# Files that change what a model computes; docs, logs and eval outputs do not count.
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken")
_CHUNK = 1 << 20


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
        self._memo_path = self.directory / "file_digests.json" if self.directory else None
        self._memo: Optional[Dict[str, str]] = None

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
    def _file_digest(self, path: Path) -> str:
        stat = path.stat()
        memo_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if self._memo is None:
            self._memo = {}
            if self._memo_path is not None and self._memo_path.is_file():
                try:
                    self._memo = json.loads(self._memo_path.read_text(encoding="utf-8"))
                except ValueError:
                    self._memo = {}
        if memo_key in self._memo:
            return self._memo[memo_key]
        digest = hashlib.sha256()
        with open(path, "rb") as fp:
            for chunk in iter(lambda: fp.read(_CHUNK), b""):
                digest.update(chunk)
        self._memo[memo_key] = digest.hexdigest()
        if self._memo_path is not None:
            _write_json_atomic(self._memo_path, self._memo)
        return self._memo[memo_key]

    def model_fingerprint(self, model_dir: str) -> str:
        """Digest over the relative names and contents of the model's relevant files."""
        root = Path(model_dir)
        # Top level plus the per-task heads; other sub-folders (checkpoints, eval
        # outputs someone saved inside) are not part of the model.
        candidates = list(root.glob("*")) + list((root / HEADS_DIR).glob("*"))
        files = sorted(p for p in candidates if p.is_file() and p.name.endswith(_FINGERPRINT_SUFFIXES))
        total = hashlib.sha256()
        for path in files:
            total.update(path.relative_to(root).as_posix().encode() + b"\0")
            total.update(self._file_digest(path).encode() + b"\0")
        return total.hexdigest()[:32]
