"""Encoder GLUE evaluation with per-task heads on a tiny random RoBERTa."""

import json

import pytest
from scipy import stats
from sklearn import metrics as skm

from fwllm.core.errors import FwllmError
from fwllm.evaluation import encoder
from test_eval_support import DATA, make_tiny_roberta

LIMIT = 24


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    return make_tiny_roberta(tmp_path_factory.mktemp("roberta") / "merged", tasks=("cola", "stsb", "mnli"))


@pytest.fixture(scope="module")
def scored(roberta_dir):
    return encoder.evaluate_encoder(
        str(roberta_dir), data=str(DATA), limit=LIMIT, batch_size=8, progress=False
    )


def _predictions(model_dir, task):
    """Independent re-run of one head: returns (labels, predictions)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fwllm.arch.heads import apply_head, load_heads

    info = encoder.load_task_info(DATA)[task]
    model = apply_head(
        AutoModelForSequenceClassification.from_pretrained(model_dir), load_heads(model_dir)[task]
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = encoder.load_rows(task, DATA, limit=LIMIT)
    preds = encoder.predict(
        model, tokenizer, rows, info["text_fields"], info["problem_type"] == "regression", 8
    )
    return [r["label"] for r in rows], preds.tolist()


def test_routing_and_head_discovery(roberta_dir):
    assert encoder.is_encoder_dir(str(roberta_dir))
    assert encoder.heads_tasks(str(roberta_dir)) == ["cola", "stsb", "mnli"]


def test_every_head_is_scored_with_its_task_metric(scored, roberta_dir):
    assert list(scored) == ["cola", "stsb", "mnli"]
    assert all(r["n"] == LIMIT for r in scored.values())

    golds, preds = _predictions(str(roberta_dir), "cola")
    assert set(preds) <= {0, 1}
    assert scored["cola"]["score"] == pytest.approx(100 * skm.matthews_corrcoef(golds, preds), abs=1e-6)

    golds, preds = _predictions(str(roberta_dir), "mnli")
    assert set(preds) <= {0, 1, 2}
    assert scored["mnli"]["score"] == pytest.approx(100 * skm.accuracy_score(golds, preds), abs=1e-6)

    golds, preds = _predictions(str(roberta_dir), "stsb")
    expected = 50 * (stats.pearsonr(golds, preds)[0] + stats.spearmanr(golds, preds)[0])
    assert scored["stsb"]["score"] == pytest.approx(expected, abs=1e-4)
    assert set(scored["stsb"]["metrics"]) == {"pearson", "spearman"}


def test_normalized_against_reference_and_given_expert_scores(scored, roberta_dir):
    reference = json.loads((DATA / "glue" / "tasks.json").read_text())["tasks"]["mnli"][
        "reference_finetuned_score"
    ]
    mnli = scored["mnli"]
    assert mnli["expert_score"] == reference
    assert mnli["normalized"] == pytest.approx(mnli["score"] / reference * 100)
    again = encoder.evaluate_encoder(
        str(roberta_dir),
        tasks=["mnli"],
        data=str(DATA),
        limit=LIMIT,
        expert_scores={"mnli": 50.0},
        progress=False,
    )
    assert again["mnli"]["normalized"] == pytest.approx(mnli["score"] * 2)


def test_missing_head_is_a_clear_error(roberta_dir):
    with pytest.raises(FwllmError, match="no head for rte"):
        encoder.evaluate_encoder(str(roberta_dir), tasks=["rte"], data=str(DATA), limit=2, progress=False)
