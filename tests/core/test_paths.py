"""fwllm finds its data inside the package, from any working directory; `$FWLLM_DATA` overrides it.

The files the evaluation suites read are taken from the task YAMLs themselves (what lm-eval
opens), and the demo's `smol` pool is cut from the packaged files with its real slicing code,
so a trimmed file that is too short shows up as a short slice, not only as a missing file.
"""

import json
import re
from pathlib import Path

import pytest

import fwllm
from fwllm.core import paths
from fwllm.core.errors import FwllmError
from fwllm.evaluation import tasks

PACKAGE = Path(fwllm.__file__).resolve().parent
SHARED = Path("/work/shared/data")  # the project's source copy, where this machine has it


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """An empty working directory and no FWLLM_DATA: nothing but the package to find data in."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("FWLLM_DATA", raising=False)
    return empty


def _yaml_data_files():
    """Every data file named by a task YAML, relative to the data root."""
    found = set()
    for path in sorted(paths.eval_tasks_dir().iterdir()):
        if path.suffix in (".yaml", "") and path.is_file():
            found.update(re.findall(re.escape(tasks.REPO_DATA_PREFIX) + r"(\S+)", path.read_text()))
    return found


def test_data_root_is_the_packaged_copy_from_an_empty_cwd(nowhere):
    root = Path(paths.data_root())
    assert root.is_dir()
    assert PACKAGE in root.parents  # inside the installed package, not beside a checkout
    assert not list(nowhere.iterdir())
    assert tasks.eval_data() == root


def test_every_file_the_suites_read_is_packaged(nowhere):
    root = Path(paths.data_root())
    named = _yaml_data_files()
    assert "gsm8k/train.jsonl" in named and "pubmedqa/train.jsonl" in named and "glue/rte/dev.jsonl" in named
    assert [rel for rel in sorted(named) if not (root / rel).is_file()] == []
    tasks.check_data(list(tasks.ALL_TASKS), root)  # the list `fwllm eval` checks before running
    # the encoder scorer reads tasks.json and every GLUE task's dev rows
    info = json.loads((root / "glue" / "tasks.json").read_text())["tasks"]
    assert set(tasks.GLUE_TASKS) <= set(info)


def test_gsm8k_keeps_the_five_shots_of_the_source(nowhere):
    root = Path(paths.data_root())
    with open(root / "gsm8k" / "train.jsonl", encoding="utf-8") as fp:
        first = [json.loads(next(fp)) for _ in range(5)]
    assert all(set(r) == {"question", "answer"} and "####" in r["answer"] for r in first)


class _FakeTokenizer:
    """What `irrelevant_tasks` asks of a tokenizer: a vocabulary size and decode."""

    def __len__(self):
        return 1000

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_the_smol_pool_gets_full_slices_from_the_packaged_data(nowhere):
    from fwllm.experts.smol_data import CALIB_ROWS, DEV_ROWS, irrelevant_tasks, relevant_tasks

    root = paths.data_root()
    relevant = relevant_tasks(root)
    # slice sizes as written in smol_data: a short packaged file would give shorter slices
    sizes = {name: (len(t.fit), len(t.calibration), len(t.dev)) for name, t in relevant.items()}
    assert sizes == {
        "math": (240, CALIB_ROWS, DEV_ROWS),
        "pubmedqa": (200, CALIB_ROWS, DEV_ROWS),
        "code": (44, 24, 32),
        "sst2": (68, 32, DEV_ROWS),
    }
    irrelevant = irrelevant_tasks(root, _FakeTokenizer(), seed=0)
    # shuffled: GSM8K training rows 2000-2099 plus the 100 CNN prompts
    assert len(irrelevant["shuffled"].fit) == 200
    assert len(irrelevant["summarize"].fit) == 100 and len(irrelevant["reverse"].fit) == 200


def test_the_data_carries_its_provenance_and_licenses(nowhere):
    root = Path(paths.data_root())
    readme, licenses = (root / "README.md").read_text(), (root / "LICENSES.md").read_text()
    for repo in ("hmarkc/FW-Merging", "openai/grade-school-math", "pubmedqa/pubmedqa"):
        assert repo in readme and repo in licenses
    assert licenses.count("Permission is hereby granted") == 3


def test_the_example_recipes_calibration_is_packaged():
    import yaml

    from fwllm.data.calibration import load_calibration

    recipes = sorted((PACKAGE.parent / "recipes").glob("*.yml"))
    checked = 0
    for recipe in recipes:
        calibration = (yaml.safe_load(recipe.read_text()).get("parameters") or {}).get("calibration")
        # `~` paths name a pool that `fwllm experts` builds, not packaged data
        if isinstance(calibration, str) and not calibration.startswith("~"):
            folder = (recipe.parent / calibration).resolve()
            assert Path(paths.PACKAGED_DATA) in [folder, *folder.parents], recipe.name
            assert len(load_calibration(str(folder))) >= 3, recipe.name
            checked += 1
    assert checked == 2  # the LLaMA-2 7B (code, pubmedqa, cnn) and RoBERTa GLUE recipes


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's shared data is not on this machine")
def test_packaged_files_are_copies_of_the_shared_data():
    root = Path(paths.PACKAGED_DATA)
    for path in sorted(root.rglob("*.jsonl")) + [root / "glue" / "tasks.json"]:
        rel = path.relative_to(root)
        ours, source = path.read_bytes(), (SHARED / rel).read_bytes()
        if rel == Path("gsm8k/train.jsonl"):  # trimmed to a prefix of whole lines
            assert source.startswith(ours) and ours.endswith(b"\n") and ours.count(b"\n") == 2100
        else:
            assert ours == source, rel


def test_fwllm_data_overrides_the_packaged_copy(nowhere, tmp_path, monkeypatch):
    other = tmp_path / "mine"
    other.mkdir()
    monkeypatch.setenv("FWLLM_DATA", str(other))
    assert paths.data_root() == str(other)
    assert tasks.eval_data() == other
    with pytest.raises(FwllmError, match="evaluation data missing"):
        tasks.check_data(["fwllm_gsm8k"], other)


def test_a_fwllm_data_that_is_not_a_folder_is_an_error(nowhere, tmp_path, monkeypatch):
    monkeypatch.setenv("FWLLM_DATA", str(tmp_path / "absent"))
    with pytest.raises(FwllmError, match="FWLLM_DATA=.*absent is not a folder") as err:
        paths.data_root()
    assert "\n" not in str(err.value)
    assert paths.data_root(required=False) is None
    with pytest.raises(FwllmError, match="evaluation data not found"):
        tasks.eval_data()
