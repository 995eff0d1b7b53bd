"""Error bars over seeds: mean, standard error, difference of two means, the 2-s.e. rule.

Plain floats in, floats out (one value per seed, n values). A standard error needs at
least two values: with one it is NaN, and nothing can be called significant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean of `xs` (n >= 1 values)."""
    return math.fsum(xs) / len(xs)


def standard_error(xs: Sequence[float]) -> float:
    """Standard error of the mean: s / sqrt(n), with s the sample standard deviation
    (divisor n - 1). NaN for n < 2 (one value says nothing about the spread).

    Example: xs = (1, 2, 6): mean 3, squared deviations 4 + 1 + 9 = 14,
    s^2 = 14 / 2 = 7, se = sqrt(7 / 3) = 1.5275.
    """
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def difference(mean_a: float, se_a: float, mean_b: float, se_b: float) -> tuple[float, float]:
    """Difference of two independent means and its standard error:
    (mean_a - mean_b, sqrt(se_a^2 + se_b^2)).

    Example: 0.80 +- 0.03 against 0.70 +- 0.04 -> (0.10, sqrt(0.0009 + 0.0016) = 0.05).
    """
    return mean_a - mean_b, math.sqrt(se_a ** 2 + se_b ** 2)


def is_significant(diff: float, se: float, k: float = 2.0) -> bool:
    """The rule every verdict uses: |diff| >= k standard errors (k = 2). False when the
    standard error is NaN (fewer than two seeds)."""
    if math.isnan(se):
        return False
    return abs(diff) >= k * se
