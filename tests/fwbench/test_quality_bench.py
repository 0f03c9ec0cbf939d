"""The full quality benchmark's own parts (eval/fwbench): held-out GLUE rows and the
regmean/fisher parameter overrides of `python eval/quality.py --set`."""

import json
import os

import pytest

from fwbench.held_out import glue_rows
from fwbench.quality_bench import with_method_overrides
from fwllm.core.errors import FwllmError
from fwllm.core.paths import data_root
from fwllm.demo.settings import parse_overrides
from fwllm.demo.recipes import PoolSettings, recipe_for


@pytest.mark.skipif(data_root(required=False) is None, reason="needs the shared data")
def test_glue_held_out_rows_follow_the_lm_eval_prompts():
    rows = glue_rows(data_root(), "rte")
    with open(os.path.join(data_root(), "glue", "rte", "dev.jsonl")) as fp:
        first = json.loads(fp.readline())
    assert rows[0] == {
        "prompt": f"{first['sentence1']}\nQuestion: {first['sentence2']} True or False?\nAnswer:",
        "choices": [" True", " False"],
        "gold": first["label"],
    }
    assert len(rows) == 139


def test_method_overrides_reach_only_their_method():
    merge = with_method_overrides(
        PoolSettings(), parse_overrides(["regmean.alpha=0.7", "fisher.fisher=exact"])
    )
    assert recipe_for("regmean", "base", [], "calib", merge)["parameters"]["alpha"] == 0.7
    assert recipe_for("fisher", "base", [], "calib", merge)["parameters"]["fisher"] == "exact"
    assert "alpha" not in recipe_for("fw_hard", "base", [], "calib", merge)["parameters"]
    for bad in ("alpha=0.7", "ties.density=0.3", "regmean.=1"):
        with pytest.raises(FwllmError, match="regmean.KEY"):
            with_method_overrides(PoolSettings(), parse_overrides([bad]))
