"""The recipes in recipes/ are valid mergekit configurations with valid fwllm parameters."""

import glob
import os

import pytest
import yaml
from mergekit.config import MergeConfiguration

from fwllm.methods.registry import METHODS

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "*.yml")))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_validates(path):
    raw = yaml.safe_load(open(path))
    config = MergeConfiguration.model_validate(raw)
    if raw["merge_method"] in METHODS:
        method = METHODS.get(raw["merge_method"])
        method.validate_params(raw.get("parameters") or {})
        for entry in raw["models"]:
            assert set(entry.get("parameters") or {}) <= set(method.per_model)
    assert config.base_model is not None and len(config.models) >= 2


def test_llama2_pool_is_the_papers_sixteen_adapters():
    raw = yaml.safe_load(open([p for p in RECIPES if "llama2" in p][0]))
    config = MergeConfiguration.model_validate(raw)
    assert len(config.models) == 16 and all(m.model.lora is not None for m in config.models)
    assert sorted(m["parameters"]["task"] for m in raw["models"] if "parameters" in m) == [
        "cnn",
        "code",
        "pubmedqa",
    ]
