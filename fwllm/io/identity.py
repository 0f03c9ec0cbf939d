"""Content identities of models, adapters and calibration files: what every fwllm cache is keyed by.

The rule (also in docs/design.md, "Caches and identities"):

* A file is identified by the SHA-256 of every one of its bytes: weight shards, calibration
  files, `config.json`, adapter configs, tokenizer files. (No sampling: a sign flip of
  128 KiB in the middle of a shard must give another identity. SHA-256 and BLAKE2b hash
  at the same speed here, about 0.9 GiB/s a core, and several files hash in parallel.)
* A model or adapter folder: its relevant files (`MODEL_SUFFIXES` at the top level, and
  `fwllm_heads/`), each by relative name and identity.
* A Hub id: the commit hash of the snapshot it resolves to (the Hub's own content address).

Paths, file names of the folder itself and mtimes never count: a copy (`cp -p`, `rsync -a`)
shares its source's identity, and an edit in place changes it.

Hashing a 7B model's 13 GiB is seconds, so a digest is memoised, in-process and in
`$FWLLM_CACHE/identity.sqlite`, keyed like git's index by the file's (device, inode, size,
mtime, ctime). The kernel sets ctime on every write and no user or copy tool can set it,
so the memo never outlives a change. A file changed within the last `RACY_SECONDS` is not
memoised, since timestamps are coarser than the time an edit takes (git's "racily clean"
files), nor is one whose stat changed while it was hashed. The memo file is used only
when it is trusted (`fwllm.core.trust`: yours, writable by no one else); otherwise every
file is hashed afresh, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional

from fwllm.core.paths import cache_root
from fwllm.io.models import resolve_model_path
from fwllm.core.trust import untrusted_reason

LOG = logging.getLogger(__name__)
RACY_SECONDS = 2.0
MEMO_FILE = "identity.sqlite"
HASH_THREADS = 4  # hashlib releases the GIL on large updates: shards hash in parallel
# Files that change what a model computes; docs, logs and eval outputs do not count.
MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken")
HEADS_DIR = "fwllm_heads"  # per-task heads beside an encoder checkpoint (fwllm.arch.heads)
_CHUNK = 4 << 20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

_MEMO: Dict[tuple, str] = {}
_MEMO_LOCK = threading.Lock()
_DB: Dict[str, Optional[sqlite3.Connection]] = {}  # memo file -> connection (None: not usable)


def _sha(data: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in data:
        h.update(chunk)
    return "sha256:" + h.hexdigest()[:32]


def hash_file(path: str) -> str:
    """The SHA-256 identity of every byte of `path` (no memo)."""
    with open(path, "rb", buffering=0) as fp:
        return _sha(iter(lambda: fp.read(_CHUNK), b""))


def _memo_db() -> Optional[sqlite3.Connection]:
    """The persistent memo (call under _MEMO_LOCK); None when it cannot be used or is not trusted."""
    path = os.path.join(cache_root(), MEMO_FILE)
    if path in _DB:
        return _DB[path]
    db = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        why = untrusted_reason([os.path.dirname(path), path], deep=False)
        if why:
            LOG.warning("fwllm: not using the identity memo %s (%s): every input is hashed afresh", path, why)
        else:
            db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            db.execute(
                "CREATE TABLE IF NOT EXISTS memo (dev INTEGER, ino INTEGER, size INTEGER,"
                " mtime INTEGER, ctime INTEGER, ident TEXT, PRIMARY KEY (dev, ino, size, mtime, ctime))"
            )
    except (OSError, sqlite3.Error) as err:  # a read-only cache folder: memoise in-process only
        LOG.debug("no identity memo at %s: %s", path, err)
        db = None
    _DB[path] = db
    return db


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remembered(key: tuple) -> Optional[str]:
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
        db = _memo_db()
        if db is None:
            return None
        try:
            row = db.execute(
                "SELECT ident FROM memo WHERE dev=? AND ino=? AND size=? AND mtime=? AND ctime=?", key
            ).fetchone()
        except sqlite3.Error:
            return None
        if row:
            _MEMO[key] = row[0]
        return row[0] if row else None


def _remember(key: tuple, ident: str) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = ident
        db = _memo_db()
        if db is not None:
            try:
                db.execute("INSERT OR REPLACE INTO memo VALUES (?, ?, ?, ?, ?, ?)", (*key, ident))
            except sqlite3.Error as err:  # a locked or full disk: the in-process memo still holds it
                LOG.debug("identity memo not written: %s", err)


def file_identity(path: str) -> str:
    """The file's identity under the rule above (memoised while the file is unchanged)."""
    st = os.stat(path)
    key = _stat_key(st)
    ident = _remembered(key)
    if ident is not None:
        return ident
    ident = hash_file(path)
    after = os.stat(path)
    settled = time.time() - max(after.st_mtime, after.st_ctime) > RACY_SECONDS
    if settled and _stat_key(after) == key:
        _remember(key, ident)
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
    """{relative name: identity} for files under `root` (hashed by a few threads)."""
    names = list(names)
    if len(names) <= 1:
        return {name: file_identity(os.path.join(root, name)) for name in names}
    with ThreadPoolExecutor(min(HASH_THREADS, len(names))) as pool:
        idents = pool.map(lambda name: file_identity(os.path.join(root, name)), names)
        return dict(zip(names, idents))


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
