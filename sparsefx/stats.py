"""Accuracy statistics shared by task scoring and plotting (no heavy imports: ``sparsefx plot`` reads them)."""

from __future__ import annotations

import math


def mean_stderr(values: list[float]) -> float:
    """lm-eval's ``mean_stderr``: the sample standard deviation (n - 1) over sqrt(n); 0 below two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def mean_of_estimates(values: list[float], stderrs: list[float]) -> tuple[float, float]:
    """The unweighted mean of ``k`` independent estimates and its standard error, sqrt(sum se^2) / k."""
    k = len(values)
    return sum(values) / k, math.sqrt(sum(e * e for e in stderrs)) / k
