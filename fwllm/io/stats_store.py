"""Per-candidate statistics on disk (Fisher diagonals, Gram matrices).

A statistic lives in ``<plan>/<kind>/<i>.safetensors``, one entry per tensor name, and the
merge reads one tensor's entry per call. It depends on the base, the candidate, its
task's rows and the statistic's settings, never on the merge weights, so it is also kept
in a cache (``$FWLLM_CACHE/stats``) and hard-linked into new plans. The cache is keyed by
the content identities of the models (`fwllm.io.identity`), not their paths or mtimes, and
bounded (`fwllm.io.cache_bound`: least recently used entries go first once it outgrows
$FWLLM_CACHE_MAX_GIB); a statistic is written only after the free space for it was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fwllm.core.job import CandidateSpec
from fwllm.core.paths import cache_root
from fwllm.core.trust import check_trusted
from fwllm.io.cache_bound import bound_stats_cache
from fwllm.io.identity import model_identity
from fwllm.io.iterate_store import check_free_space


def save_stats(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    """Write atomically: a half-written file must never look like a finished statistic."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _private_tmp(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _private_tmp(path: str) -> str:
    """A temporary name no other writer uses (two runs may compute one statistic at once)."""
    return f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"


def read_stat(path: str, name: str) -> Optional[torch.Tensor]:
    """One entry of a statistics file (None when the file has none for `name`)."""
    with safe_open(path, framework="pt") as fp:
        if name not in fp.keys():
            return None
        return fp.get_tensor(name)


def has_stat(path: str, name: str) -> bool:
    with safe_open(path, framework="pt") as fp:
        return name in fp.keys()


def link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)  # no second copy of a model-sized file when both sit on one disk
    except OSError:
        shutil.copyfile(src, dst)


class StatsCache:
    """Content-keyed statistics: `<root>/<kind>/<key>.safetensors` plus `<key>.json` (the meta)."""

    def __init__(self, kind: str, root: Optional[str] = None):
        self.kind = kind
        self.folder = os.path.join(root or os.path.join(cache_root(), "stats"), kind)

    def key(self, settings: dict, base_dir: str, spec: CandidateSpec, task_name: str, rows: list) -> str:
        payload = {
            "kind": self.kind,
            "settings": settings,
            "base": model_identity(base_dir),
            "model": model_identity(spec.model),
            "lora": model_identity(spec.lora) if spec.lora else None,
            "task": task_name,
            "rows": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def paths(self, key: str) -> Tuple[str, str]:
        return os.path.join(self.folder, key + ".safetensors"), os.path.join(self.folder, key + ".json")

    def get(self, key: str) -> Optional[dict]:
        """The cached statistic's meta, or None when it is not cached."""
        tensors, meta = self.paths(key)
        if not (os.path.isfile(tensors) and os.path.isfile(meta)):
            return None
        check_trusted("statistics cache entry", tensors, meta, self.folder, deep=False)
        with open(meta, encoding="utf-8") as fp:
            found = json.load(fp)
        with contextlib.suppress(OSError):
            os.utime(tensors)  # the cache's clock: least recently used entries are evicted first
        return found

    def put(self, key: str, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
        path, meta_path = self.paths(key)
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        check_free_space(self.folder, needed, f"the {self.kind} statistics cache")
        save_stats(path, tensors)
        tmp = _private_tmp(meta_path)
        with open(tmp, "w", encoding="utf-8") as fp:
            json.dump(meta, fp)
        os.replace(tmp, meta_path)
        bound_stats_cache(self.folder, keep=key)
