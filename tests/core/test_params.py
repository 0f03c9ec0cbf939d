"""Parameters are checked against their schema ranges when the recipe loads, before any model is read."""

import os
import subprocess
import sys

import pytest

from conftest import write_recipe
from fwllm.core.errors import FwllmError
from fwllm.core.method import DataMethod
from fwllm.core.registry import Registry
from fwllm.methods.registry import BUILTIN_METHODS, METHODS


@pytest.mark.parametrize(
    "params, message",
    [
        ({"iterations": 0}, "iterations must be >= 1 (got 0)"),
        ({"step_size": 1.5}, "step_size must be <= 1 (got 1.5)"),
        ({"variant": "medium"}, "variant must be one of 'hard' or 'soft'"),
        ({"density": 0}, "density must be > 0 (got 0)"),
        ({"drop_rate": 1.0}, "drop_rate must be < 1 (got 1.0)"),
        ({"sketch_ratio": 0.5}, "sketch_ratio must be >= 1"),
        ({"iteratons": 3}, "unknown parameter 'iteratons'"),
    ],
)
def test_out_of_range_fw_parameters_fail_at_recipe_load_without_loading_a_model(
    tmp_path, tiny_pool, monkeypatch, params, message
):
    import fwllm.io.models as models
    from fwllm.mergekit_glue.recipe import load_recipe

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the recipe was validated")

    monkeypatch.setattr(models, "load_model", no_model)
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["experts"]["copy"]],
        {"calibration": str(tiny_pool["calib"]), **params},
    )
    with pytest.raises(FwllmError) as err:
        load_recipe(str(recipe))
    assert message in str(err.value)


def test_every_data_method_needs_calibration():
    for method in BUILTIN_METHODS:
        with pytest.raises(FwllmError, match=f"{method.name} needs `parameters: {{calibration: PATH}}`"):
            method.validate_params({})


def test_plain_mergekit_yaml_rejects_out_of_range_parameters_while_planning(tmp_path, tiny_pool):
    """Under plain mergekit-yaml the adapter hands mergekit the constrained types: its planner
    refuses `iterations: 0` before fwllm solves anything (no plan folder is started)."""
    import importlib.util

    if importlib.util.find_spec("fwllm.mergekit_glue.hook") is None or not os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    ):
        pytest.skip("mergekit-yaml is not installed beside this Python")
    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["experts"]["copy"]],
        {"calibration": str(tiny_pool["calib"]), "iterations": 0},
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", FWLLM_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode != 0
    assert "fw_merging: iterations must be >= 1 (got 0)" in r.stderr
    assert not os.path.exists(tmp_path / "cache" / "plans")


def test_registry_refuses_duplicates_and_names_the_known_methods():
    class Dummy(DataMethod):
        name = "fw_merging"

    reg = Registry(BUILTIN_METHODS)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Dummy())
    with pytest.raises(
        FwllmError, match="unknown fwllm method 'fw'; available: adamerging, fisher, fw_merging, regmean"
    ):
        reg.get("fw")
    assert METHODS.names() == ["adamerging", "fisher", "fw_merging", "regmean"]
