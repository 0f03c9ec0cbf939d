"""Staged output folders: the lock, leftovers of killed runs, interrupts during the commit, full disks."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fwllm.core.errors import FwllmError
from fwllm.io.staged_output import folder_lock, staged_output


MANIFEST = ".fwllm-output.json"


def siblings(parent, name):
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}."))


def earlier_output(out, files):
    """A folder as an earlier fwllm run left it: its files and the manifest that lists them."""
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    (out / MANIFEST).write_text(json.dumps({"written_by": "fwllm", "files": sorted(files)}))
    return out


def test_lock_excludes_a_second_holder_with_a_clear_error(tmp_path):
    target = tmp_path / "out"
    with folder_lock(str(target)):
        start = time.monotonic()
        with pytest.raises(
            FwllmError, match=rf"output folder .*out is in use by pid {os.getpid()}.*waited 0.3 s"
        ):
            with folder_lock(str(target), timeout=0.3):
                pass
        assert 0.3 <= time.monotonic() - start < 10
    with folder_lock(str(target), timeout=0):  # released: free at once
        pass
    assert siblings(tmp_path, "out") == []  # the lock file goes with its holder


def test_a_killed_holder_leaves_no_lock(tmp_path):
    target = tmp_path / "out"
    code = (
        "import sys, time; from fwllm.io.staged_output import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n"
    )
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
    out = earlier_output(tmp_path / "out", {"mine.txt": "precious"})
    with pytest.raises(OSError) as err:
        with staged_output(str(out), force=True) as staging:
            (tmp_path / "staging_seen").write_text(staging)
            open(os.path.join(staging, "model.safetensors"), "wb").write(b"x" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.errno == errno.ENOSPC
    assert sorted(os.listdir(out)) == [MANIFEST, "mine.txt"] and (out / "mine.txt").read_text() == "precious"
    assert siblings(tmp_path, "out") == []


def test_an_interrupt_during_the_commit_waits_for_it(tmp_path, monkeypatch):
    """SIGINT between the two renames of a replace is held back: OUT_DIR is the old or the new
    output, never neither; here it arrives after the first rename, so the new one lands."""
    out = earlier_output(tmp_path / "out", {"mine.txt": "old"})
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
    assert sorted(os.listdir(out)) == [MANIFEST, "new.txt"]
    assert siblings(tmp_path, "out") == []


def _unshare_works():
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
        capture_output=True,
        timeout=60,
    )
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
        f"open(disk + '/out/{MANIFEST}', 'w').write('{{\"files\": [\"mine.txt\"]}}')\n"
        "try:\n"
        "    with staged_output(disk + '/out', force=True) as staging:\n"
        "        open(os.path.join(staging, 'model.safetensors'), 'wb').write(os.urandom(1 << 20))\n"
        "    print('committed')\n"
        "except OSError as err:\n"
        "    print('errno', err.errno)\n"
        "print(sorted(os.listdir(disk)), sorted(os.listdir(disk + '/out')), open(disk + '/out/mine.txt').read())\n"
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        [
            "unshare",
            "-rm",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64k tmpfs {disk} && {sys.executable} {script} {disk}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines == [f"errno {errno.ENOSPC}", f"['out'] ['{MANIFEST}', 'mine.txt'] precious"], r.stdout


# ------------------------------------------------------------- what --force may replace (issue 24)
def test_force_refuses_a_folder_fwllm_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(FwllmError, match=r"not written by fwllm .*--force replaces only an earlier fwllm"):
        with staged_output(str(out), force=True) as staging:
            open(os.path.join(staging, "model.safetensors"), "w").write("new")
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "precious"
    assert siblings(tmp_path, "out") == []


def test_force_refuses_an_earlier_output_the_user_added_files_to(tmp_path):
    out = earlier_output(tmp_path / "out", {"model.safetensors": "old"})
    (out / "notes.md").write_text("mine")
    with pytest.raises(FwllmError, match=r"holds files fwllm did not write \(notes.md\)"):
        with staged_output(str(out), force=True):
            pass
    assert (out / "notes.md").read_text() == "mine" and (out / "model.safetensors").read_text() == "old"


def test_force_replaces_an_earlier_output_and_the_new_one_lists_its_files(tmp_path):
    out = earlier_output(tmp_path / "out", {"model.safetensors": "old", "README.md": "old"})
    with pytest.raises(FwllmError, match="earlier fwllm output.*pass --force"):
        with staged_output(str(out)):
            pass
    with staged_output(str(out), force=True) as staging:
        os.makedirs(os.path.join(staging, "sub"))
        open(os.path.join(staging, "sub", "plan.json"), "w").write("{}")
        open(os.path.join(staging, "model.safetensors"), "w").write("new")
    assert sorted(os.listdir(out)) == [MANIFEST, "model.safetensors", "sub"]
    assert json.loads((out / MANIFEST).read_text())["files"] == ["model.safetensors", "sub/plan.json"]
    with staged_output(str(out), force=True) as staging:  # what fwllm wrote, fwllm may replace again
        open(os.path.join(staging, "model.safetensors"), "w").write("newer")
    assert (out / "model.safetensors").read_text() == "newer" and not (out / "sub").exists()


# ------------------------------------------------------------------------ symlinked OUT_DIR
def test_a_symlink_to_an_empty_folder_is_written_through(tmp_path):
    real, link = tmp_path / "disk" / "real", tmp_path / "out"
    real.mkdir(parents=True)
    link.symlink_to(real)
    with staged_output(str(link)) as staging:
        open(os.path.join(staging, "model.safetensors"), "w").write("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "model.safetensors").read_text() == "new"
    assert siblings(tmp_path / "disk", "real") == [] and siblings(tmp_path, "out") == []


def test_force_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = earlier_output(tmp_path / "real", {"model.safetensors": "old"})
    link = tmp_path / "out"
    link.symlink_to(real)
    with staged_output(str(link), force=True) as staging:
        open(os.path.join(staging, "model.safetensors"), "w").write("new")
    assert link.is_symlink() and (real / "model.safetensors").read_text() == "new"


# ----------------------------------------------------------------------------------- locks
def test_a_planted_symlink_lock_never_writes_its_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(FwllmError, match=r"lock file .*\.out\.lock is a symbolic link"):
        with staged_output(str(tmp_path / "out")):
            pass
    assert victim.read_text() == "the user's file" and not (tmp_path / "out").exists()


def test_a_hard_linked_lock_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    os.link(victim, tmp_path / ".out.lock")
    with pytest.raises(FwllmError, match="hard links"):
        with folder_lock(str(tmp_path / "out"), timeout=0):
            pass
    assert victim.read_text() == "the user's file"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_users_lock_file_is_left_alone(tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text("their data")
    os.chown(lock, 4242, 4242)
    with pytest.raises(FwllmError, match=r"belongs to another user \(uid 4242\)"):
        with folder_lock(str(tmp_path / "out"), timeout=0):
            pass
    assert lock.read_text() == "their data"


def test_a_stale_lock_of_a_dead_process_does_not_block(tmp_path):
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    (tmp_path / ".out.lock").write_text(dead.stdout.strip())  # its holder is gone: no flock on it
    (tmp_path / ".out.partial-dead").mkdir()
    with staged_output(str(tmp_path / "out"), timeout=0) as staging:
        open(os.path.join(staging, "a.txt"), "w").write("new")
    assert siblings(tmp_path, "out") == [] and (tmp_path / "out" / "a.txt").read_text() == "new"


# ------------------------------------------------------------------- modes and mount points
def test_the_output_folder_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with staged_output(str(tmp_path / "out")) as staging:
            open(os.path.join(staging, "a.txt"), "w").write("new")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750  # as `mkdir` makes it under that umask


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    mount = tmp_path / "disk"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(mount) or real_ismount(p))
    with pytest.raises(FwllmError, match="is a mount point"):
        with staged_output(str(mount), force=True):
            pass
    assert os.listdir(tmp_path) == ["disk"]
