"""Choosing a form by cross-validated relative error on held-out design points.

The scheme, per (model, device, energy scope, target):

1. Every form whose terms the measured points can tell apart is *offered* (at least
   one more distinct point than coefficients, and a full-rank design); the others are
   listed with the reason.
2. Each offered form is scored by k-fold cross-validation with folds **grouped by
   design point**: all trials of a (τin, τout) point are held out together. Holding out
   single trials of a point whose other trials were fitted would leak: a form that
   memorised the point would look perfect. k = 5 (shuffled with ``random_state``);
   designs of at most 20 points use one fold per point (leave-one-point-out), because
   with so few points the score and the choice otherwise depend on which points happen
   to share a fold (on the 3x3 demo designs, 5-fold CV MAPE moved by up to 5 points
   between seeds; on a 12-point adaptive demo design the chosen form changed with the
   seed), and an adaptive design growing from 9 to 15 points keeps one scheme, so its
   rounds' errors compare like with like.
3. The score is the MAPE over every held-out trial (noise between trials kept, not
   averaged away); R² (in-sample, as the paper reports it) and the cross-validated R²
   are reported beside it. The lowest CV MAPE among the non-negative forms wins; on a
   tie the simpler form (fewer terms; forms are listed simplest first).
4. The chosen form is refitted on every trial, and a residual bootstrap over the
   design points gives the covariance of its coefficients (the uncertainty band).

**The batch axis.** Trials measured at several batch sizes are fitted with the batch
forms (:data:`~engine.fitting.forms.BATCH_FORMS`) on (τin, τout, B), by the same scheme:
a design point is then (τin, τout, B), so a fold holds out a shape at a batch size
together, and the held-out MAPE is also given per batch size
(``details["cv_mape_by_batch_size"]``). Trials at batch size 1 alone are fitted as
before, with the same forms and the same results.

**Points that did not converge.** A profiled point whose trials stopped without meeting
the job's confidence rule (:mod:`engine.profiling.stopping`; e.g. 25 trials spread by
±100% under load) is kept, flagged and weighed by what its mean is worth: each of its
trials gets the weight min(1, s²_ref / s²_p), where s²_p is the point's relative
variance between trials and s²_ref the median of the converged points' (of all points'
when none converged), so a point 4 times as noisy as usual counts as its mean's
information, not as its many trials. Without this, such a point (which ran to the trial
cap) weighs most in the fit, the wrong way round. The CV MAPE stays unweighted over
every held-out trial, and the noise behind the uncertainty band is pooled over every
trial, so both show their spread; ``details`` gives the flagged points, their share, and
the CV MAPE over the converged points' trials alone; a fit whose points mostly did not
converge carries a warning that says so.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import GroupKFold

from engine.errors import InputError, Problem
from engine.fitting.data import TargetTrials, TrialSet, id_ranges
from engine.fitting.forms import BATCH_FORMS, DEFAULT_FORMS, ModelForm, point_index
from engine.fitting.result import FitResult, FormCandidate

DEFAULT_N_SPLITS = 5
DEFAULT_N_BOOTSTRAP = 200


def mape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute percentage error, a fraction (0.05 = 5%)."""
    return float(np.mean(np.abs(y_pred - y_true) / y_true))


def r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The coefficient of determination (NaN when y is constant)."""
    total = float(np.sum((y_true - y_true.mean()) ** 2))
    if total == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y_true - y_pred) ** 2)) / total


def point_groups(X: np.ndarray) -> np.ndarray:
    """The design-point id of each trial (the CV groups)."""
    return point_index(np.asarray(X, dtype=float))[1]


def fold_count(n_groups: int, n_splits: int = DEFAULT_N_SPLITS) -> int:
    """Folds for ``n_groups`` design points: one per point up to 4·n_splits, else n_splits."""
    return n_groups if n_groups <= 4 * n_splits else n_splits


def cross_validated_predictions(form: ModelForm, X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                                n_splits: int = DEFAULT_N_SPLITS, random_state: int | None = 0,
                                sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold predictions: each trial predicted by a fit that never saw its group.

    ``groups`` are the design points (:func:`point_groups`) for honest scores; pass
    per-trial ids instead and the folds leak (what the tests show). ``sample_weight``
    (per trial) goes to each fold's fit.
    """
    splits = fold_count(len(np.unique(groups)), n_splits)
    if splits < 2:
        raise ValueError("cross-validation needs at least two groups")
    folds = GroupKFold(n_splits=splits, shuffle=True, random_state=random_state)
    predictions = np.empty_like(y, dtype=float)
    for train, test in folds.split(X, y, groups):
        weight = None if sample_weight is None else sample_weight[train]
        predictions[test] = clone(form).fit(X[train], y[train], sample_weight=weight).predict(X[test])
    return predictions


def score_form(form: ModelForm, X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int = DEFAULT_N_SPLITS,
               random_state: int | None = 0, sample_weight: np.ndarray | None = None
               ) -> tuple[FormCandidate, ModelForm]:
    """CV MAPE, CV R² and in-sample R² of one form, and the form fitted on all trials (weighted by ``sample_weight``)."""
    held_out = cross_validated_predictions(form, X, y, groups, n_splits, random_state, sample_weight)
    fitted = clone(form).fit(X, y, sample_weight=sample_weight)
    in_sample = fitted.predict(X)
    candidate = FormCandidate(form=form.name, n_terms=len(form.terms), selectable=bool(form.selectable), offered=True,
                              cv_mape=mape(y, held_out), cv_r2=r2(y, held_out),
                              cv_total_ratio=float(np.sum(held_out) / np.sum(y)), r2=r2(y, in_sample),
                              coefficients=dict(fitted.coefficients_), min_prediction=float(in_sample.min()))
    return candidate, fitted


def relative_noise(y: np.ndarray, inverse: np.ndarray, n_points: int) -> tuple[float | None, float | None]:
    """Pooled relative SD of trials around their point mean, and the noise-floor MAPE.

    The noise-floor MAPE is the MAPE of predicting every trial by the best single value
    for its own point (the 1/y-weighted median of its trials, which minimises the
    point's MAPE): no surface that gives one value per point can do better, whatever
    the spread. (The point's mean is not that value when trials have a long tail: under
    load a few slow trials pull it up, and its MAPE then exceeds a fitted surface's.)
    None when no point was repeated.
    """
    counts = np.bincount(inverse, minlength=n_points)
    means = np.bincount(inverse, weights=y, minlength=n_points) / counts
    relative = y / means[inverse] - 1.0
    dof = int(np.sum(counts - 1))
    if dof <= 0:
        return None, None
    best = _mape_optimal_values(y, inverse, n_points)
    return float(np.sqrt(np.sum(relative ** 2) / dof)), float(np.mean(np.abs(y - best[inverse]) / y))


def _mape_optimal_values(y: np.ndarray, inverse: np.ndarray, n_points: int) -> np.ndarray:
    """Per point, the value c minimising Σ|y − c|/y over its trials: the median of y weighted by 1/y."""
    order = np.lexsort((y, inverse))
    sorted_y, sorted_point = y[order], inverse[order]
    weight = 1.0 / sorted_y
    cumulative = np.cumsum(weight)
    totals = np.bincount(sorted_point, weights=weight, minlength=n_points)
    before = cumulative - weight
    start = np.concatenate(([0.0], np.cumsum(totals)[:-1]))  # the cumulative weight before each point's trials
    reached = (cumulative - start[sorted_point]) >= totals[sorted_point] / 2 - 1e-15 * totals[sorted_point]
    reached &= (before - start[sorted_point]) < totals[sorted_point] / 2
    values = np.zeros(n_points)
    values[sorted_point[reached]] = sorted_y[reached]
    return values


def unconverged_weights(y: np.ndarray, inverse: np.ndarray, loose: np.ndarray) -> np.ndarray:
    """Per-trial weights that count each unconverged point (``loose``, per point) by its mean's information.

    min(1, s²_ref / s²_p), but at least 1/n_p, for the trials of a loose point p with n_p ≥ 2 trials
    (s²: relative variance between a point's trials; s²_ref: the median over converged
    points with 2 trials or more, else over all such points); 1 for every other trial.
    """
    n_points = len(loose)
    counts = np.bincount(inverse, minlength=n_points)
    means = np.bincount(inverse, weights=y, minlength=n_points) / counts
    squares = np.bincount(inverse, weights=(y / means[inverse] - 1.0) ** 2, minlength=n_points)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(counts > 1, squares / np.maximum(counts - 1, 1), np.nan)
    repeated = counts > 1
    reference_pool = variance[repeated & ~loose] if (repeated & ~loose).any() else variance[repeated]
    point_weight = np.ones(n_points)
    if len(reference_pool):
        reference = float(np.median(reference_pool))
        noisy = loose & repeated & (variance > 0)
        # At least one trial's worth: a point never drops out of the fit (steady converged
        # points, s²_ref = 0, would otherwise weigh it 0 and leave its fold nothing to fit).
        point_weight[noisy] = np.clip(reference / variance[noisy], 1.0 / counts[noisy], 1.0)
    return point_weight[inverse]


def bootstrap_covariance(fitted: ModelForm, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Covariance of the coefficients under a residual bootstrap over design points.

    Point residuals are standardised by the fit's weights (relative residuals for the
    relative weighting), inflated for the coefficients fitted (sqrt(P/(P−k))), resampled
    with replacement onto the fitted means and refitted with the same solver.
    """
    stats = fitted.stats_
    features = fitted.features(stats.points)
    fitted_mean = features @ fitted.coef_
    counts = np.bincount(stats.inverse, minlength=len(stats.points))
    trial_weight = stats.weight / counts
    scale = np.sqrt(trial_weight)
    n_points, n_terms = features.shape
    inflation = np.sqrt(n_points / max(n_points - n_terms, 1))
    residuals = (stats.mean - fitted_mean) * scale * inflation
    residuals = residuals - residuals.mean()
    chunk = max(1, 2_000_000 // n_points)  # bounded memory for many distinct points
    betas = []
    for start in range(0, n_bootstrap, chunk):
        draws = rng.integers(0, n_points, size=(min(chunk, n_bootstrap - start), n_points))
        betas.append(fitted.solver_.solve_many(fitted_mean[None, :] + residuals[draws] / scale[None, :]))
    return np.atleast_2d(np.cov(np.vstack(betas), rowvar=False))


def software_versions() -> dict[str, str]:
    """Versions of what fitted the surface (for the model card)."""
    import duckdb
    import pandas
    import scipy
    import sklearn

    import engine

    return {"joule_planner_engine": engine.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "scikit_learn": sklearn.__version__,
            "pandas": pandas.__version__, "duckdb": duckdb.__version__}


def fit_target(trials: TargetTrials, *, model: str, device: str, energy_scope: str, target: str,
               forms: Sequence[type[ModelForm] | ModelForm] = DEFAULT_FORMS, random_state: int | None = 0,
               n_splits: int = DEFAULT_N_SPLITS, n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
               energy_source: str | None = None, sensor: dict | None = None, warnings: list[str] | None = None,
               versions: dict | None = None, target_label: str | None = None) -> FitResult:
    """Score every offered form, choose one, refit it on all trials, bootstrap its band.

    Raises :class:`InputError` when no non-negative form can be fitted to these points.
    """
    X, y = trials.X, trials.y
    points, inverse = point_index(X)
    loose = _loose_points(trials.unconverged, inverse, len(points))
    weight = unconverged_weights(y, inverse, loose) if loose.any() else None
    estimators = [f if isinstance(f, ModelForm) else f() for f in forms]
    candidates, fitted = _score_forms(estimators, X, y, inverse, n_splits, random_state, weight)
    selectable = [i for i, c in enumerate(candidates) if c.offered and c.selectable]
    if not selectable:
        raise _no_form_problem(estimators, points, f"measurements of {model!r} on {device!r}", target_label or target)
    best = min(selectable, key=lambda i: (round(candidates[i].cv_mape, 12), candidates[i].n_terms))
    candidates[best] = replace(candidates[best], chosen=True)
    chosen: ModelForm = fitted[best]

    can_bootstrap = n_bootstrap > 0 and hasattr(chosen, "solver_")  # custom forms may lack the linear solver
    coef_cov = bootstrap_covariance(chosen, n_bootstrap, np.random.default_rng(random_state)) if can_bootstrap else None
    noise = _noise(chosen, y, inverse, points)
    details = {
        "description": chosen.description,
        "weighting": chosen.weighting,
        "cv": _cv_scheme(len(points), n_splits, random_state, batch_axis=X.shape[1] > 2),
        "cv_r2": candidates[best].cv_r2,
        "noise_mape": noise.mape,
        "noise_basis": noise.basis,
        "n_bootstrap": int(n_bootstrap),
        "points": points.astype(int).tolist(),
        "measurement_id_ranges": id_ranges(trials.ids),
        "sensor": dict(sensor or {}),
        "software": versions or software_versions(),
        "warnings": list(warnings or []),
        "fitted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    if loose.any():
        details.update(_unconverged_details(estimators[best], X, y, inverse, points, loose, weight, n_splits,
                                            random_state))
        if loose.mean() >= 0.5:
            details["warnings"].append(
                f"{int(loose.sum())} of {len(points)} points did not converge when profiled (their trials spread more "
                "than the job's confidence rule allows): this fit's error and band include that spread; profile "
                "again when the machine is quieter, or with more trials")
    if X.shape[1] > 2:
        details["cv_mape_by_batch_size"] = _cv_mape_by_batch_size(estimators[best], X, y, inverse, n_splits,
                                                                  random_state, weight)
    if candidates[best].min_prediction < 0:  # impossible for NNLS on non-negative terms; a guard for custom forms
        details["warnings"].append("the chosen form predicts negative values at measured points")
    return FitResult(
        model=model, device=device, energy_scope=energy_scope, target=target, form=chosen.name,
        terms=tuple(chosen.terms), coefficients=dict(chosen.coefficients_), r2=candidates[best].r2,
        cv_mape=candidates[best].cv_mape, n_points=int(chosen.n_points_), n_trials=int(chosen.n_trials_),
        domain=chosen.domain_, source="measured", energy_source=energy_source if target == "energy" else None,
        candidates=candidates, coef_cov=coef_cov.tolist() if coef_cov is not None else None,
        noise_rel_sd=noise.rel_sd, details=details,
    )


def _cv_mape_by_batch_size(form: ModelForm, X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int,
                           random_state: int | None, weight: np.ndarray | None) -> dict[str, float]:
    """The chosen form's held-out MAPE over the trials of each batch size (keys are the sizes, as text for JSON)."""
    held_out = cross_validated_predictions(form, X, y, groups, n_splits, random_state, weight)
    sizes = X[:, 2]
    return {str(int(size)): mape(y[sizes == size], held_out[sizes == size]) for size in np.unique(sizes)}


def _loose_points(unconverged: np.ndarray | None, inverse: np.ndarray, n_points: int) -> np.ndarray:
    """Per point: most of its trials belong to a profiled point that did not converge."""
    if unconverged is None or not np.any(unconverged):
        return np.zeros(n_points, dtype=bool)
    counts = np.bincount(inverse, minlength=n_points)
    return np.bincount(inverse, weights=np.asarray(unconverged, dtype=float), minlength=n_points) > counts / 2


def _unconverged_details(form: ModelForm, X: np.ndarray, y: np.ndarray, inverse: np.ndarray, points: np.ndarray,
                         loose: np.ndarray, weight: np.ndarray, n_splits: int, random_state: int | None) -> dict:
    """What a fit records about its unconverged points: which, their share, their weights, the CV MAPE without them."""
    held_out = cross_validated_predictions(form, X, y, inverse, n_splits, random_state, weight)
    converged_trials = ~loose[inverse]
    return {
        "unconverged_points": points[loose].astype(int).tolist(),
        "unconverged_share": float(loose.mean()),
        "unconverged_weights": [round(float(weight[inverse == p][0]), 4) for p in np.flatnonzero(loose)],
        "cv_mape_converged": mape(y[converged_trials], held_out[converged_trials]) if converged_trials.any() else None,
        "unconverged_weighting": "trials of an unconverged point weigh min(1, s²_ref/s²_p): their mean's information",
    }


def _score_forms(estimators: list[ModelForm], X: np.ndarray, y: np.ndarray, groups: np.ndarray, n_splits: int,
                 random_state: int | None, sample_weight: np.ndarray | None = None
                 ) -> tuple[list[FormCandidate], list[ModelForm | None]]:
    """Every form as a candidate (scored when the points can tell its terms apart), and
    each offered form fitted on all trials (None for the others), in the forms' order."""
    candidates, fitted = [], []
    for form in estimators:
        reason = form.unsupported_reason(X)
        if reason is not None:
            candidates.append(FormCandidate(form=form.name, n_terms=len(form.terms), selectable=bool(form.selectable),
                                            offered=False, reason=reason))
            fitted.append(None)
            continue
        candidate, estimator = score_form(form, X, y, groups, n_splits, random_state, sample_weight)
        candidates.append(candidate)
        fitted.append(estimator)
    return candidates, fitted


def _no_form_problem(estimators: list[ModelForm], points: np.ndarray, where: str, what: str) -> InputError:
    """The error for points no selectable form can be fitted to: how many there are, and how many it would take."""
    simplest = min((f for f in estimators if f.selectable), key=lambda f: f.min_points, default=None)
    need = f"at least {simplest.min_points} distinct points" if simplest else "more distinct points"
    distinct_in, distinct_out = len(np.unique(points[:, 0])), len(np.unique(points[:, 1]))
    batched = points.shape[1] > 2
    axes = "(input_tokens, output_tokens, batch_size)" if batched else "(input_tokens, output_tokens)"
    sizes = f", batch sizes: {len(np.unique(points[:, 2]))}" if batched else ""
    return InputError(Problem(
        where, f"has {len(points)} distinct {axes} point"
        f"{'' if len(points) == 1 else 's'} with {what} (distinct input counts: {distinct_in}, "
        f"output counts: {distinct_out}{sizes}); no form can be fitted to that", "input_tokens/output_tokens",
        f"{need} with at least 2 different input and 2 different output counts (e.g. profile the quick design)"))


def _cv_scheme(n_points: int, n_splits: int, random_state: int | None, batch_axis: bool = False) -> dict:
    """How the forms were cross-validated, for the fit's details and its model card."""
    folds = fold_count(n_points, n_splits)
    point = "(input_tokens, output_tokens, batch_size)" if batch_axis else "(input_tokens, output_tokens)"
    return {"scheme": ("leave-one-point-out" if folds == n_points
                       else f"GroupKFold by {point} point, shuffled"),
            "n_splits": folds, "random_state": random_state, "metric": "MAPE over held-out trials"}


@dataclass(frozen=True)
class _Noise:
    """Trial-to-trial noise of a surface: relative SD, the noise-floor MAPE (None without
    repeated trials) and what the SD was estimated from."""

    rel_sd: float
    mape: float | None
    basis: str


def _noise(chosen: ModelForm, y: np.ndarray, inverse: np.ndarray, points: np.ndarray) -> _Noise:
    rel_sd, noise_mape = relative_noise(y, inverse, len(points))
    if rel_sd is not None:
        return _Noise(rel_sd=rel_sd, mape=noise_mape, basis="replicate trials")
    # One trial per point: the fit's relative residuals stand in for the noise.
    fitted_mean = chosen.predict(points)
    k = len(chosen.terms)
    rel_sd = float(np.sqrt(np.sum((chosen.stats_.mean / fitted_mean - 1) ** 2) / max(len(points) - k, 1)))
    return _Noise(rel_sd=rel_sd, mape=noise_mape, basis="fit residuals (no repeated trials)")


def fit_trial_sets(trial_sets: Sequence[TrialSet], *, forms: Sequence[type[ModelForm] | ModelForm] = DEFAULT_FORMS,
                   random_state: int | None = 0, n_splits: int = DEFAULT_N_SPLITS,
                   n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
                   batch_forms: Sequence[type[ModelForm] | ModelForm] = BATCH_FORMS) -> list[FitResult]:
    """Energy and runtime fits of each checked trial set; every problem raised at once.

    A set measured at several batch sizes (its X has a batch-size column) is fitted with
    ``batch_forms``, any other with ``forms``.
    """
    versions = software_versions()
    results, problems = [], []
    for trial_set in trial_sets:
        same_points = trial_set.energy is not None and np.array_equal(
            np.unique(trial_set.energy.X, axis=0), np.unique(trial_set.runtime.X, axis=0))
        for target, trials in (("energy", trial_set.energy), ("runtime", trial_set.runtime)):
            if trials is None:
                continue
            try:
                results.append(fit_target(
                    trials, model=trial_set.model, device=trial_set.device, energy_scope=trial_set.energy_scope,
                    target=target, forms=batch_forms if trials.X.shape[1] > 2 else forms,
                    random_state=random_state, n_splits=n_splits,
                    n_bootstrap=n_bootstrap, energy_source=trial_set.energy_source, sensor=trial_set.sensor,
                    warnings=trial_set.warnings, versions=versions,
                    target_label="energy and runtime" if same_points else f"{target} measured"))
            except InputError as exc:
                problems.extend(p for p in exc.problems if p not in problems)
                if same_points:  # the runtime fit would fail on the same points: say it once
                    break
    if problems:
        raise InputError(problems)
    return results
