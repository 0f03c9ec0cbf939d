"""Content identities of models, adapters and calibration files: what every fwllm cache is keyed by.

The rule (also in docs/design.md, "Caches and identities"):

* A file of at most `FULL_HASH_BYTES` (64 MiB) is hashed whole (SHA-256): calibration files,
  `config.json`, adapter configs, tokenizer files and the weight shards of small models.
* A larger safetensors shard is identified by its size, its whole header (every tensor's
  name, dtype, shape and byte offsets) and sampled bytes: the first and last `SAMPLE_BYTES`
  of every tensor's data, and `WINDOWS` windows of `WINDOW_BYTES` spread evenly over the
  file. Training moves essentially every element of every tensor it touches, so a retrained
  or replaced checkpoint differs inside the sampled ranges; another architecture, dtype or
  layout differs in the header; a truncated or extended file differs in size.
* Another large file (`.bin`, `.gguf`): its size and the evenly spread windows.
* A model or adapter folder: its relevant files (`MODEL_SUFFIXES` at the top level, and
  `fwllm_heads/`), each by relative name and identity.
* A Hub id: the commit hash of the snapshot it resolves to (the Hub's own content address).

Paths, file names of the folder itself and mtimes never count: a copy (`cp -p`, `rsync -a`)
shares its source's identity, and an edit in place changes it. What the rule misses is an
in-place edit of a few bytes of a large shard outside the sampled ranges; `--no-cache`
(`no_cache: true` under plain mergekit) solves again regardless of any cache.

Identities are memoised in-process by (path, device, inode, size, mtime, ctime). The kernel
sets ctime on every write and no copy tool can set it, so the memo never outlives a change;
a file changed within the last `RACY_SECONDS` is not memoised, since timestamps are coarser
than the time an edit takes (as git treats "racily clean" files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from fwllm.io.models import resolve_model_path

FULL_HASH_BYTES = 64 << 20
SAMPLE_BYTES = 4096
WINDOWS, WINDOW_BYTES = 64, 64 << 10
RACY_SECONDS = 2.0
# Files that change what a model computes; docs, logs and eval outputs do not count.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken")
HEADS_DIR = "fwllm_heads"  # per-task heads beside an encoder checkpoint (fwllm.arch.heads)
_CHUNK = 1 << 20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_MEMO: Dict[tuple, str] = {}
_MEMO_LOCK = threading.Lock()


def _sha(data: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in data:
        h.update(chunk)
    return "sha256:" + h.hexdigest()[:32]


def _whole(fp) -> Iterable[bytes]:
    return iter(lambda: fp.read(_CHUNK), b"")


def _read_at(fp, offset: int, length: int) -> bytes:
    fp.seek(offset)
    return fp.read(length)


def _windows(size: int) -> List[Tuple[int, int]]:
    if size <= WINDOW_BYTES:
        return [(0, size)]
    return [((size - WINDOW_BYTES) * i // (WINDOWS - 1), WINDOW_BYTES) for i in range(WINDOWS)]


def _safetensors_ranges(fp, size: int) -> Optional[Tuple[bytes, List[Tuple[int, int]]]]:
    """The header bytes and each tensor's first and last SAMPLE_BYTES, or None if not safetensors."""
    head = _read_at(fp, 0, 8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 << 20:
        return None
    header = _read_at(fp, 8, n)
    try:
        entries = json.loads(header)
        start = 8 + n
        ranges = []
        for name, entry in sorted(entries.items()):
            if name == "__metadata__":
                continue
            lo, hi = (start + int(x) for x in entry["data_offsets"])
            length = max(0, min(SAMPLE_BYTES, hi - lo))
            ranges += [(lo, length), (max(lo, hi - SAMPLE_BYTES), length)]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # not a safetensors header: the generic rule applies
    return header, ranges


def _sampled(path: str, size: int) -> str:
    with open(path, "rb") as fp:
        parts = [b"size:%d\0" % size]
        st = _safetensors_ranges(fp, size) if path.endswith(".safetensors") else None
        ranges = _windows(size)
        if st is not None:
            header, tensor_ranges = st
            parts.append(header)
            ranges = tensor_ranges + ranges
        for offset, length in ranges:
            parts.append(b"%d:%d\0" % (offset, length))
            parts.append(_read_at(fp, offset, length))
    return _sha(parts)


def file_identity(path: str) -> str:
    """The file's identity under the rule above (memoised while the file is unchanged)."""
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _MEMO_LOCK:
        if memo_key in _MEMO:
            return _MEMO[memo_key]
    settled = time.time() - max(st.st_mtime, st.st_ctime) > RACY_SECONDS
    if st.st_size <= FULL_HASH_BYTES:
        with open(path, "rb") as fp:
            ident = _sha(_whole(fp))
    else:
        ident = _sampled(path, st.st_size)
    if settled:
        with _MEMO_LOCK:
            _MEMO[memo_key] = ident
    return ident


def model_files(model_dir: str) -> List[str]:
    """The files of a model folder that count, relative to it, sorted."""
    out = []
    for sub in ("", HEADS_DIR):
        folder = os.path.join(model_dir, sub)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.endswith(MODEL_SUFFIXES) and os.path.isfile(os.path.join(folder, name)):
                out.append(os.path.join(sub, name) if sub else name)
    return sorted(out)


def files_identity(root: str, names: Iterable[str]) -> Dict[str, str]:
    """{relative name: identity} for files under `root`."""
    return {name: file_identity(os.path.join(root, name)) for name in names}


def digest(mapping: Dict[str, str]) -> str:
    """One identity for a {name: identity} mapping."""
    return _sha(f"{name}\0{ident}\0".encode() for name, ident in sorted(mapping.items()))


def folder_identity(model_dir: str) -> str:
    return digest(files_identity(model_dir, model_files(model_dir)))


def snapshot_commit(path: str) -> Optional[str]:
    """The commit hash of a Hugging Face cache snapshot folder (`.../snapshots/<commit>`), else None."""
    parent, name = os.path.split(os.path.normpath(path))
    return name if os.path.basename(parent) == "snapshots" and _COMMIT.match(name) else None


def model_identity(ref: str, revision: Optional[str] = None) -> str:
    """A local model or adapter folder by content; a Hub id by its snapshot's commit."""
    if os.path.isdir(ref):
        return folder_identity(ref)
    path = resolve_model_path(ref, revision)
    commit = snapshot_commit(path)
    return f"hub:{ref}@{commit}" if commit else folder_identity(path)
