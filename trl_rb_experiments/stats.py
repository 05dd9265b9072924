"""Summary statistics shared by the experiment and the studies."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["mean_se"]


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of ``values``: SE = sample standard deviation (ddof=1) / sqrt(n).

    The SE is nan for fewer than two values (undefined), and both are nan for none.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in xs) / (n - 1)
    return mean, math.sqrt(var / n)
