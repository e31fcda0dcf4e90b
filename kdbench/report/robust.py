"""rliable's estimators (Agarwal et al., NeurIPS 2021) for results over several tasks with few seeds each: the
interquartile mean, its stratified-bootstrap interval, and the probability of improvement.

Written here, in numpy and scipy, because the rliable package cannot be imported with kdbench's pins: rliable 1.2
requires arch < 8, and arch 7 fails at import under pandas 3 (`deprecate_kwarg() missing 'new_arg_name'`). The
definitions follow rliable's `metrics.aggregate_iqm` (scipy's 25 % trimmed mean over every run of every task),
`metrics.probability_of_improvement` (the Mann-Whitney statistic per task, averaged over tasks) and
`library.get_interval_estimates` (percentile intervals of a bootstrap that resamples runs within each task).
The bootstrap is seeded: the same scores give the same intervals, byte for byte.
"""

from __future__ import annotations

import math

import numpy as np

REPS = 10_000  # bootstrap resamples
SEED = 0
CONFIDENCE = 0.95


def iqm(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """The interquartile mean: the mean of the middle half (the lowest and highest quarter cut, as scipy cuts)."""
    from scipy import stats  # not at start-up: `kdbench run` never needs it (as report/stats.py)

    return stats.trim_mean(values, 0.25, axis=axis)


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def iqm_interval(tasks: list[np.ndarray], reps: int = REPS, seed: int = SEED) -> tuple[float, float, float]:
    """(IQM over every run of every task, and its 95 % stratified-bootstrap interval): each resample draws each
    task's runs from that task's own, with replacement. nan for no runs."""
    tasks = [np.asarray(t, dtype=float) for t in tasks if len(t)]
    if not tasks:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    resampled = np.concatenate([t[rng.integers(0, len(t), (reps, len(t)))] for t in tasks], axis=1)
    return float(iqm(np.concatenate(tasks))), *_percentiles(iqm(resampled, axis=1))


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 over every pair of runs; x, y: (..., n) and (..., m)."""
    x, y = x[..., :, None], y[..., None, :]
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-2, -1))


def improvement_interval(xs: list[np.ndarray], ys: list[np.ndarray], reps: int = REPS,
                         seed: int = SEED) -> tuple[float, float, float]:
    """The probability that a run of X beats a run of Y on a task, averaged over the tasks both have runs on, and
    its 95 % stratified-bootstrap interval (X's and Y's runs resampled within each task). nan for no such task."""
    pairs = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in zip(xs, ys) if len(x) and len(y)]
    if not pairs:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    point = np.mean([_improvement(x, y) for x, y in pairs])
    boot = np.mean([_improvement(x[rng.integers(0, len(x), (reps, len(x)))], y[rng.integers(0, len(y), (reps, len(y)))])
                    for x, y in pairs], axis=0)
    return float(point), *_percentiles(boot)
