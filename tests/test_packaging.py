"""The wheel: the startup hook at the root of site-packages on any Python, the package and its data.

Built from a copy of the sources in tmp_path (the build writes build/ and *.egg-info next to
pyproject.toml), then installed with --no-deps into a bare venv: the hook needs nothing else.
About 15 s.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "LICENSE",
    "CITATION.cff",
    "fwllm_hook.py",
    "fwllm_mergekit.pth",
    "fwllm",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # the [test] extra installs it
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        kwargs = {"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        copy(os.path.join(REPO, name), src / name, **kwargs)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = out.glob("fwllm-*.whl")
    return path


def test_wheel_holds_the_hook_at_its_root_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n for n in names if "/" not in n} == {"fwllm_mergekit.pth", "fwllm_hook.py"}
    assert {"fwllm/__init__.py", "fwllm/mergekit_glue/hook.py", "fwllm/cli/__init__.py"} <= names
    assert "fwllm/_data/eval_tasks/fwllm_glue.yaml" in names  # package data (fwllm.core.paths.eval_tasks_dir)
    tasks_dir = os.path.join(REPO, "fwllm", "_data", "eval_tasks")
    tasks_here = {f for f in os.listdir(tasks_dir) if f != "__pycache__"}
    assert {f"fwllm/_data/eval_tasks/{f}" for f in tasks_here} <= names
    assert not any(n.startswith(("tests/", "eval/", "data/")) or "/lib/python" in n for n in names)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as z:
        with open(os.path.join(REPO, "fwllm_mergekit.pth"), "rb") as fp:
            assert z.read("fwllm_mergekit.pth") == fp.read()
        meta = z.read(f"{dist_info}/METADATA").decode()
    assert "Requires-Python: >=3.10" in meta.splitlines()
    assert 'Requires-Dist: lm-eval<0.5,>=0.4.8; extra == "eval"' in meta.splitlines()


def test_installed_wheel_puts_the_hook_in_site_packages(wheel, tmp_path):
    # without PYTHONPATH: a source tree on it would look like an installed fwllm to pip and to the venv
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FWLLM_NO_MERGEKIT_HOOK")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", py]
    r = subprocess.run(
        pip + ["install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    assert os.path.isfile(os.path.join(site, "fwllm_mergekit.pth"))
    probe = (
        "import sys; print(sorted(m for m in sys.modules if m.startswith('fwllm')), "
        "type(sys.meta_path[0]).__name__)"
    )
    on = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (on.returncode, on.stderr, on.stdout) == (0, "", "['fwllm_hook'] _Finder\n")
    # no torch in this venv: the hook must not have needed it
    off = subprocess.run(
        [py, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**env, "FWLLM_NO_MERGEKIT_HOOK": "1"},
    )
    assert (off.returncode, off.stderr, off.stdout.split()[0]) == (0, "", "[]")
    # pip uninstall takes the .pth with it (it is in the wheel's RECORD, unlike data-files)
    r = subprocess.run(
        pip + ["uninstall", "-q", "-y", "fwllm"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(site, "fwllm_mergekit.pth"))
    quiet = subprocess.run([py, "-c", "pass"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (quiet.returncode, quiet.stderr) == (0, "")
