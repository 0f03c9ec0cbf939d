from pathlib import Path

"""The fwllm/_data/eval_tasks YAMLs load offline through lm-eval, and their hooks score correctly."""

import importlib.util
import json

import pytest
from sklearn import metrics as skm

from fwllm.core.errors import FwllmError
from fwllm.evaluation import answers, tasks
from test_eval_support import DATA

TASK_NAMES = [
    "fwllm_gsm8k",
    "fwllm_pubmedqa",
    "fwllm_humaneval",
    *(f"fwllm_glue_{t}" for t in tasks.GLUE_TASKS),
]


def _count_lines(rel):
    with open(DATA / rel, encoding="utf-8") as fp:
        return sum(1 for line in fp if line.strip())


EXPECTED_DOCS = {
    "fwllm_gsm8k": _count_lines("gsm8k/dev.jsonl"),
    "fwllm_pubmedqa": _count_lines("pubmedqa/train.jsonl"),
    "fwllm_humaneval": 164,
    **{f"fwllm_glue_{t}": _count_lines(f"glue/{t}/dev.jsonl") for t in tasks.GLUE_TASKS},
}


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    return tasks.materialize_tasks(str(DATA), str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def loaded(task_folder):
    from lm_eval.tasks import TaskManager

    # TaskManager.load is what get_task_dict (deprecated in this lm-eval) wraps.
    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    return manager, manager.load(TASK_NAMES)["tasks"]


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("fwllm_eval_task_hooks", tasks.tasks_dir() / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_index_lists_every_task_and_the_group(loaded):
    manager, _ = loaded
    assert set(TASK_NAMES) <= set(manager.all_subtasks)
    assert "fwllm_glue" in manager.all_groups


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loads_offline_with_all_docs(loaded, name):
    task = loaded[1][name]
    docs = list(task.eval_docs)
    assert len(docs) == EXPECTED_DOCS[name]
    assert isinstance(task.doc_to_text(docs[0]), str) and task.doc_to_text(docs[0])


def test_unsafe_flag_only_on_humaneval(loaded):
    leaf = loaded[1]
    assert getattr(leaf["fwllm_humaneval"], "UNSAFE_CODE", False)
    assert not any(getattr(leaf[n], "UNSAFE_CODE", False) for n in TASK_NAMES if n != "fwllm_humaneval")


def test_glue_group_has_the_eight_tasks(loaded):
    group = loaded[0].load(["fwllm_glue"])["groups"]["fwllm_glue"]
    assert sorted(group.child_names) == sorted(f"fwllm_glue_{t}" for t in tasks.GLUE_TASKS)


def test_gsm8k_uses_five_fixed_training_shots(loaded):
    task = loaded[1]["fwllm_gsm8k"]
    with open(DATA / "gsm8k/train.jsonl", encoding="utf-8") as fp:
        first = [json.loads(next(fp)) for _ in range(5)]
    doc = task.eval_docs[0]
    context = task.fewshot_context(doc, num_fewshot=5)
    assert context.count("Question:") == 6
    for shot in first:
        assert shot["question"] in context
    assert context.endswith(f"Question: {doc['question']}\nAnswer:")


def test_materialized_yamls_use_absolute_data_paths(task_folder):
    text = (task_folder / "fwllm_glue_rte.yaml").read_text()
    # every data file is named absolutely (the packaged root itself ends in the relative prefix)
    named = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().endswith(".jsonl")]
    assert named and all(Path(p).is_absolute() and Path(p).is_file() for p in named)
    assert f"{DATA.as_posix()}/glue/rte/dev.jsonl" in text
    # Same sources give the same folder (digest-named), so repeated calls are free.
    assert tasks.materialize_tasks(str(DATA), str(task_folder.parents[1])) == task_folder


def test_committed_yamls_resolve_from_the_repo_root(monkeypatch):
    from lm_eval.tasks import TaskManager

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    manager = TaskManager(include_path=str(repo / "fwllm" / "_data" / "eval_tasks"), include_defaults=False)
    task = manager.load(["fwllm_glue_rte"])["tasks"]["fwllm_glue_rte"]
    assert len(task.eval_docs) == EXPECTED_DOCS["fwllm_glue_rte"]


def test_resolve_tasks_names_and_errors():
    assert tasks.resolve_tasks(["math", "rte", "fwllm_glue_rte"]) == ["fwllm_gsm8k", "fwllm_glue_rte"]
    assert tasks.resolve_tasks(["fwllm_glue"]) == [f"fwllm_glue_{t}" for t in tasks.GLUE_TASKS]
    with pytest.raises(FwllmError, match="unknown suite or task 'poetry'.*suites: code, math"):
        tasks.resolve_tasks(["poetry"])
    with pytest.raises(FwllmError, match="evaluation data missing"):
        tasks.check_data(["fwllm_gsm8k"], DATA / "nowhere")


# ----------------------------------------------------------------------------- hooks


def _lls(best, n):
    """Fake multiple-choice results where choice `best` has the highest loglikelihood."""
    return [(-1.0 if i == best else -5.0 - i, False) for i in range(n)]


def test_pubmedqa_choice_mapping(hooks):
    assert hooks.PUBMEDQA_CHOICES == ["yes", "no", "maybe"]
    for answer, index in [("yes", 0), ("no", 1), ("maybe", 2), (" Maybe ", 2)]:
        assert hooks.pubmedqa_target({"final_decision": answer}) == index
    doc = {"final_decision": "no", "contexts": ["First part.", "Second part."], "question": "Does it?"}
    assert hooks.pubmedqa_text(doc) == "Abstract: First part.\nSecond part.\nQuestion: Does it?\nAnswer:"
    assert hooks.pubmedqa_results(doc, _lls(1, 3)) == {"acc": 1.0, "f1_macro": (1, 1)}
    assert hooks.pubmedqa_results(doc, _lls(2, 3)) == {"acc": 0.0, "f1_macro": (1, 2)}
    items = [(0, 0), (1, 0), (2, 2), (1, 1), (0, 1)]
    golds, preds = zip(*items)
    assert hooks.macro_f1_agg(items) == pytest.approx(skm.f1_score(golds, preds, average="macro"))


def test_glue_hooks_and_aggregations_match_sklearn(hooks):
    docs = [{"label": y} for y in [1, 0, 1, 1, 0, 0]]
    picks = [1, 0, 0, 1, 1, 0]
    items = [hooks.acc_f1_results(d, _lls(p, 2)) for d, p in zip(docs, picks)]
    pairs = [i["score"] for i in items]
    golds = [d["label"] for d in docs]
    assert pairs == list(zip(golds, picks))
    acc, f1 = skm.accuracy_score(golds, picks), skm.f1_score(golds, picks)
    assert hooks.acc_f1_agg(pairs) == pytest.approx((acc + f1) / 2)
    assert hooks.f1_agg(pairs) == pytest.approx(f1)
    assert hooks.mcc_agg(pairs) == pytest.approx(skm.matthews_corrcoef(golds, picks))
    assert sum(i["acc"] for i in items) / len(items) == pytest.approx(acc)
    assert set(hooks.cola_results(docs[0], _lls(1, 2))) == {"acc", "mcc", "score"}


def test_stsb_hook_correlates_the_chosen_score(hooks):
    from scipy import stats

    golds = [4.6, 1.2, 3.0, 0.4, 2.5]
    picks = [5, 1, 2, 0, 3]
    pairs = [hooks.stsb_results({"label": g}, _lls(p, 6))["score"] for g, p in zip(golds, picks)]
    assert pairs == [(g, float(p)) for g, p in zip(golds, picks)]
    expected = (stats.pearsonr(golds, picks)[0] + stats.spearmanr(golds, picks)[0]) / 2
    assert hooks.pearson_spearman_agg(pairs) == pytest.approx(expected)
    assert hooks.stsb_target({"label": 2.6}) == 3


def test_gsm8k_filters_and_scoring(hooks):
    resps = [["So 2 + 3 = 5.\n#### 5"], ["She pays $1,250 in total."], ["no digits here"]]
    assert hooks.gsm8k_strict(resps, [{}] * 3) == [["5"], ["[invalid]"], ["[invalid]"]]
    assert hooks.gsm8k_flexible(resps, [{}] * 3) == [["5"], ["1250"], ["[invalid]"]]
    doc = {"answer": "Total is 1,000 + 250 = <<1000+250=1250>>1250\n#### 1,250"}
    assert hooks.gsm8k_results(doc, ["1250"]) == {"exact_match": 1.0}
    assert hooks.gsm8k_results(doc, ["125"]) == {"exact_match": 0.0}


def test_gsm8k_gold_answers_parse_for_the_whole_dev_file():
    with open(DATA / "gsm8k/dev.jsonl", encoding="utf-8") as fp:
        rows = [json.loads(line) for line in fp]
    golds = [answers.gold_answer(r["answer"]) for r in rows]
    assert all(g.lstrip("-").isdigit() for g in golds)
    assert golds[0] == "18"  # Janet's ducks
