"""When a point has enough trials: the 95% confidence interval of its mean is tight.

A point is complete when, for runtime and for energy (where energy was measured), the
half-width of the 95% t-interval of the mean is within ``rel_bound`` of the mean, after
at least ``min_trials`` trials; or when it has ``max_trials`` trials. (The paper used an
absolute 0.5 s bound on runtime; a relative bound serves short and long requests alike.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class StopRule:
    """The repetition rule of a job. ``rel_bound`` 0.05 means ±5% of the mean."""

    rel_bound: float = 0.05
    min_trials: int = 3
    max_trials: int = 25
    confidence: float = 0.95


def relative_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the t confidence interval of the mean, relative to the mean (inf if undefined)."""
    n = len(values)
    if n < 2:
        return math.inf
    mean = sum(values) / n
    if mean <= 0:
        return math.inf
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * math.sqrt(variance / n)
    return half / mean


def point_complete(runtimes_s: Sequence[float], energies_j: Sequence[float | None], rule: StopRule) -> bool:
    """Whether a point's trials satisfy the rule (unmeasured energies leave runtime to decide)."""
    n = len(runtimes_s)
    if n >= rule.max_trials:
        return True
    if n < rule.min_trials:
        return False
    measured = [e for e in energies_j if e is not None and not math.isnan(e)]
    tight = relative_half_width(runtimes_s, rule.confidence) <= rule.rel_bound
    if len(measured) == n:
        tight = tight and relative_half_width(measured, rule.confidence) <= rule.rel_bound
    return tight
