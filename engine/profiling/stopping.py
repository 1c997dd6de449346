"""When a point has enough trials: the 95% confidence interval of its mean is tight.

A point is complete when, for runtime and for energy (where energy was measured), the
half-width of the 95% t-interval of the mean is within ``rel_bound`` of the mean, after
at least ``min_trials`` trials; or when it has ``max_trials`` trials. (The paper used an
absolute 0.5 s bound on runtime; a relative bound serves short and long requests alike.)

A point that reaches ``max_trials`` without a tight interval did **not converge**: its
mean is less certain than the rule asks, although the rule had its full chance. It is
kept, never dropped, but marked (:class:`PointOutcome`), so the job's finish reason,
``jobs list``, the pages and the fits can say so. Under load on a shared CPU such points
are common: trials spread by ~100% of the mean, and 25 trials do not pin the mean down
to ±5%. Points whose trials ended for another reason are recorded with their interval and
why they stopped, but not called unconverged, because the rule was not given its chance:
a job with as many minimum as maximum trials asked for a fixed count (``fixed-trials``);
an adaptive design ended them early by choice (its budget ran out: ``budget``; more
trials there were judged not worth their time: ``settled``), and the cross-validated
error of its fits speaks for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import stats

#: Why a point's trials stopped.
STOP_REASONS = ("converged", "max-trials", "fixed-trials", "budget", "settled")


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


def _measured(energies_j: Sequence[float | None]) -> list[float]:
    return [e for e in energies_j if e is not None and not math.isnan(e)]


@dataclass(frozen=True)
class PointAssessment:
    """How sure the mean of one point is.

    ``runtime_ci_rel`` and ``energy_ci_rel`` are the half-widths of the 95% CI of the mean
    relative to the mean (inf with fewer than 2 trials); ``energy_ci_rel`` is None when
    energy was not measured in every trial (runtime then decides). ``tight``: both within
    the rule's bound after at least ``min_trials`` trials.
    """

    trials: int
    runtime_ci_rel: float
    energy_ci_rel: float | None
    tight: bool

    @property
    def worst_ci_rel(self) -> float:
        """The wider of the two relative half-widths."""
        return max(self.runtime_ci_rel, self.energy_ci_rel if self.energy_ci_rel is not None else 0.0)


def assess_point(runtimes_s: Sequence[float], energies_j: Sequence[float | None], rule: StopRule) -> PointAssessment:
    """The confidence intervals of a point's trials against the rule."""
    n = len(runtimes_s)
    measured = _measured(energies_j)
    runtime_ci = relative_half_width(runtimes_s, rule.confidence)
    energy_ci = relative_half_width(measured, rule.confidence) if n and len(measured) == n else None
    tight = bool(n >= rule.min_trials and runtime_ci <= rule.rel_bound
                 and (energy_ci is None or energy_ci <= rule.rel_bound))
    return PointAssessment(trials=n, runtime_ci_rel=float(runtime_ci),
                           energy_ci_rel=None if energy_ci is None else float(energy_ci), tight=tight)


def point_complete(runtimes_s: Sequence[float], energies_j: Sequence[float | None], rule: StopRule) -> bool:
    """Whether a point's trials satisfy the rule (unmeasured energies leave runtime to decide)."""
    if len(runtimes_s) >= rule.max_trials:
        return True
    return assess_point(runtimes_s, energies_j, rule).tight


@dataclass(frozen=True)
class PointOutcome:
    """How the trials of one design point ended (one row of ``profiling_points``).

    ``converged``: the CI rule was met. ``stopped``: one of :data:`STOP_REASONS`
    (``max-trials``: the cap was reached first; ``fixed-trials``: the job asked for a
    fixed count; ``budget``: an adaptive design ran out of time; ``settled``: an adaptive
    design judged more trials here not worth their time).
    ``*_ci_rel``: relative half-widths of the 95% CI of the mean (None where undefined).
    """

    input_tokens: int
    output_tokens: int
    trials: int
    converged: bool
    stopped: str
    runtime_ci_rel: float | None
    energy_ci_rel: float | None
    batch_size: int = 1  # requests run together in each trial of the point

    @property
    def worst_ci_rel(self) -> float | None:
        """The wider of the two relative half-widths (None when neither is known)."""
        known = [v for v in (self.runtime_ci_rel, self.energy_ci_rel) if v is not None]
        return max(known) if known else None

    @property
    def unconverged(self) -> bool:
        """Reached the trial cap without a tight interval (see the module docstring)."""
        return self.stopped == "max-trials"

    def to_row(self) -> dict:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "batch_size": self.batch_size,
                "trials": self.trials,
                "converged": self.converged, "stopped": self.stopped, "runtime_ci_rel": self.runtime_ci_rel,
                "energy_ci_rel": self.energy_ci_rel}


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def point_outcome(input_tokens: int, output_tokens: int, runtimes_s: Sequence[float],
                  energies_j: Sequence[float | None], rule: StopRule, stopped_early: str = "budget", *,
                  batch_size: int = 1) -> PointOutcome:
    """The outcome of a point whose trials are over: converged, or why not.

    ``stopped_early`` names why trials ended below ``max_trials`` without a tight interval
    (only an adaptive design or a budget stops a point there).
    """
    assessment = assess_point(runtimes_s, energies_j, rule)
    if assessment.tight:
        stopped = "converged"
    elif assessment.trials >= rule.max_trials:
        stopped = "max-trials" if rule.max_trials > rule.min_trials else "fixed-trials"
    else:
        stopped = stopped_early
    return PointOutcome(int(input_tokens), int(output_tokens), assessment.trials, assessment.tight, stopped,
                        _finite_or_none(assessment.runtime_ci_rel), _finite_or_none(assessment.energy_ci_rel),
                        int(batch_size))


def unconverged_summary(outcomes: Iterable[PointOutcome]) -> str | None:
    """``2 of 9 points did not converge (worst ±38% at 25 trials)``, or None when every point did."""
    outcomes = list(outcomes)
    loose = [o for o in outcomes if o.unconverged]
    if not loose:
        return None
    worst = max(loose, key=lambda o: o.worst_ci_rel if o.worst_ci_rel is not None else math.inf)
    width = worst.worst_ci_rel
    spread = "spread unknown" if width is None else f"±{width:.1%}" if width < 0.1 else f"±{width:.0%}"
    noun = "point" if len(outcomes) == 1 else "points"
    return (f"{len(loose)} of {len(outcomes)} {noun} did not converge (worst {spread} at "
            f"{worst.trials} trial{'' if worst.trials == 1 else 's'})")
