"""The adaptive design's judgement: fit what was measured, then measure where it helps most.

The adaptive design measures one request at a time (batch size 1; a batch axis comes from a
fixed design profiled at several batch sizes, :mod:`engine.profiling.design`).

The worker (:mod:`engine.profiling.worker`) starts an adaptive job on its 3 x 3 grid, a
few trials a point, then alternates **rounds**: fit the energy and runtime surfaces of
everything measured so far (:func:`fit_round`, the same forms and grouped
cross-validation as ``fit``), decide whether to stop (:func:`stop_reason`), and if not,
pick the next batch of trials (:func:`plan_batch`). This module only decides; it never
measures, sleeps or reads a clock, so every rule here is tested with made-up trials.

**Where to measure.** Every place the batch could go is scored on one scale: the
half-width of a 95% interval for the mean value there, relative to that value.

- a measured point: the confidence interval of its trials' mean (the stop rule's own
  figure, the worse of energy and runtime). More trials there narrow it as 1/√n;
- a new point (candidates from :func:`engine.fitting.suggest_points`, within the
  measured range): 1.96 x the fitted surface's relative standard error there
  (bootstrap). Measuring it only helps when that is wider than what its first trials
  would give, at the noise measured next to it.

The batch takes places in order of half-width per √second of a trial (what one second
spent there narrows most), one action per place, until it fills its share of the
budget. **When noise dominates** (the cross-validated error is mostly the trials'
own spread: noise MAPE ≥ half the CV MAPE), short requests mostly add noise, so new
points and extra trials go to requests that take at least as long as the median measured
one: their relative noise is lower (a few milliseconds of jitter are ±30% of a 20 ms
request and ±3% of a 200 ms one; on the demo models here, trials of 20-60 ms spread by
30-40%, of 150 ms and more by 5-15%) and their trials pin down the per-token slopes. The
3 x 3 grid keeps the short corner measured either way, so the surface's domain still
covers it.

**When to stop.** At the budget (a trial is only started when it, and the fit after
it, fit in the time left), when the cross-validated error (energy, and runtime) improved
by less than :attr:`AdaptiveRules.min_improvement` over the last two rounds, or when
no place is left worth a trial (every point converged or at its trial cap, and the
surface is surer everywhere than a few trials would be).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from engine.errors import InputError
from engine.profiling.design import DesignPoint
from engine.profiling.stopping import StopRule, assess_point

if TYPE_CHECKING:  # the fitting stack loads only when an adaptive job fits
    from engine.fitting import FitResult

#: z for the half-width of a two-sided 95% interval.
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class AdaptiveRules:
    """The constants of the adaptive design (see the module docstring for what each does)."""

    min_improvement: float = 0.01       # CV MAPE, as a fraction: 1 point over ...
    patience_rounds: int = 2            # ... this many rounds, or stop
    round_share: float = 0.15           # a round's trials take about this share of the whole budget
    min_round_s: float = 2.0            # ... and at least this long
    noise_dominates: float = 0.5        # noise MAPE / CV MAPE at or above which noise dominates
    new_points_per_round: int = 3       # candidates considered per round
    n_bootstrap: int = 100              # bootstrap draws of the round fits (the final fit uses the default)


RULES = AdaptiveRules()


@dataclass
class PointTrials:
    """The trials of one point so far: runtimes (s) and energies (J, None where not measured)."""

    runtimes_s: list[float] = field(default_factory=list)
    energies_j: list[float | None] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.runtimes_s)

    @property
    def mean_runtime_s(self) -> float | None:
        return float(np.mean(self.runtimes_s)) if self.runtimes_s else None

    def add(self, runtime_s: float, energy_j: float | None) -> None:
        self.runtimes_s.append(float(runtime_s))
        self.energies_j.append(None if energy_j is None or (isinstance(energy_j, float) and math.isnan(energy_j))
                               else float(energy_j))

    def relative_sd(self) -> float | None:
        """The larger relative SD of runtime and energy over the trials (None with fewer than 2)."""
        if self.n < 2:
            return None
        values = [np.asarray(self.runtimes_s)]
        energies = [e for e in self.energies_j if e is not None]
        if len(energies) == self.n:
            values.append(np.asarray(energies))
        return float(max(np.std(v, ddof=1) / np.mean(v) for v in values))


Trials = dict[DesignPoint, PointTrials]


def trials_from_frame(frame: pd.DataFrame) -> Trials:
    """Stored trials (columns input_tokens, output_tokens, runtime_s, energy_j) by point, in stored order."""
    trials: Trials = {}
    for row in frame.itertuples(index=False):
        point = DesignPoint(int(row.input_tokens), int(row.output_tokens))
        trials.setdefault(point, PointTrials()).add(row.runtime_s, None if pd.isna(row.energy_j) else row.energy_j)
    return trials


# -- fitting a round ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundFit:
    """The surfaces fitted in one round, and the errors they reached.

    ``energy``/``runtime``: the fits (None when one could not be made: ``problem`` says
    why); ``*_cv_mape``: their cross-validated MAPE; ``*_noise_mape``: the floor that
    trial-to-trial noise puts under it (None without repeated trials).
    """

    energy: FitResult | None = None
    runtime: FitResult | None = None
    problem: str | None = None

    def _get(self, target: str, attribute: str) -> float | None:
        fit = getattr(self, target)
        if fit is None:
            return None
        value = fit.cv_mape if attribute == "cv_mape" else fit.details.get("noise_mape")
        return None if value is None or not math.isfinite(value) else float(value)

    @property
    def energy_cv_mape(self) -> float | None:
        return self._get("energy", "cv_mape")

    @property
    def runtime_cv_mape(self) -> float | None:
        return self._get("runtime", "cv_mape")

    @property
    def energy_noise_mape(self) -> float | None:
        return self._get("energy", "noise_mape")

    @property
    def runtime_noise_mape(self) -> float | None:
        return self._get("runtime", "noise_mape")

    @property
    def fits(self) -> list[FitResult]:
        return [f for f in (self.energy, self.runtime) if f is not None]

    def noise_dominates(self, rules: AdaptiveRules = RULES) -> bool:
        """True when, for every fitted target, noise accounts for most of the CV error."""
        pairs = [(self.energy_cv_mape, self.energy_noise_mape), (self.runtime_cv_mape, self.runtime_noise_mape)]
        known = [(cv, noise) for cv, noise in pairs if cv is not None and noise is not None and cv > 0]
        return bool(known) and all(noise >= rules.noise_dominates * cv for cv, noise in known)


def fit_round(trials: Trials, model: str, device: str, energy_source: str | None = None,
              rules: AdaptiveRules = RULES, random_state: int = 0) -> RoundFit:
    """Energy and runtime fits of the trials so far (a :class:`RoundFit` with the problem when none can be made)."""
    from engine.fitting import fit_frame  # the fitting stack loads only for adaptive jobs

    rows = [(p.input_tokens, p.output_tokens, r, np.nan if e is None else e)
            for p, t in trials.items() for r, e in zip(t.runtimes_s, t.energies_j)]
    frame = pd.DataFrame(rows, columns=["input_tokens", "output_tokens", "runtime_s", "energy_j"])
    frame.insert(0, "device", device)
    frame.insert(0, "model", model)
    frame["energy_source"] = energy_source
    try:
        fits = fit_frame(frame, random_state=random_state, n_bootstrap=rules.n_bootstrap)
    except InputError as exc:
        return RoundFit(problem=str(exc))
    by_target = {f.target: f for f in fits}
    return RoundFit(energy=by_target.get("energy"), runtime=by_target.get("runtime"))


# -- when to stop -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundRecord:
    """One round as stored (``profiling_rounds``): when, how much, what error, what next."""

    round: int
    elapsed_s: float
    trials: int
    points: int
    energy_cv_mape: float | None
    runtime_cv_mape: float | None
    energy_noise_mape: float | None = None
    runtime_noise_mape: float | None = None
    decision: str | None = None

    def to_row(self) -> dict:
        return {"round": self.round, "elapsed_s": self.elapsed_s, "trials": self.trials, "points": self.points,
                "energy_cv_mape": self.energy_cv_mape, "runtime_cv_mape": self.runtime_cv_mape,
                "energy_noise_mape": self.energy_noise_mape, "runtime_noise_mape": self.runtime_noise_mape,
                "decision": self.decision}


def settled(history: Sequence[RoundRecord], rules: AdaptiveRules = RULES) -> str | None:
    """Why more rounds are not worth it: the CV error improved by less than the rule over the last rounds.

    Compares the newest round with the one ``patience_rounds`` before it, for energy and
    runtime (those with a fit in both); None while either improved enough, or too few
    rounds have been fitted to tell.
    """
    if len(history) <= rules.patience_rounds:
        return None
    before, now = history[-1 - rules.patience_rounds], history[-1]
    gains = []
    for target in ("energy", "runtime"):
        old, new = getattr(before, f"{target}_cv_mape"), getattr(now, f"{target}_cv_mape")
        if old is not None and new is not None:
            gains.append((target, old - new, new))
    if not gains or any(gain >= rules.min_improvement for _, gain, _ in gains):
        return None
    return (f"the cross-validated error improved by less than {rules.min_improvement:.0%} over the last "
            f"{rules.patience_rounds} rounds")


# -- where to measure next ----------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    """Measure ``trials`` more trials at ``point`` (a new point when ``new``), and why."""

    point: DesignPoint
    trials: int
    new: bool
    half_width: float   # relative half-width of the 95% interval there, before
    why: str


def _nearest_noise(point: DesignPoint, trials: Trials) -> float | None:
    """The relative SD measured at the nearest point with repeated trials (log2 distance)."""
    best, best_distance = None, math.inf
    for other, t in trials.items():
        sd = t.relative_sd()
        if sd is None:
            continue
        distance = math.hypot(math.log2(point.input_tokens / other.input_tokens),
                              math.log2(point.output_tokens / other.output_tokens))
        if distance < best_distance:
            best, best_distance = sd, distance
    return best


def expected_trial_s(point: DesignPoint, trials: Trials, fit: RoundFit) -> float:
    """How long one trial at a point should take: its mean so far, else the runtime surface, else the slowest seen."""
    if point in trials and trials[point].n:
        return float(trials[point].mean_runtime_s)
    if fit.runtime is not None:
        return max(float(fit.runtime.predict_raw([point.input_tokens], [point.output_tokens])[0]), 1e-3)
    seen = [t.mean_runtime_s for t in trials.values() if t.n]
    return max(seen) if seen else 1.0


def _median_request_s(trials: Trials) -> float:
    """The median over measured points of their mean request time (0 before any)."""
    means = [t.mean_runtime_s for t in trials.values() if t.n]
    return float(np.median(means)) if means else 0.0


def candidate_points(fit: RoundFit, trials: Trials, rules: AdaptiveRules = RULES) -> pd.DataFrame:
    """New points where the surfaces are least sure (columns input_tokens, output_tokens, relative_standard_error)."""
    from engine.fitting import suggest_points

    fits = [f for f in fit.fits if f.coef_cov is not None]
    if not fits:
        return pd.DataFrame(columns=["input_tokens", "output_tokens", "relative_standard_error"])
    suggested = suggest_points(fits, n=rules.new_points_per_round * 2)
    measured = {(p.input_tokens, p.output_tokens) for p in trials}
    keep = [(int(i), int(o)) not in measured for i, o in zip(suggested.input_tokens, suggested.output_tokens)]
    return suggested[keep].reset_index(drop=True)


def plan_batch(trials: Trials, fit: RoundFit, rule: StopRule, batch_s: float,
               can_measure: Callable[[DesignPoint], bool] = lambda point: True,
               rules: AdaptiveRules = RULES, overhead_s: float = 0.0, left_s: float = math.inf) -> list[Action]:
    """The next round's trials: where the 95% interval is widest per √second, up to ``batch_s`` seconds of trials.

    Measured points that converged or reached ``rule.max_trials`` get no more trials.
    A measured point gets enough trials to about halve its interval's width squared (its
    count again, at least one, within its cap); a new point gets ``rule.min_trials``
    (at least 2, so its noise is seen). ``can_measure`` says whether a new point can run
    (the model's context); ``overhead_s`` is what a trial costs beside its request
    (metering, storing it). The first action may run past ``batch_s`` (a round always
    makes progress), never past ``left_s``, the budget left; an action too long for what
    is left is cut to the trials that fit, or skipped for a shorter one. Empty when
    nothing is worth a trial, or nothing fits.
    """
    shortest_s = _median_request_s(trials) if fit.noise_dominates(rules) else 0.0  # when noise dominates: long only
    options: list[tuple[float, Action, float]] = []  # (priority, action, seconds)
    for point, point_trials in trials.items():
        assessment = assess_point(point_trials.runtimes_s, point_trials.energies_j, rule)
        if assessment.tight or point_trials.n >= rule.max_trials:
            continue
        if expected_trial_s(point, trials, fit) < shortest_s:
            continue
        width = assessment.worst_ci_rel
        if not math.isfinite(width):
            width = 1.0  # a single trial: as unsure as can be said
        more = max(1, min(point_trials.n, rule.max_trials - point_trials.n))
        seconds = expected_trial_s(point, trials, fit) + overhead_s
        options.append((width / math.sqrt(seconds), Action(point, more, False, width,
                                                           f"its mean is ±{width:.0%} after {point_trials.n} trials"),
                        more * seconds))
    first_trials = max(2, rule.min_trials)
    for row in candidate_points(fit, trials, rules).itertuples(index=False):
        point = DesignPoint(int(row.input_tokens), int(row.output_tokens))
        if expected_trial_s(point, trials, fit) < shortest_s:
            continue
        width = Z_95 * float(row.relative_standard_error)
        noise = _nearest_noise(point, trials)
        if noise is not None and width <= Z_95 * noise / math.sqrt(first_trials):
            continue  # its first trials would know it no better than the surface does
        if not can_measure(point):
            continue
        seconds = expected_trial_s(point, trials, fit) + overhead_s
        options.append((width / math.sqrt(seconds), Action(point, first_trials, True, width,
                                                           f"the surface is ±{width:.0%} there"),
                        first_trials * seconds))
    options.sort(key=lambda option: -option[0])
    batch, spent = [], 0.0
    for _, action, seconds in options:
        per_trial_s = seconds / action.trials
        room_s = (left_s if not batch else min(batch_s, left_s)) - spent
        fitting = action.trials if math.isinf(room_s) else min(action.trials, int(room_s // per_trial_s))
        if fitting < (2 if action.new else 1):
            continue  # too long for what is left; a shorter one may still fit
        batch.append(action if fitting == action.trials else replace(action, trials=fitting))
        spent += fitting * per_trial_s
        if spent >= batch_s:
            break
    return batch


def describe_batch(batch: Sequence[Action]) -> str:
    """``measure 4 trials at (8, 8) (its mean is ±31% after 4 trials); a new point (64, 16) ...``"""
    parts = []
    for action in batch:
        where = f"a new point ({action.point.input_tokens}, {action.point.output_tokens})" if action.new else \
            f"({action.point.input_tokens}, {action.point.output_tokens})"
        parts.append(f"{action.trials} trial{'' if action.trials == 1 else 's'} at {where}: {action.why}")
    return "measure " + "; ".join(parts)


def round_record(number: int, elapsed_s: float, trials: Mapping[DesignPoint, PointTrials], fit: RoundFit,
                 decision: str | None = None) -> RoundRecord:
    """The stored record of a round."""
    return RoundRecord(round=number, elapsed_s=float(elapsed_s), trials=sum(t.n for t in trials.values()),
                       points=sum(1 for t in trials.values() if t.n), energy_cv_mape=fit.energy_cv_mape,
                       runtime_cv_mape=fit.runtime_cv_mape, energy_noise_mape=fit.energy_noise_mape,
                       runtime_noise_mape=fit.runtime_noise_mape, decision=decision)
