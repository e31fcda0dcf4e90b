"""Statistics over seeds: t confidence intervals, paired t-tests and Holm's correction across a table.

Distributions come from scipy; only Holm's step-down rule is written here (a sort and a running maximum:
no library needed for it, and statsmodels would be a large dependency for six lines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def sample_std(values: list[float]) -> float:
    """Standard deviation over seeds with Bessel's correction (n - 1); undefined (nan) below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided t interval of the mean; (nan, nan) for fewer than two values or no spread to speak of."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = sum(values) / n
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sample_std(values) / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """A method against a reference, over the seeds both have: the difference, its interval and a paired t-test."""
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    p: float  # two-sided paired t-test; nan below two pairs or when every difference is the same

    @classmethod
    def of(cls, values: dict[int, float], reference: dict[int, float]) -> "Paired":
        from scipy import stats

        seeds = sorted(s for s in values if s in reference)
        diffs = [values[s] - reference[s] for s in seeds]
        n = len(diffs)
        mean = sum(diffs) / n if n else math.nan
        std = sample_std(diffs)
        low, high = mean_ci(diffs)
        p = math.nan
        if n > 1 and std > 0:
            p = float(stats.ttest_rel([values[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
        return cls(n, mean, std, low, high, p)


NO_TEST = Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan entries are no test: they stay nan and do not count)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))  # adjusted p-values never decrease down the order
        adjusted[i] = running
    return adjusted
