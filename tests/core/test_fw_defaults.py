"""fw_merging's defaults are the quality benchmark's winning FW-hard settings; `preset: paper` is
the paper's open-loop FW; `local_merge: regmean` is the old spelling of `refine: regmean`."""

import json
import logging
from pathlib import Path

import pytest

from conftest import write_recipe
from fwllm.core.errors import FwllmError
from fwllm.core.params import FW_PRESETS, FWParams
from fwllm.methods.fw_merging import FWMerging

REPORT = Path(__file__).resolve().parents[2] / "eval" / "reports" / "quality"
STEP_REPORT = REPORT.parent / "quality_step"  # the step rule, benchmarked after on the same pool and rows


def benchmark_fw_hard_settings() -> dict:
    """The FW-hard row's recipe parameters as the benchmark recorded them (results.json beside
    report.md): PoolSettings' FW fields as `fwllm.demo.recipes._fw` writes them
    (fw_scaling -> scaling, fw_init -> init), then the run's `fw_hard` overrides."""
    merge = json.loads((REPORT / "results.json").read_text())["merge_settings"]
    recorded = {
        "scaling": merge["fw_scaling"],
        "init": merge["fw_init"],
        "iterations": merge["iterations"],
        "step_size": merge["step_size"],
        "variant": "hard",
        **merge["extra"]["fw_hard"],
    }
    if recorded.get("local_merge") == "regmean":  # the run predates `refine`
        recorded.update(local_merge="task_arithmetic", refine="regmean")
    return recorded


def test_the_defaults_are_the_benchmarks_fw_hard_settings():
    recorded = benchmark_fw_hard_settings()
    report = (REPORT / "report.md").read_text()
    assert "| 8 (4 irrelevant) | FW-hard | 97.0" in report  # the row these settings scored
    # the default step is the one the step benchmark ran, which scored what the line search scored
    step_run = json.loads((STEP_REPORT / "results.json").read_text())["merge_settings"]["extra"]["fw_hard"]
    for run in ("adaptive", "line_search"):
        assert "| 8 (4 irrelevant) | FW-hard | 97.0" in (STEP_REPORT / f"{run}.md").read_text()
    recorded["step"] = step_run["step"]
    p = FWParams(calibration="c")
    assert {k: getattr(p, k) for k in recorded} == recorded
    assert (
        set(recorded) >= set(FW_PRESETS["default"]) - {"regmean_weights"} and p.regmean_weights == "uniform"
    )


def test_plain_mergekit_parameters_get_the_defaults_and_the_preset():
    """mergekit hands the adapter every declared parameter, with its declared default: unset keys
    must still take the preset's value, written ones win."""
    declared = {n: f.default for n, f in FWParams.model_fields.items()}
    p = FWMerging().validate_params({**declared, "calibration": "c"})
    assert p == FWParams(calibration="c")
    paper = FWMerging().validate_params({**declared, "calibration": "c", "preset": "paper", "iterations": 3})
    assert (
        paper.iterations,
        paper.step,
        paper.hull,
        paper.refine,
        paper.granularity,
        paper.init,
        paper.scaling,
        paper.step_size,
    ) == (3, "open_loop", "fixed", "none", "tensor", "task_arithmetic", 0.3, 0.1)


def test_preset_paper_is_the_old_defaults():
    old = {
        "iterations": 10,
        "step_size": 0.1,
        "granularity": "tensor",
        "local_merge": "task_arithmetic",
        "init": "task_arithmetic",
        "scaling": 0.3,
        "step": "open_loop",
        "hull": "fixed",
        "regmean_weights": "fw",
    }
    assert FWParams(calibration="c", preset="paper").model_dump(exclude={"preset"}) == FWParams(
        calibration="c", refine="none", **old
    ).model_dump(exclude={"preset"})
    assert FWParams(calibration="c", preset="paper", granularity="model").granularity == "model"  # keys win


def test_a_written_open_loop_step_keeps_a_fixed_hull_but_a_written_adaptive_hull_is_refused():
    assert FWParams(calibration="c", step="open_loop").hull == "fixed"
    assert FWParams(calibration="c", pairwise=True).granularity == "tensor"
    with pytest.raises(FwllmError, match="hull: adaptive needs step: line_search"):
        FWMerging().validate_params({"calibration": "c", "step": "open_loop", "hull": "adaptive"})
    with pytest.raises(FwllmError, match="refine: regmean needs local_merge: task_arithmetic"):
        FWMerging().validate_params({"calibration": "c", "local_merge": "ties"})
    assert (
        FWMerging().validate_params({"calibration": "c", "local_merge": "ties", "refine": "none"}).local_merge
        == "ties"
    )


def test_local_merge_regmean_is_refine_regmean_with_one_warning(caplog, monkeypatch):
    import fwllm.core.params as params

    monkeypatch.setattr(params, "_ALIAS_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="fwllm.core.params"):
        a = FWParams(calibration="c", preset="paper", local_merge="regmean")
        FWParams(calibration="c", local_merge="regmean")
    assert (a.local_merge, a.refine, a.step_merge) == ("task_arithmetic", "regmean", "task_arithmetic")
    assert a == FWParams(calibration="c", preset="paper", refine="regmean")
    warnings = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warnings == [
        "fw_merging: `local_merge: regmean` is deprecated; write `refine: regmean` "
        "(FW's steps stay task arithmetic)"
    ]
    with pytest.raises(FwllmError, match="local_merge: regmean means refine: regmean"):
        FWParams(calibration="c", local_merge="regmean", refine="none")


def test_preset_paper_gives_the_plan_of_the_old_settings_written_out(tmp_path, tiny_pool, monkeypatch):
    from conftest import merge

    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    e = tiny_pool["experts"]
    common = {"calibration": str(tiny_pool["calib"]), "iterations": 3, "gradient": "full"}
    old = {
        "step_size": 0.1,
        "granularity": "tensor",
        "local_merge": "task_arithmetic",
        "refine": "none",
        "init": "task_arithmetic",
        "scaling": 0.3,
        "step": "open_loop",
        "hull": "fixed",
        "regmean_weights": "fw",
    }
    plans = []
    for name, params in (("paper", {"preset": "paper"}), ("written", old)):
        out = merge(tmp_path, name, "fw_merging", tiny_pool, [e["copy"], e["rev"]], {**common, **params})
        plans.append(json.loads((out / "fwllm_plan" / "plan.json").read_text()))
    assert plans[0]["atoms"] == plans[1]["atoms"] and plans[0]["coefficients"] == plans[1]["coefficients"]
    assert plans[0]["coefficients"] is not None  # the paper's FW: a task-arithmetic plan, reproducible
    settings = [{k: v for k, v in p["settings"].items() if k not in ("preset", "plan")} for p in plans]
    assert settings[0] == settings[1]


def test_a_misspelt_preset_is_one_error(tmp_path, tiny_pool):
    from fwllm.mergekit_glue.recipe import load_recipe

    recipe = write_recipe(
        tmp_path / "r.yml",
        "fw_merging",
        tiny_pool["base"],
        [tiny_pool["experts"]["copy"]],
        {"calibration": str(tiny_pool["calib"]), "preset": "papers"},
    )
    with pytest.raises(FwllmError, match="preset must be one of 'default' or 'paper'"):
        load_recipe(str(recipe))


def test_granularity_layer_is_the_old_spelling_of_tensor(caplog, monkeypatch):
    """`granularity: layer` meant one vertex per weight tensor: accepted as `tensor`, with one notice."""
    import fwllm.core.params as params

    monkeypatch.setattr(params, "_ALIAS_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="fwllm.core.params"):
        old = FWParams(calibration="c", preset="paper", granularity="layer")
        FWParams(calibration="c", preset="paper", granularity="layer")
    assert old == FWParams(calibration="c", preset="paper", granularity="tensor")
    assert old.granularity == "tensor"
    notices = [r.getMessage() for r in caplog.records if "granularity: layer" in r.getMessage()]
    assert len(notices) == 1 and "granularity: tensor" in notices[0]
