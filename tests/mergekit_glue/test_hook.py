"""The startup hook (fwllm_mergekit.pth + fwllm_hook.py) costs nothing and breaks nothing.

Each test starts a fresh Python with `-S` (no site-packages, no installed .pth) and a temporary
site folder holding the repository's .pth and whatever fwllm the scenario needs (none, broken),
processed by `site.addsitedir` exactly as site-packages is at startup. The real site-packages
(torch, mergekit) goes on sys.path after it, without its own .pth files.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import perturbed_copies, save_tiny_llama_base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PTH, HOOK_MODULE = "fwllm_mergekit.pth", "fwllm_hook.py"
REAL_SITE = os.path.dirname(os.path.dirname(importlib.util.find_spec("mergekit").origin))
# PYTHONPATH would put the working tree's fwllm (and fwllm_hook) on the path of every scenario
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FWLLM_NO_MERGEKIT_HOOK")}
CLEAN_ENV.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def site_dir(root, with_hook_module=True, fwllm_files=None):
    """A site folder: the .pth, optionally fwllm_hook.py, and fwllm files {relative path: source}."""
    root.mkdir()
    shutil.copy(os.path.join(REPO, PTH), root)
    if with_hook_module:
        shutil.copy(os.path.join(REPO, HOOK_MODULE), root)
    for rel, source in (fwllm_files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    return root


def python(site, body, env=None, timeout=300):
    """Run `body` in `python -S` after processing `site` like site-packages at startup (in site's
    parent folder: the working directory is on sys.path, and the repository's must not be)."""
    prologue = textwrap.dedent(f"""\
        import site, sys
        site.addsitedir({os.path.dirname(REPO)!r} + "/__no_such_dir__")  # site's own lazy imports, first
        before = set(sys.modules)
        site.addsitedir({str(site)!r})
        added = sorted(set(sys.modules) - before)
        """)
    return subprocess.run(
        [sys.executable, "-S", "-c", prologue + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env={**CLEAN_ENV, **(env or {})},
        timeout=timeout,
        cwd=site.parent,
    )


def test_no_output_when_fwllm_is_gone(tmp_path):
    """The package uninstalled by hand, the .pth left behind: Python starts silently."""
    site = site_dir(tmp_path / "site", with_hook_module=False)
    r = python(site, "print('started', added)")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == "started []\n"


def test_startup_imports_only_the_hook_module(tmp_path):
    """A process that never imports mergekit loads fwllm_hook and nothing else: not the fwllm package
    (here one that would fail loudly), not importlib.util / importlib.abc."""
    site = site_dir(tmp_path / "site", fwllm_files={"fwllm/__init__.py": "raise RuntimeError('imported')\n"})
    r = python(site, "print(added, [type(f).__name__ for f in sys.meta_path][0])")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == "['fwllm_hook'] _Finder\n"


def test_env_var_disables_the_hook_before_any_import(tmp_path):
    site = site_dir(tmp_path / "site", fwllm_files={"fwllm/__init__.py": "raise RuntimeError('imported')\n"})
    r = python(
        site,
        "print(added, any(type(f).__name__ == '_Finder' for f in sys.meta_path))",
        env={"FWLLM_NO_MERGEKIT_HOOK": "1"},
    )
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == "[] False\n"


def _hook_source():
    with open(os.path.join(REPO, "fwllm", "mergekit_glue", "hook.py"), encoding="utf-8") as fp:
        return fp.read()


BROKEN = {
    # fwllm's own import fails (a half-upgraded install with a bad __init__)
    "package": lambda: {"fwllm/__init__.py": "raise ImportError('half-upgraded fwllm')\n"},
    # fwllm and its hook import, the adapter that the hook's run_merge wrapper needs does not
    "adapter": lambda: {
        "fwllm/__init__.py": "",
        "fwllm/mergekit_glue/__init__.py": "",
        "fwllm/mergekit_glue/hook.py": _hook_source(),
        "fwllm/mergekit_glue/adapter.py": "raise ImportError('half-upgraded adapter')\n",
    },
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_fwllm_leaves_plain_mergekit_working(tmp_path, broken):
    """mergekit imports and a `linear` merge runs as without fwllm; only a merge that asks for a
    method mergekit lacks gets one warning line, beside mergekit's own error."""
    base = save_tiny_llama_base(tmp_path)
    a, b = perturbed_copies(base, tmp_path, 2, scale=0.5, seed=3)
    site = site_dir(tmp_path / "site", fwllm_files=BROKEN[broken]())

    def config(method):
        models = [
            {"model": str(a), "parameters": {"weight": 1.0}},
            {"model": str(b), "parameters": {"weight": 3.0}},
        ]
        return json.dumps({"merge_method": method, "models": models, "dtype": "float32"})

    r = python(
        site,
        f"""
        sys.path.append({REAL_SITE!r})
        import mergekit.merge_methods
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
        linear = MergeConfiguration.model_validate_json({config("linear")!r})
        run_merge(linear, {str(tmp_path / "out")!r}, options)
        print("linear done", file=sys.stderr)
        try:
            fw = MergeConfiguration.model_validate_json({config("fw_merging")!r})
            run_merge(fw, {str(tmp_path / "fw")!r}, options)
        except RuntimeError as err:
            print("mergekit says:", err, file=sys.stderr)
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    at = lines.index("linear done")
    assert not any("fwllm" in ln or "Traceback" in ln for ln in lines[:at]), r.stderr
    warnings = [ln for ln in lines[at + 1 :] if ln.startswith("fwllm:")]
    assert len(warnings) == 1 and "'fw_merging'" in warnings[0] and "half-upgraded" in warnings[0], r.stderr
    assert lines[-1] == "mergekit says: Unimplemented merge method fw_merging"

    # linear normalizes its weights: (1 * a + 3 * b) / 4, tensor by tensor
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert set(out) == set(ta)
    for name, merged in out.items():
        torch.testing.assert_close(merged, (ta[name] + 3 * tb[name]) / 4, rtol=1e-6, atol=1e-6)
