"""Fits in and out of the ``fits`` table, and measurements in for fitting."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.errors import InputError, Problem
from engine.fitting.data import build_trial_sets, check_arguments, read_measurements
from engine.fitting.forms import BATCH_FORMS, DEFAULT_FORMS, ModelForm
from engine.fitting.result import FitResult
from engine.fitting.selection import DEFAULT_N_BOOTSTRAP, DEFAULT_N_SPLITS, fit_trial_sets
from engine.store import Store, append_frame

FIT_SOURCES = ("measured", "published")


def fit_all(store: Store, model: str | None = None, device: str | None = None, energy_scope: str = "total",
            source_filter: str | None = None, random_state: int | None = 0, *,
            forms: Sequence[type[ModelForm] | ModelForm] = DEFAULT_FORMS, n_splits: int = DEFAULT_N_SPLITS,
            n_bootstrap: int = DEFAULT_N_BOOTSTRAP, include_executed: bool = False,
            batch_forms: Sequence[type[ModelForm] | ModelForm] = BATCH_FORMS) -> list[FitResult]:
    """Fit energy and runtime surfaces for every (model, device) with measurements.

    ``model``/``device`` narrow the set; ``energy_scope`` is 'total' or 'dynamic';
    ``source_filter`` ('measured'|'estimated') picks one energy source where a
    (model, device) has both. Returns the fits sorted by model, device, target (energy
    before runtime). ``include_executed`` adds the queries measured while executing plans.
    Nothing is stored (see :func:`save_fits`). Raises
    :class:`InputError` listing every problem of every (model, device) when any fit
    cannot be made. A (model, device) measured at several batch sizes gets fits with a batch
    axis (``batch_forms``, see :mod:`engine.fitting.forms`); one measured at batch size 1
    only, fits of one request as ever.
    """
    check_arguments(energy_scope, source_filter)
    trials, notes = read_measurements(store, model, device, include_executed=include_executed)
    trials["unconverged"] = unconverged_trials(store, trials)
    trial_sets = build_trial_sets(trials, energy_scope, source_filter, notes=notes, model=model, device=device)
    return fit_trial_sets(trial_sets, forms=forms, random_state=random_state, n_splits=n_splits,
                          n_bootstrap=n_bootstrap, batch_forms=batch_forms)


def unconverged_trials(store: Store, trials: pd.DataFrame) -> np.ndarray:
    """For each trial (columns job_id, input_tokens, output_tokens, optional batch_size), whether its
    profiled point's trials reached the cap without converging (see :func:`engine.profiling.jobs.point_outcomes`)."""
    from engine.profiling.jobs import point_outcomes  # profiling's record of its points; fitting needs only this

    job_ids = trials["job_id"].dropna().unique() if "job_id" in trials.columns else []
    if not len(job_ids):
        return np.zeros(len(trials), dtype=bool)
    outcomes = point_outcomes(store, [int(j) for j in job_ids])
    on = ["job_id", "input_tokens", "output_tokens", "batch_size"]
    loose = outcomes.loc[outcomes["unconverged"].astype(bool), on]
    if loose.empty:
        return np.zeros(len(trials), dtype=bool)
    keys = trials.assign(batch_size=trials["batch_size"].fillna(1) if "batch_size" in trials.columns else 1)[on]
    marked = keys.astype("float64").merge(loose.astype("float64").drop_duplicates().assign(unconverged=True),
                                          how="left", on=on)
    return marked["unconverged"].fillna(False).to_numpy(dtype=bool)


def fit_frame(trials: pd.DataFrame, energy_scope: str = "total", source_filter: str | None = None,
              random_state: int | None = 0, *, forms: Sequence[type[ModelForm] | ModelForm] = DEFAULT_FORMS,
              n_splits: int = DEFAULT_N_SPLITS, n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
              batch_forms: Sequence[type[ModelForm] | ModelForm] = BATCH_FORMS) -> list[FitResult]:
    """:func:`fit_all` on a DataFrame of measurements instead of the database.

    Columns: model, device, input_tokens, output_tokens, runtime_s, energy_j (NaN = not
    measured), optional id, energy_source, idle_power_w, batch_size, unconverged (bool:
    the trial's profiled point did not converge).
    """
    frame = trials.copy()
    missing = [c for c in ("model", "device", "input_tokens", "output_tokens", "runtime_s", "energy_j")
               if c not in frame.columns]
    if missing:
        raise InputError(Problem("measurements", f"lacks the columns {', '.join(missing)}", None,
                                 "model, device, input_tokens, output_tokens, runtime_s, energy_j"))
    if "id" not in frame.columns:
        frame["id"] = np.arange(1, len(frame) + 1)
    for column in ("energy_source", "idle_power_w"):
        if column not in frame.columns:
            frame[column] = None if column == "energy_source" else np.nan
    trial_sets = build_trial_sets(frame, energy_scope, source_filter)
    return fit_trial_sets(trial_sets, forms=forms, random_state=random_state, n_splits=n_splits,
                          n_bootstrap=n_bootstrap, batch_forms=batch_forms)


def save_fits(store: Store, results: Sequence[FitResult]) -> list[FitResult]:
    """Store fits in one transaction (all or none); returns them with their ids set."""
    results = list(results)
    if not results:
        return []
    frame = pd.DataFrame([r.to_row() for r in results], columns=list(FitResult.ROW_COLUMNS))
    with store.transaction() as con:
        ids = [row[0] for row in con.execute("SELECT nextval('fit_id_seq') FROM range(?)", [len(results)]).fetchall()]
        frame.insert(0, "id", np.asarray(ids, dtype=np.int64))
        append_frame(con, "fits", frame)
    return [r.with_id(i) for r, i in zip(results, ids)]


def load_latest_fits(store: Store, model: str | None = None, device: str | None = None,
                     energy_scope: str | None = None, source: str | None = None) -> list[FitResult]:
    """The newest stored fit of each (model, device, energy scope, target, source).

    Filters are optional. Sorted by model, device, energy scope, target, source.
    """
    where, params = [], []
    for column, value in (("model", model), ("device", device), ("energy_scope", energy_scope), ("source", source)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    frame = store.query_df(
        f"""
        SELECT id, model, device, energy_scope, target, form, CAST(coefficients AS VARCHAR) AS coefficients, r2,
               cv_mape, n_points, CAST(domain AS VARCHAR) AS domain, source, CAST(details AS VARCHAR) AS details,
               created_at
        FROM fits {clause}
        QUALIFY row_number() OVER (PARTITION BY model, device, energy_scope, target, source ORDER BY id DESC) = 1
        ORDER BY model, device, energy_scope, target, source
        """,
        params,
    )
    return [FitResult.from_row(row) for row in frame.to_dict("records")]


def load_fit(store: Store, fit_id: int) -> FitResult | None:
    """One stored fit by id, or None."""
    frame = store.query_df(
        """
        SELECT id, model, device, energy_scope, target, form, CAST(coefficients AS VARCHAR) AS coefficients, r2,
               cv_mape, n_points, CAST(domain AS VARCHAR) AS domain, source, CAST(details AS VARCHAR) AS details,
               created_at
        FROM fits WHERE id = ?
        """,
        [int(fit_id)],
    )
    return None if frame.empty else FitResult.from_row(frame.to_dict("records")[0])


def load_trials(store: Store, model: str, device: str, energy_scope: str = "total",
                source_filter: str | None = None) -> pd.DataFrame:
    """The checked trials one fit of (model, device) is made from, for plots.

    Columns: id, input_tokens, output_tokens, batch_size, runtime_s, energy_j (in the energy
    scope; NaN where not measured or not used; of the whole batch where batch_size > 1).
    Raises :class:`InputError` like :func:`fit_all`.
    """
    trials, _ = read_measurements(store, model, device)
    (trial_set,) = build_trial_sets(trials, energy_scope, source_filter, model=model, device=device)
    X = trial_set.runtime.X
    frame = pd.DataFrame({"id": trial_set.runtime.ids, "input_tokens": X[:, 0].astype(int),
                          "output_tokens": X[:, 1].astype(int),
                          "batch_size": X[:, 2].astype(int) if X.shape[1] > 2 else np.ones(len(X), dtype=int),
                          "runtime_s": trial_set.runtime.y})
    energy = pd.Series(np.nan, index=frame.index)
    if trial_set.energy is not None:
        position = pd.Series(np.arange(len(frame)), index=frame["id"].to_numpy())
        energy.iloc[position.loc[trial_set.energy.ids].to_numpy()] = trial_set.energy.y
    frame["energy_j"] = energy.to_numpy()
    return frame
