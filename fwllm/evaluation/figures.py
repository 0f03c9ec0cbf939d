"""The arithmetic of the quality benchmark (`eval/quality.py`): per-row scores in, figures
with 95% bootstrap intervals out. Pure numpy; no model, no file.

A task's per-row scores are `RowScores`: for a multiple-choice task `values` holds 1/0
(the row was answered right), for a response-loss task `values` holds each row's summed
NLL and `weights` its token count, so the task figure is a token mean (as the calibration
objective is). Every model is resampled with the same row indices (`Resampler`), so
differences and ratios between models are paired.

Normalized held-in score of a merge on a task, against that task's own expert:
* accuracy tasks: merged / expert x 100;
* loss tasks: the share of the expert's gain over the base that the merge keeps,
  (base - merged) / (base - expert) x 100.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

ACCURACY, LOSS = "accuracy", "loss"
LEVEL = 0.95


@dataclass
class RowScores:
    """One model's per-row results on one task (`weights` is None for accuracy tasks)."""

    values: np.ndarray
    weights: Optional[np.ndarray] = None

    def point(self) -> float:
        return statistic(self.values, self.weights)

    def resampled(self, idx: np.ndarray) -> np.ndarray:
        """The task figure on each resample: idx is [R, n] row indices -> [R]."""
        if self.weights is None:
            return self.values[idx].mean(axis=-1)
        return self.values[idx].sum(axis=-1) / self.weights[idx].sum(axis=-1)


def statistic(values: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mean of the rows, or their weighted (token) mean when `weights` is given."""
    values = np.asarray(values, dtype=float)
    if weights is None:
        return float(values.mean())
    return float(values.sum() / np.asarray(weights, dtype=float).sum())


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] row indices drawn with replacement."""
    if n < 1:
        raise ValueError("cannot resample an empty task")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(samples: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN samples, e.g. an undefined ratio, are dropped)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)


class Resampler:
    """The same bootstrap row indices for every model of a task (paired comparisons).

    Seeded by the task name, so a rerun, or a report with one more model, resamples the
    rows exactly as before."""

    def __init__(self, resamples: int = 2000, seed: int = 0):
        self.resamples, self.seed = resamples, seed
        self._idx: Dict[Tuple[str, int], np.ndarray] = {}

    def indices(self, task: str, n: int) -> np.ndarray:
        key = (task, n)
        if key not in self._idx:
            self._idx[key] = bootstrap_indices(n, self.resamples, zlib.crc32(f"{self.seed}/{task}".encode()))
        return self._idx[key]


@dataclass
class Figure:
    """A point estimate with its 95% bootstrap interval (and the samples behind it)."""

    point: float
    lo: float
    hi: float
    samples: Optional[np.ndarray] = None

    def as_dict(self) -> dict:
        return {"point": self.point, "lo": self.lo, "hi": self.hi}


def figure(point: float, samples: np.ndarray) -> Figure:
    lo, hi = interval(samples)
    return Figure(float(point), lo, hi, np.asarray(samples, dtype=float))


def normalized_accuracy(merged, expert):
    """merged / expert x 100 (elementwise on arrays of resamples)."""
    merged, expert = np.asarray(merged, dtype=float), np.asarray(expert, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expert > 0, 100.0 * merged / np.where(expert > 0, expert, 1.0), np.nan)


def gain_kept(base, expert, merged):
    """(base - merged) / (base - expert) x 100: 100 = the expert's loss, 0 = the base's.
    Undefined (NaN) where the expert does not improve on the base."""
    base, expert, merged = (np.asarray(x, dtype=float) for x in (base, expert, merged))
    gain = base - expert
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain > 0, 100.0 * (base - merged) / np.where(gain > 0, gain, 1.0), np.nan)


def normalized(metric: str, merged, expert, base=None):
    """The held-in normalized score for a task of kind `metric` (ACCURACY or LOSS)."""
    if metric == ACCURACY:
        return normalized_accuracy(merged, expert)
    if metric == LOSS:
        if base is None:
            raise ValueError("a loss task's normalized score needs the base's loss")
        return gain_kept(base, expert, merged)
    raise ValueError(f"unknown metric {metric!r}")


def task_figure(scores: RowScores, idx: np.ndarray, scale: float = 1.0) -> Figure:
    return figure(scores.point() * scale, scores.resampled(idx) * scale)


def normalized_figure(
    metric: str, merged: RowScores, expert: RowScores, base: Optional[RowScores], idx: np.ndarray
) -> Figure:
    """A merge's normalized score on one task, resampled jointly with its references."""
    point = normalized(metric, merged.point(), expert.point(), base.point() if base is not None else None)
    samples = normalized(
        metric,
        merged.resampled(idx),
        expert.resampled(idx),
        base.resampled(idx) if base is not None else None,
    )
    return figure(float(point), samples)


def mean_figure(figures: Sequence[Figure]) -> Figure:
    """Mean over tasks; tasks are resampled independently, so resample r of the mean is the
    mean of each task's resample r."""
    if not figures:
        raise ValueError("no figures to average")
    point = float(np.mean([f.point for f in figures]))
    samples = np.mean(np.stack([f.samples for f in figures]), axis=0)
    return figure(point, samples)


def difference(a: Figure, b: Figure) -> Figure:
    """a - b with paired resamples (both computed on the same row indices)."""
    return figure(a.point - b.point, a.samples - b.samples)


def pick_grid_point(losses: Dict[float, float]) -> float:
    """The grid point with the lowest loss (the smallest such point on ties)."""
    if not losses:
        raise ValueError("empty grid")
    finite = {k: v for k, v in losses.items() if np.isfinite(v)}
    if not finite:
        raise ValueError("no grid point has a finite loss")
    return min(sorted(finite), key=lambda k: finite[k])


def grid(start: float, stop: float, step: float) -> Tuple[float, ...]:
    """Inclusive grid start, start + step, ..., stop, rounded so 0.1 steps print as 0.1."""
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + i * step, 6) for i in range(count))


def accuracy_rows(logprobs: Iterable[Sequence[float]], golds: Iterable[int]) -> np.ndarray:
    """1.0 where the highest-likelihood choice is the gold one (the first maximum on ties, as
    lm-eval's argmax), else 0.0."""
    return np.array([float(int(np.argmax(lp)) == int(g)) for lp, g in zip(logprobs, golds)])
