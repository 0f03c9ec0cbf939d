"""Staged output folders: the lock, leftovers of killed runs, interrupts during the commit, full disks."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fwllm.core.errors import FwllmError
from fwllm.io.staged_output import folder_lock, staged_output


def siblings(parent, name):
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}."))


def test_lock_excludes_a_second_holder_with_a_clear_error(tmp_path):
    target = tmp_path / "out"
    with folder_lock(str(target)):
        start = time.monotonic()
        with pytest.raises(FwllmError, match=rf"output folder .*out is in use by pid {os.getpid()}.*waited 0.3 s"):
            with folder_lock(str(target), timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - start < 10
    with folder_lock(str(target), timeout=0):  # released: free at once
        pass
    assert siblings(tmp_path, "out") == []  # the lock file goes with its holder


def test_a_killed_holder_leaves_no_lock(tmp_path):
    target = tmp_path / "out"
    code = ("import sys, time; from fwllm.io.staged_output import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FwllmError, match=f"in use by pid {holder.pid}"):
            with folder_lock(str(target), timeout=0.2):
                pass
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
        holder.wait(timeout=60)
        with folder_lock(str(target), timeout=10):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_leftovers_of_a_killed_run_are_cleaned_and_a_moved_aside_output_is_restored(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-abc").mkdir()
    (tmp_path / ".out.partial-abc" / "model.safetensors").write_text("half written")
    # killed between the two renames of a --force replace: OUT_DIR gone, its previous content aside
    (tmp_path / ".out.old-xyz" / "previous").mkdir(parents=True)
    (tmp_path / ".out.old-xyz" / "previous" / "mine.txt").write_text("precious")
    (tmp_path / ".other.partial-1").mkdir()  # another folder's staging is not ours to clean
    with pytest.raises(FwllmError, match="exists and is not empty"):
        with staged_output(str(out)):
            pass
    assert (out / "mine.txt").read_text() == "precious"
    assert siblings(tmp_path, "out") == [] and (tmp_path / ".other.partial-1").is_dir()


def test_failure_inside_leaves_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    with pytest.raises(OSError) as err:
        with staged_output(str(out), force=True) as staging:
            (tmp_path / "staging_seen").write_text(staging)
            open(os.path.join(staging, "model.safetensors"), "wb").write(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.errno == errno.ENOSPC
    assert os.listdir(out) == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"
    assert siblings(tmp_path, "out") == []


def test_an_interrupt_during_the_commit_waits_for_it(tmp_path, monkeypatch):
    """SIGINT between the two renames of a replace is held back: OUT_DIR is the old or the new
    output, never neither; here it arrives after the first rename, so the new one lands."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    real_rename = os.rename
    # a terminal's Ctrl-C, also when pytest runs as a background job (which inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def rename(src, dst):
        if os.fspath(dst) == str(out):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C with OUT_DIR moved aside
            time.sleep(0.2)
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_output(str(out), force=True) as staging:
                open(os.path.join(staging, "new.txt"), "w").write("new")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert os.listdir(out) == ["new.txt"]
    assert siblings(tmp_path, "out") == []


def _unshare_works():
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                       capture_output=True, timeout=60)
    return r.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs in a user namespace is Linux only")
def test_a_real_full_disk(tmp_path):
    """A 64 KiB tmpfs (mounted in a private user namespace, so no root is needed) that holds a
    previous OUT_DIR and has no room for the new one."""
    if not _unshare_works():
        pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces)")
    script = tmp_path / "full.py"
    script.write_text(
        "import os, sys\n"
        "from fwllm.io.staged_output import staged_output\n"
        "disk = sys.argv[1]\n"
        "os.makedirs(disk + '/out'); open(disk + '/out/mine.txt', 'w').write('precious')\n"
        "try:\n"
        "    with staged_output(disk + '/out', force=True) as staging:\n"
        "        open(os.path.join(staging, 'model.safetensors'), 'wb').write(os.urandom(1 << 20))\n"
        "    print('committed')\n"
        "except OSError as err:\n"
        "    print('errno', err.errno)\n"
        "print(sorted(os.listdir(disk)), sorted(os.listdir(disk + '/out')), open(disk + '/out/mine.txt').read())\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c",
                        f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} {script} {disk}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines == [f"errno {errno.ENOSPC}", "['out'] ['mine.txt'] precious"], r.stdout
