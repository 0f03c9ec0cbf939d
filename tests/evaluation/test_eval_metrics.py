"""fwllm.evaluation.metrics against scikit-learn/scipy and hand-computed values."""

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from fwllm.evaluation import metrics

LABELS = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
PREDS = [1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0]
LABELS3 = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0]
PREDS3 = [0, 2, 2, 1, 1, 0, 1, 2, 1, 0, 2, 2]
GOLD_SIM = [5.0, 4.2, 0.5, 3.0, 2.75, 1.0, 0.0, 3.6, 4.8, 2.0]
PRED_SIM = [5, 4, 1, 2, 3, 1, 1, 4, 5, 2]


def test_accuracy_f1_mcc_match_sklearn():
    assert metrics.accuracy(LABELS, PREDS) == pytest.approx(skm.accuracy_score(LABELS, PREDS))
    assert metrics.f1(LABELS, PREDS) == pytest.approx(skm.f1_score(LABELS, PREDS))
    assert metrics.matthews_corrcoef(LABELS, PREDS) == pytest.approx(skm.matthews_corrcoef(LABELS, PREDS))
    assert metrics.matthews_corrcoef(LABELS3, PREDS3) == pytest.approx(skm.matthews_corrcoef(LABELS3, PREDS3))


def test_macro_f1_matches_sklearn_including_unpredicted_class():
    assert metrics.macro_f1(LABELS3, PREDS3) == pytest.approx(skm.f1_score(LABELS3, PREDS3, average="macro"))
    # Class 2 ("maybe") neither predicted nor present still counts as F1 = 0.
    golds, preds = [0, 1, 0, 1], [0, 1, 1, 1]
    expected = skm.f1_score(golds, preds, labels=[0, 1, 2], average="macro", zero_division=0)
    assert metrics.macro_f1(golds, preds, classes=[0, 1, 2]) == pytest.approx(expected)


def test_correlations_match_scipy():
    assert metrics.pearson(GOLD_SIM, PRED_SIM) == pytest.approx(stats.pearsonr(GOLD_SIM, PRED_SIM)[0])
    assert metrics.spearman(GOLD_SIM, PRED_SIM) == pytest.approx(stats.spearmanr(GOLD_SIM, PRED_SIM)[0])


def test_glue_metrics_compose_the_task_score():
    mrpc = metrics.glue_metrics("mean_accuracy_f1", LABELS, PREDS)
    acc, f1 = skm.accuracy_score(LABELS, PREDS), skm.f1_score(LABELS, PREDS)
    assert mrpc == pytest.approx({"acc": acc, "f1": f1, "score": (acc + f1) / 2})
    stsb = metrics.glue_metrics("mean_pearson_spearman", GOLD_SIM, PRED_SIM)
    expected = (stats.pearsonr(GOLD_SIM, PRED_SIM)[0] + stats.spearmanr(GOLD_SIM, PRED_SIM)[0]) / 2
    assert stsb["score"] == pytest.approx(expected)
    assert metrics.glue_metrics("matthews_correlation", LABELS, PREDS)["score"] == pytest.approx(
        skm.matthews_corrcoef(LABELS, PREDS)
    )
    assert metrics.glue_metrics("accuracy", LABELS3, PREDS3)["score"] == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="unknown GLUE metric"):
        metrics.glue_metrics("bleu", LABELS, PREDS)


def test_degenerate_inputs_score_zero_not_nan():
    assert metrics.matthews_corrcoef([0, 1, 1], [1, 1, 1]) == 0.0
    assert metrics.pearson([1.0, 2.0, 3.0], [2, 2, 2]) == 0.0
    assert metrics.f1([0, 0], [0, 0]) == 0.0
    assert not math.isnan(metrics.spearman([1, 2, 3], [0, 0, 0]))


def test_normalized_score_by_hand():
    # 56.52 is the CoLA expert's reference; a merged 42.39 keeps 75 % of it.
    assert metrics.normalized_score(42.39, 56.52) == pytest.approx(75.0)
    assert metrics.normalized_score(94.72, 94.72) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        metrics.normalized_score(1.0, 0.0)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_random_binary_against_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert metrics.matthews_corrcoef(y, p) == pytest.approx(skm.matthews_corrcoef(y, p))
    assert metrics.f1(y, p) == pytest.approx(skm.f1_score(y, p))
