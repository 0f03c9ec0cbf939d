"""Pure metric functions for GLUE, PubMedQA and the normalized merging score.

No I/O and no scikit-learn/scipy here: these are small enough to write out, and the
tests compare them against those libraries as an independent reference.

Argument order follows scikit-learn: ``(labels, preds)``. Every function returns a
plain float in the metric's natural scale (accuracy in [0, 1], correlations in
[-1, 1]); callers multiply by 100 for reporting.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

# tasks.json "metric" names -> the component metrics that make up the task score.
GLUE_METRIC_COMPONENTS = {
    "matthews_correlation": ("mcc",),
    "accuracy": ("acc",),
    "mean_accuracy_f1": ("acc", "f1"),
    "mean_pearson_spearman": ("pearson", "spearman"),
}


def _arrays(labels: Iterable, preds: Iterable):
    y = np.asarray(list(labels))
    p = np.asarray(list(preds))
    if y.shape != p.shape:
        raise ValueError(f"labels and preds differ in length: {y.shape} vs {p.shape}")
    if y.size == 0:
        raise ValueError("no examples to score")
    return y, p


def accuracy(labels: Sequence, preds: Sequence) -> float:
    y, p = _arrays(labels, preds)
    return float(np.mean(y == p))


def f1(labels: Sequence, preds: Sequence, positive=1) -> float:
    """F1 of the `positive` class (GLUE reports it for class 1 on MRPC and QQP)."""
    y, p = _arrays(labels, preds)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    # No predicted and no true positives: F1 is undefined; 0 matches scikit-learn's default.
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def macro_f1(labels: Sequence, preds: Sequence, classes: Optional[Sequence] = None) -> float:
    """Unweighted mean of per-class F1 (PubMedQA's official second metric).

    `classes` fixes the class set so a class the model never predicts, and that a
    small sample happens to lack, still counts (as 0) instead of vanishing.
    """
    y, p = _arrays(labels, preds)
    if classes is None:
        classes = sorted(set(y.tolist()) | set(p.tolist()))
    return float(np.mean([f1(y, p, positive=c) for c in classes]))


def matthews_corrcoef(labels: Sequence, preds: Sequence) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); 0 when undefined."""
    y, p = _arrays(labels, preds)
    classes = sorted(set(y.tolist()) | set(p.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)
    for yi, pi in zip(y.tolist(), p.tolist()):
        confusion[index[yi], index[pi]] += 1
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    n = confusion.sum()
    correct = np.trace(confusion)
    cov_yp = correct * n - float(true_counts @ pred_counts)
    cov_yy = n * n - float(true_counts @ true_counts)
    cov_pp = n * n - float(pred_counts @ pred_counts)
    if cov_yy == 0 or cov_pp == 0:
        # A constant prediction (or constant labels) carries no correlation.
        return 0.0
    return float(cov_yp / math.sqrt(cov_yy * cov_pp))


def pearson(labels: Sequence, preds: Sequence) -> float:
    """Pearson correlation; 0 when either side is constant (no measurable association)."""
    y, p = _arrays(labels, preds)
    y = y.astype(np.float64)
    p = p.astype(np.float64)
    dy = y - y.mean()
    dp = p - p.mean()
    denom = math.sqrt(float(dy @ dy) * float(dp @ dp))
    return 0.0 if denom == 0 else float(dy @ dp) / denom


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what Spearman needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(labels: Sequence, preds: Sequence) -> float:
    y, p = _arrays(labels, preds)
    return pearson(_average_ranks(y.astype(np.float64)), _average_ranks(p.astype(np.float64)))


def mean_of_two(a: float, b: float) -> float:
    return (float(a) + float(b)) / 2.0


def normalized_score(score: float, expert_score: float) -> float:
    """FW-Merging's normalized score: merged score as a percentage of the expert's own.

    Both scores must be on the same scale (e.g. both x100).
    """
    if expert_score == 0:
        raise ValueError("expert score is 0; the normalized score is undefined")
    return float(score) / float(expert_score) * 100.0


def glue_metrics(metric: str, labels: Sequence, preds: Sequence) -> Dict[str, float]:
    """Component metrics of a GLUE task plus `score`, its headline number (0-1 scale).

    `metric` is the task's tasks.json name: matthews_correlation, accuracy,
    mean_accuracy_f1 or mean_pearson_spearman.
    """
    if metric not in GLUE_METRIC_COMPONENTS:
        raise ValueError(f"unknown GLUE metric {metric!r}; known: {sorted(GLUE_METRIC_COMPONENTS)}")
    fns = {"acc": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}
    parts = {name: fns[name](labels, preds) for name in GLUE_METRIC_COMPONENTS[metric]}
    values = list(parts.values())
    parts["score"] = values[0] if len(values) == 1 else mean_of_two(*values)
    return parts
