"""Output folders that never look finished before they are, and that one run writes at a time.

Work happens in a hidden temporary sibling of OUT_DIR (`.OUT.partial-*`) and is renamed into
place only at the end; a user's existing, non-empty OUT_DIR is replaced only with `--force`,
and even then only after the new output is complete. SIGINT and SIGTERM are held back while
the renames run, so an interrupt leaves the old OUT_DIR or the new one, never neither.

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
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Iterator, Optional

from fwllm.core.errors import FwllmError

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (fwllm targets Linux and macOS)
    fcntl = None

LOG = logging.getLogger(__name__)
OUT_DIR_WAIT = 30.0  # seconds a second merge into one OUT_DIR waits for the first
PLAN_WAIT = 3600.0  # seconds a run waits for another run's solve of the same plan (then reuses it)
_PREVIOUS = "previous"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    try:
        with open(path, encoding="utf-8") as fp:
            pid = fp.read().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "another process"


@contextlib.contextmanager
def folder_lock(target: str, what: str = "output folder", timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the exclusive lock of `target` (waiting up to `timeout` s, default OUT_DIR_WAIT)."""
    if fcntl is None:
        yield
        return
    timeout = lock_timeout(OUT_DIR_WAIT) if timeout is None else timeout
    path = _sibling(target, "lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    deadline, waited = time.monotonic() + timeout, False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
                LOG.warning("waiting for %s %s, in use by %s (up to %g s)", what, target, _holder(path), timeout)
            if time.monotonic() >= deadline:
                raise FwllmError(f"{what} {target} is in use by {_holder(path)} (another fwllm or mergekit run); "
                                 f"waited {timeout:g} s (set FWLLM_LOCK_TIMEOUT to wait longer)") from None
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


def check_target(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise FwllmError(f"output path {out_dir} is a file")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FwllmError(f"output folder {out_dir} exists and is not empty; pass --force to replace it")


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
def staged_output(out_dir: str, force: bool = False, lock: bool = True, what: str = "output folder",
                  timeout: Optional[float] = None) -> Iterator[str]:
    """Yield a temporary folder; on success it becomes `out_dir`, on failure it vanishes.

    With `lock`, the whole run holds `out_dir`'s lock (pass lock=False when the caller holds it)."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with folder_lock(out_dir, what, timeout) if lock else contextlib.nullcontext():
        recover_leftovers(out_dir)
        check_target(out_dir, force)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
        try:
            yield staging
            _commit(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the commit went through
            raise
