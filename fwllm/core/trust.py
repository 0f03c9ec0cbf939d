"""Which folders fwllm reads a plan or a cache entry from, and which names inside them it follows.

A plan decides what a merge writes: the merged tensors it stores, the statistics it names.
`inputs.json` only claims what the plan was made from, so a plan is worth exactly as much
as whoever could write it. The rule:

* A plan folder or cache entry is **trusted** when it, and every file and folder in it, is
  owned by the user running fwllm (or root) and is writable by no one else: not
  world-writable, and group-writable only through the user's own private group (the
  Debian/Ubuntu `umask 002` default, where the group holds nobody else). Anything else
  could have been planted or edited by another account sharing the cache folder.
* A name a plan or an index gives for a file (`merged/index.json`, a statistic's `file`, a
  shard index's `weight_map`) must **stay inside its folder**: relative, no `..` that
  leaves it, no symlink that points out of it.

No digests are kept for plans: the owner rule is what git applies to a repository
(`safe.directory`), and a user who can write the cache as you can also rewrite any digest.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from typing import Iterable

from fwllm.core.errors import FwllmError

RULE = "fwllm reads plans and cache entries only from folders owned by you and writable by no one else"


def inside(folder: str, name: str, what: str) -> str:
    """`folder/name`, refused unless it stays inside `folder` (symlinks resolved)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith("~"):
        raise FwllmError(f"{what} names {name!r}, which is not a relative path inside {folder}: refused")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise FwllmError(f"{what} names {name!r}, which leads outside {folder}: refused")
    return os.path.join(folder, name)


def _private_group(gid: int, uid: int) -> bool:
    """The user's own group, holding no one else (a umask 002 system's per-user group)."""
    try:
        group = grp.getgrgid(gid)
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return group.gr_name == user and set(group.gr_mem) <= {user}


def _problem(path: str, st: os.stat_result, uid: int) -> str:
    """Why `path` is not trusted, or '' when it is."""
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})"
    if stat.S_ISLNK(st.st_mode):
        return ""  # a symlink's own mode means nothing; `inside` vets where it points
    if st.st_mode & stat.S_IWOTH:
        return f"{path} is writable by everyone"
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid, uid):
        return f"{path} is writable by group {st.st_gid}"
    return ""


def untrusted_reason(paths: Iterable[str], deep: bool = True) -> str:
    """The first reason one of `paths` is not trusted, or ''. With `deep`, a folder is walked
    whole, and a symlink in it that leads out of it is a reason too (a copy would follow it)."""
    if not hasattr(os, "getuid"):
        return ""  # no POSIX owners (Windows): the rule cannot be applied
    uid = os.getuid()
    for top in paths:
        if not os.path.lexists(top):
            continue
        why = _problem(top, os.stat(top), uid)  # the entry as named, a symlink followed
        if why:
            return why
        if not deep or not os.path.isdir(top):
            continue
        root = os.path.realpath(top)
        for parent, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(parent, name)
                st = os.lstat(path)
                why = _problem(path, st, uid)
                if not why and stat.S_ISLNK(st.st_mode):
                    if os.path.commonpath([root, os.path.realpath(path)]) != root:
                        why = f"{path} is a symlink that leads outside {top}"
                if why:
                    return why
    return ""


def check_trusted(what: str, *paths: str, deep: bool = True) -> None:
    """One clear error unless every path in `paths` is trusted under the rule above."""
    why = untrusted_reason(paths, deep)
    if why:
        raise FwllmError(
            f"{what} {paths[0]} is not trusted: {why} ({RULE}); remove it, or set FWLLM_CACHE "
            f"to a folder of your own"
        )
