"""Output folders that never look finished before they are, and that one run writes at a time.

Work happens in a hidden temporary sibling of OUT_DIR (`.OUT.partial-*`) and is renamed into
place only at the end. Every committed folder lists the files it was made with in a manifest
(`.fwllm-output.json`); an existing, non-empty OUT_DIR is replaced only with `--force`, only
when its manifest shows it is an earlier fwllm output holding nothing else (a user's folder,
a home, a model is never replaced), and even then only after the new output is complete.
SIGINT and SIGTERM are held back while the renames run, so an interrupt leaves the old
OUT_DIR or the new one, never neither. A symlinked OUT_DIR is followed (its target is
written, the link stays), and the committed folder's mode follows the umask.

`folder_lock` serialises the runs that write one folder (an OUT_DIR, a plan folder) across
processes: an exclusive `flock` on a hidden sibling `.OUT.lock`, which the kernel releases
when its holder dies however it dies. Holding the lock makes leftovers of an earlier run
that was killed (SIGKILL, power loss) provably orphaned, so they are cleaned up here: its
staging folders are removed, and a previous OUT_DIR that a replace had moved aside is put
back when no new output took its place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from typing import Callable, Iterable, Iterator, List, Optional, Set

from fwllm.core.errors import FwllmError
from fwllm.core.plan import PLAN_DONE, PLAN_FILE

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (fwllm targets Linux and macOS)
    fcntl = None

LOG = logging.getLogger(__name__)
OUT_DIR_WAIT = 30.0  # seconds a second merge into one OUT_DIR waits for the first
PLAN_WAIT = 3600.0  # seconds a run waits for another run's solve of the same plan (then reuses it)
_PREVIOUS = "previous"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MANIFEST = ".fwllm-output.json"  # in every folder staged_output commits: the files it was made with
_STAGING: Set[str] = set()  # staging folders this process is writing now (the mergekit hook skips them)


def lock_timeout(default: float) -> float:
    """`default`, or $FWLLM_LOCK_TIMEOUT (seconds) when set."""
    value = os.environ.get("FWLLM_LOCK_TIMEOUT")
    try:
        return float(value) if value else default
    except ValueError:
        raise FwllmError(f"FWLLM_LOCK_TIMEOUT must be a number of seconds (got {value!r})") from None


def _sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.{kind}")


def _holder(path: str) -> str:
    try:  # read without following a link: a planted one must not show another file's content
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            pid = os.read(fd, 32).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _open_lock_file(path: str) -> int:
    """Open (creating) the lock file at `path`, refusing anything but our own plain file.

    The file gets our PID written into it: a planted symlink or hard link must never make that
    write land in someone's file, so links are not followed and a foreign file is left alone.
    (A stale lock file of a dead holder is ours and plain: the kernel dropped its flock, so it
    is simply taken over.)"""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise FwllmError(
                f"lock file {path} is a symbolic link, which fwllm never follows: "
                f"remove it (it is not fwllm's) and run again"
            ) from None
        raise
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_nlink != 1:
        problem = f"has {info.st_nlink} hard links (another file shares its content)"
    if problem:
        os.close(fd)
        raise FwllmError(
            f"lock file {path} {problem}, so fwllm will not write to it: "
            f"remove it if no fwllm or mergekit run is using it, and run again"
        )
    return fd


@contextlib.contextmanager
def folder_lock(target: str, what: str = "output folder", timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the exclusive lock of `target` (waiting up to `timeout` s, default OUT_DIR_WAIT)."""
    if fcntl is None:
        yield
        return
    timeout = lock_timeout(OUT_DIR_WAIT) if timeout is None else timeout
    path = _sibling(os.path.realpath(target), "lock")  # one lock per folder, whichever link names it
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deadline, waited = time.monotonic() + timeout, False
    while True:
        try:
            fd = _open_lock_file(path)
        except (PermissionError, OSError) as err:
            if not isinstance(err, PermissionError) and err.errno != errno.EROFS:
                raise
            # a read-only place (a shared plan folder that is only read): nothing to serialise
            LOG.debug("no lock for %s: %s", target, err)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not waited:
                waited = True
                LOG.warning(
                    "waiting for %s %s, in use by %s (up to %g s)", what, target, _holder(path), timeout
                )
            if time.monotonic() >= deadline:
                raise FwllmError(
                    f"{what} {target} is in use by {_holder(path)} (another fwllm or mergekit run); "
                    f"waited {timeout:g} s (set FWLLM_LOCK_TIMEOUT to wait longer)"
                ) from None
            time.sleep(0.1)
            continue
        # The holder before us unlinks the file before releasing it: a lock on an unlinked
        # file guards nothing, so take it again on the file now at `path`.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the flock


def recover_leftovers(out_dir: str) -> None:
    """Clean up after a run into `out_dir` that was killed; call while holding its lock."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if entry.startswith(f".{name}.old-") and os.path.isdir(full):
            previous = os.path.join(full, _PREVIOUS)
            if os.path.isdir(previous) and not os.path.exists(out_dir):
                os.rename(previous, out_dir)  # the replace was cut between its two renames
                LOG.warning("restored %s, which an interrupted replace had moved aside", out_dir)
            shutil.rmtree(full, ignore_errors=True)
        elif entry.startswith(f".{name}.partial-") and os.path.isdir(full):
            LOG.info("removing %s, left by an interrupted run", full)
            shutil.rmtree(full, ignore_errors=True)


def _files_in(folder: str) -> List[str]:
    """Every file, and every symbolic link, under `folder` (relative paths; links not followed)."""
    found = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files + links]
    return sorted(found)


def _write_manifest(folder: str) -> None:
    files = [f for f in _files_in(folder) if f != MANIFEST]
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fp:
        json.dump({"written_by": "fwllm", "files": files}, fp, indent=1)


def foreign_files(folder: str) -> Optional[List[str]]:
    """The files in `folder` that no fwllm run wrote there: None when it holds no manifest
    (nothing in it is known to be fwllm's), else those its manifest does not list."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fp:
            listed = set(json.load(fp)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [f for f in _files_in(folder) if f != MANIFEST and f not in listed]


def is_fwllm_output(folder: str) -> bool:
    """True when everything in `folder` was written by an earlier fwllm run (its manifest says so)."""
    return foreign_files(folder) == []


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status", encoding="ascii") as fp:
            for line in fp:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_mount_point(out_dir: str, what: str = "output folder") -> None:
    """A mount point (`/` too) is never staged into: its staging sibling would sit on another
    file system, and replacing it would mean emptying a whole disk."""
    if os.path.ismount(out_dir):
        raise FwllmError(
            f"{what} {out_dir} is a mount point: fwllm never writes or replaces one; "
            f"name a new folder inside it"
        )


def check_target(
    out_dir: str,
    force: bool,
    what: str = "output folder",
    replaceable: Callable[[str], bool] = is_fwllm_output,
) -> None:
    """Refuse `out_dir` unless it is missing, empty, or (with `force`) replaceable: by default an
    earlier fwllm output whose manifest lists every file in it."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FwllmError(f"output path {out_dir} is a file")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if replaceable(out_dir):
        if not force:
            raise FwllmError(
                f"{what} {out_dir} exists and is not empty (an earlier fwllm output); "
                f"pass --force to replace it"
            )
        return
    foreign = foreign_files(out_dir) or []
    more = ", ..." if len(foreign) > 3 else ""
    found = (
        f"holds files fwllm did not write ({', '.join(foreign[:3])}{more})"
        if foreign
        else f"was not written by fwllm (it has no {MANIFEST})"
    )
    raise FwllmError(
        f"{what} {out_dir} exists and is not empty, and {found}: --force replaces only an "
        f"earlier fwllm output; choose a new or empty folder, or move those files away"
    )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends, then deliver them.

    Python runs signal handlers in the main thread whichever thread the kernel picked, so
    swapping the handlers (not the thread's signal mask) is what defers them reliably."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)  # to the restored handler: KeyboardInterrupt, or the default action


def _commit(staging: str, out_dir: str) -> None:
    """Rename `staging` to `out_dir`, moving a previous `out_dir` aside first and deleting it after."""
    parent = os.path.dirname(out_dir)
    with _signals_held():
        old = None
        try:
            if os.path.isdir(out_dir):
                if os.listdir(out_dir):
                    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
                    os.rename(out_dir, os.path.join(old, _PREVIOUS))
                else:
                    os.rmdir(out_dir)
            os.rename(staging, out_dir)
        except BaseException:
            if old and not os.path.exists(out_dir):
                os.rename(os.path.join(old, _PREVIOUS), out_dir)  # the previous output goes back
            if old:
                with contextlib.suppress(OSError):
                    os.rmdir(old)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(
    out_dir: str,
    force: bool = False,
    lock: bool = True,
    what: str = "output folder",
    timeout: Optional[float] = None,
    replaceable: Callable[[str], bool] = is_fwllm_output,
) -> Iterator[str]:
    """Yield a temporary folder; on success it becomes `out_dir`, on failure it vanishes.

    A symlinked `out_dir` is followed: the link's target is what gets written (and staged
    beside), so the link survives and the commit never meets a link where it expects a folder.
    With `lock`, the whole run holds `out_dir`'s lock (pass lock=False when the caller holds it);
    `force` replaces a non-empty `out_dir` only where `replaceable(out_dir)` says so."""
    out_dir = os.path.realpath(out_dir)
    refuse_mount_point(out_dir, what)  # before anything is written beside it
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with folder_lock(out_dir, what, timeout) if lock else contextlib.nullcontext():
        recover_leftovers(out_dir)
        check_target(out_dir, force, what, replaceable)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
        _STAGING.add(staging)
        try:
            yield staging
            _write_manifest(staging)
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp made it 0700; mkdir's folders follow the umask
            _commit(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the commit went through
            raise
        finally:
            _STAGING.discard(staging)


def is_staging(path: str) -> bool:
    """True for a folder that a `staged_output` of this process is writing now."""
    return os.path.realpath(path) in {os.path.realpath(s) for s in _STAGING}


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlap(out_dir: str, inputs: Iterable[str], what: str = "OUT_DIR") -> None:
    """Refuse an `out_dir` that is, holds or lies inside one of `inputs` (a model, an adapter, the
    calibration data, the recipe, the plan folder), or that is or holds the current folder or
    $HOME, or is a mount point: a merge there would write into, or (with --force) replace, what
    the user has. Paths are compared with symlinks resolved."""
    real = os.path.realpath(out_dir)
    refuse_mount_point(real, what)
    for path in inputs:
        if not path:
            continue
        other = os.path.realpath(os.path.expanduser(path))
        if _inside(other, real) or _inside(real, other):
            relation = "is" if other == real else ("holds" if _inside(other, real) else "lies inside")
            raise FwllmError(
                f"{what} {out_dir} {relation} an input of this merge ({path}): "
                f"fwllm never writes over its inputs; choose another {what}"
            )
    for name, path in (("the current folder", os.getcwd()), ("your home folder", os.path.expanduser("~"))):
        if path and _inside(os.path.realpath(path), real):
            raise FwllmError(
                f"{what} {out_dir} {'is' if os.path.realpath(path) == real else 'holds'} {name} "
                f"({path}): choose a new folder for the merged model"
            )


def is_plan_folder(folder: str) -> bool:
    """A folder a solve may replace: one fwllm committed, or a plan (an older fwllm's, without a manifest)."""
    return (
        is_fwllm_output(folder)
        or os.path.isfile(os.path.join(folder, PLAN_FILE))
        or os.path.isfile(os.path.join(folder, PLAN_DONE))
    )


def check_plan_folder(plan: str) -> None:
    """The `plan:` rule: a missing or empty folder, or one that holds an fwllm plan; never a
    folder of the user's (a `plan: ~` would otherwise have its home replaced by a plan)."""
    real = os.path.realpath(plan)
    refuse_mount_point(real, "plan folder")
    if os.path.exists(real) and not os.path.isdir(real):
        raise FwllmError(f"plan: {plan} is a file; `plan:` names a folder (new, empty, or holding a plan)")
    if os.path.isdir(real) and os.listdir(real) and not is_plan_folder(real):
        raise FwllmError(
            f"plan: {plan} holds files that are not an fwllm plan: fwllm would replace them; "
            f"point `plan:` at a new or empty folder, or at one that holds a plan"
        )
