"""Measurements in, checked trial sets out: what a fit of one (model, device) is made of.

Rules (each broken rule is one :class:`~engine.errors.Problem`, all reported at once):

- Batch sizes: a (model, device) measured at batch size 1 only is fitted per request, as
  ever (X has two columns, τin and τout). One measured at several batch sizes gets a
  batch axis: X gains a third column, B, and each trial's energy and runtime are those of
  its whole batch of B requests (:mod:`engine.fitting.forms`, "The batch axis"). One
  measured at a single batch size above 1 has no per-request surface and no axis either:
  it is refused with a problem that says to profile batch size 1 or several sizes.
- ``runtime_s`` must be finite and > 0 in every trial.
- Trials outside the physical bounds of a measurement (:mod:`engine.bounds`: a runtime,
  energy, power or token count no real request has, such as 1e200 J stored before the
  import checked it) are left out with a warning naming their ids, so one corrupt row
  neither stops every fit nor turns its error into infinity.
- ``energy_j`` NULL means "not measured": such trials count for runtime only. A stored
  NaN, infinity, 0 or a negative value is an error (0 J is never a measurement).
- Energy sources: one (model, device) whose energies mix ``measured`` and ``estimated``
  trials is refused unless a source filter picks one (``source_filter``). A missing
  ``energy_source`` beside an energy value means ``measured`` (the import's rule).
- ``energy_scope="dynamic"`` uses energy_j − idle_power_w·runtime_s, only on trials whose
  idle power is known; a trial where that is not > 0 is an error (the idle power is
  too high for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine import bounds
from engine.errors import InputError, Problem
from engine.store import Store

ENERGY_SCOPES = ("total", "dynamic")
SOURCE_FILTERS = ("measured", "estimated")
_SHOW_IDS = 5


@dataclass(frozen=True)
class TargetTrials:
    """The trials of one target: token counts X (n, 2), or (n, 3) with the batch size when the
    trials have a batch axis, values y (n,) (of the whole batch), measurement ids, and
    which trials belong to a profiled point that did not converge (None: none known)."""

    X: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    unconverged: np.ndarray | None = None


@dataclass
class TrialSet:
    """Everything one (model, device) contributes to a fit, checked."""

    model: str
    device: str
    energy_scope: str
    energy_source: str | None            # measured | estimated (of the energy trials)
    energy: TargetTrials | None
    runtime: TargetTrials
    sensor: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def measurement_groups(store: Store) -> pd.DataFrame:
    """One row per (model, device) with trials: counts, energy sources, idle power known.

    Columns: model, device, n_trials, n_points (distinct (τin, τout, B)), n_with_energy,
    n_measured, n_estimated, n_with_idle, n_batch_sizes (distinct batch sizes: 2 or more
    give the fits a batch axis). Lets a page or the CLI offer what can be fitted, and with
    which filter.
    """
    return store.query_df(
        """
        SELECT model, device, count(*) AS n_trials,
               count(DISTINCT (input_tokens, output_tokens, coalesce(batch_size, 1))) AS n_points,
               count(energy_j) AS n_with_energy,
               count(energy_j) FILTER (WHERE coalesce(energy_source, 'measured') = 'measured') AS n_measured,
               count(energy_j) FILTER (WHERE energy_source = 'estimated') AS n_estimated,
               count(idle_power_w) AS n_with_idle,
               count(DISTINCT coalesce(batch_size, 1)) AS n_batch_sizes
        FROM measurements
        GROUP BY model, device ORDER BY model, device
        """
    )


def read_measurements(store: Store, model: str | None = None, device: str | None = None, *,
                      include_executed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials (one row each) and, per (model, device), the distinct software/sensor notes.

    ``energy_missing`` tells a NULL energy (not measured) from a stored NaN (an error),
    which a DataFrame alone cannot. Queries measured while executing a plan (origin
    'executed') count only with ``include_executed``.
    """
    where, params = ([] if include_executed else ["origin <> 'executed'"]), []
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if device is not None:
        where.append("device = ?")
        params.append(device)
    clause = ("WHERE " + " AND ".join(where)) if where else ""
    trials = store.query_df(
        f"""
        SELECT id, job_id, model, device, input_tokens, output_tokens, batch_size, runtime_s, energy_j,
               energy_j IS NULL AS energy_missing, energy_source, idle_power_w,
               gpu_energy_j IS NOT NULL AS has_gpu, cpu_energy_j IS NOT NULL AS has_cpu,
               dram_energy_j IS NOT NULL AS has_dram
        FROM measurements {clause} ORDER BY model, device, id
        """,
        params,
    )
    notes = store.query_df(
        f"""
        SELECT model, device, energy_method, CAST(library_versions AS VARCHAR) AS library_versions, count(*) AS n
        FROM measurements {clause}
        GROUP BY ALL ORDER BY model, device, n DESC
        """,
        params,
    )
    return trials, notes


def _ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_SHOW_IDS])
    return shown + (f" and {len(ids) - _SHOW_IDS} more" if len(ids) > _SHOW_IDS else "")


def _trials_word(n: int) -> str:
    return f"{n} trial" + ("" if n == 1 else "s")


def check_arguments(energy_scope: str, source_filter: str | None) -> None:
    problems = []
    if energy_scope not in ENERGY_SCOPES:
        problems.append(Problem("energy scope", f"{energy_scope!r} is not an energy scope", None, "total or dynamic"))
    if source_filter is not None and source_filter not in SOURCE_FILTERS:
        problems.append(Problem("energy source", f"{source_filter!r} is not an energy source", None,
                                "measured, estimated, or none"))
    if problems:
        raise InputError(problems)


def build_trial_sets(trials: pd.DataFrame, energy_scope: str = "total", source_filter: str | None = None,
                     notes: pd.DataFrame | None = None, model: str | None = None,
                     device: str | None = None) -> list[TrialSet]:
    """Check measurements and split them per (model, device) and target.

    ``trials`` has the measurements columns (id, model, device, input_tokens,
    output_tokens, runtime_s, energy_j, energy_source, idle_power_w; optional
    batch_size, energy_missing, unconverged). Without ``energy_missing`` a NaN energy is
    read as not measured; ``unconverged`` (bool) marks trials of profiled points whose
    trials did not converge. Raises :class:`InputError` listing every problem.
    """
    check_arguments(energy_scope, source_filter)
    if trials.empty:
        asked = " for " + " on ".join(
            part for part in (f"model {model!r}" if model else "", f"device {device!r}" if device else "") if part
        ) if (model or device) else ""
        raise InputError(Problem("measurements", f"there are no measurements{asked}", None,
                                 "profile the model first (python -m engine profile) or import measurements"))
    problems: list[Problem] = []
    sets: list[TrialSet] = []
    for (model_name, device_name), group in trials.groupby(["model", "device"], sort=True):
        trial_set = _check_group(str(model_name), str(device_name), group, energy_scope, source_filter, problems)
        if trial_set is not None:
            if notes is not None and not notes.empty:
                mine = notes[(notes["model"] == model_name) & (notes["device"] == device_name)]
                trial_set.sensor["energy_methods"] = [m for m in mine["energy_method"].dropna().unique().tolist()]
                trial_set.sensor["measurement_software"] = [_maybe_json(v) for v in
                                                            mine["library_versions"].dropna().unique().tolist()[:5]]
            sets.append(trial_set)
    if problems:
        raise InputError(problems)
    return sets


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _check_group(model: str, device: str, group: pd.DataFrame, energy_scope: str, source_filter: str | None,
                 problems: list[Problem]) -> TrialSet | None:
    """The checked trials of one (model, device), or None with its problems added to ``problems``."""
    where = f"measurements of {model!r} on {device!r}"
    warnings: list[str] = []
    n_before = len(problems)
    group, batch_axis = _batch_sizes(group, where, problems)
    if group is None:
        return None
    group = _within_bounds(group, where, warnings, problems)
    if group is None:
        return None
    ids = group["id"].to_numpy() if "id" in group.columns else np.arange(1, len(group) + 1)
    X = group[["input_tokens", "output_tokens"] + (["batch_size"] if batch_axis else [])].to_numpy(dtype=float)
    runtime = group["runtime_s"].to_numpy(dtype=float)
    energy = group["energy_j"].to_numpy(dtype=float)
    missing = (group["energy_missing"].to_numpy(dtype=bool) if "energy_missing" in group.columns
               else np.isnan(energy))
    bad_energy = _check_values(where, ids, X, runtime, energy, missing, problems)
    energy_source, energy_rows = _energy_rows(where, group, ~missing & ~bad_energy, bad_energy.any(), source_filter,
                                              problems)
    sensor: dict = {"energy_scope": energy_scope, "energy_source": energy_source}
    y_energy = energy.copy()
    if energy_scope == "dynamic" and energy_rows.any():
        y_energy, energy_rows = _dynamic_energy(where, group, ids, energy, runtime, energy_rows, sensor, warnings,
                                                problems)
    if len(problems) > n_before:
        return None
    for column in ("has_gpu", "has_cpu", "has_dram"):
        if column in group.columns:
            sensor[column.removeprefix("has_") + "_energy"] = bool(group[column].to_numpy(dtype=bool)[energy_rows].any())
    unconverged = (group["unconverged"].fillna(False).to_numpy(dtype=bool) if "unconverged" in group.columns
                   else None)
    energy_trials = (TargetTrials(X=X[energy_rows], y=y_energy[energy_rows], ids=ids[energy_rows],
                                  unconverged=None if unconverged is None else unconverged[energy_rows])
                     if energy_rows.any() else None)
    return TrialSet(model=model, device=device, energy_scope=energy_scope, energy_source=energy_source,
                    energy=energy_trials, runtime=TargetTrials(X=X, y=runtime, ids=ids, unconverged=unconverged),
                    sensor=sensor, warnings=warnings)


def _batch_sizes(group: pd.DataFrame, where: str, problems: list[Problem]) -> tuple[pd.DataFrame | None, bool]:
    """The trials with their batch sizes made whole (missing means 1), and whether they give a batch axis.

    Several batch sizes: an axis. Batch size 1 alone: none (per request, as ever). A single
    size above 1: None, with a problem (a batch's cost cannot be split into requests
    without another size to compare with). A batch size that is not a whole number >= 1:
    None, with a problem.
    """
    if "batch_size" not in group.columns:
        return group, False
    sizes = pd.to_numeric(group["batch_size"], errors="coerce").fillna(1).to_numpy(dtype=float)
    bad = ~np.isfinite(sizes) | (sizes < 1) | (sizes != np.round(sizes))
    if bad.any():
        ids = group["id"].to_numpy() if "id" in group.columns else np.arange(1, len(group) + 1)
        problems.append(Problem(where, f"{_trials_word(int(bad.sum()))} (ids {_ids(ids[bad])}) have a batch size that "
                                "is not a whole number >= 1", "batch_size", "a whole number of requests >= 1"))
        return None, False
    group = group.assign(batch_size=sizes.astype(np.int64))
    distinct = np.unique(sizes)
    if len(distinct) == 1 and distinct[0] != 1:
        problems.append(Problem(where, f"has trials at batch size {int(distinct[0])} only: one batch size above 1 "
                                "tells neither what one request costs nor how the cost grows with the batch",
                                "batch_size", "profile batch size 1 as well, or several batch sizes (profile "
                                "--batch-sizes 1,4,16)"))
        return None, False
    return group, len(distinct) > 1


def _within_bounds(group: pd.DataFrame, where: str, warnings: list[str],
                   problems: list[Problem]) -> pd.DataFrame | None:
    """The trials whose values a real measurement can have (:mod:`engine.bounds`).

    The others are left out with a warning; None, with a problem, when no trial is left.
    Values that are missing, not finite or not > 0 are left to :func:`_check_values`.
    """
    ids = group["id"].to_numpy() if "id" in group.columns else np.arange(1, len(group) + 1)
    tokens = group[["input_tokens", "output_tokens"]].to_numpy(dtype=float)
    runtime = group["runtime_s"].to_numpy(dtype=float)
    energy = group["energy_j"].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        runtime_ok, energy_ok = np.isfinite(runtime) & (runtime > 0), np.isfinite(energy) & (energy > 0)
        outside = {
            f"token counts above {bounds.TOKENS.high:,.0f}": (np.isfinite(tokens) & bounds.TOKENS.above(tokens)).any(axis=1),
            f"runtime_s outside {bounds.RUNTIME_S.describe()}": runtime_ok & bounds.RUNTIME_S.outside(runtime),
            f"energy_j outside {bounds.ENERGY_J.describe()}": energy_ok & bounds.ENERGY_J.outside(energy),
        }
        power_known = runtime_ok & energy_ok & ~outside[f"runtime_s outside {bounds.RUNTIME_S.describe()}"] \
            & ~outside[f"energy_j outside {bounds.ENERGY_J.describe()}"]
        outside[f"energy_j / runtime_s outside {bounds.POWER_W.describe()}"] = (
            power_known & bounds.POWER_W.outside(bounds.power_w(energy, runtime)))
    left_out = np.logical_or.reduce(list(outside.values()))
    if not left_out.any():
        return group
    reasons = "; ".join(f"{what}: {_trials_word(int(mask.sum()))}" for what, mask in outside.items() if mask.any())
    if left_out.all():
        problems.append(Problem(where, f"has no trial within the physical bounds of a measurement (all "
                                f"{_trials_word(len(group))}, ids {_ids(ids)}: {reasons})", None,
                                "measurements within the bounds the README states (fix their units, or delete "
                                "them and import them again)"))
        return None
    warnings.append(f"{_trials_word(int(left_out.sum()))} (ids {_ids(ids[left_out])}) left out: outside the physical "
                    f"bounds of a measurement ({reasons}); fix their units or delete them")
    return group[~left_out]


def _check_values(where: str, ids: np.ndarray, X: np.ndarray, runtime: np.ndarray, energy: np.ndarray,
                  missing: np.ndarray, problems: list[Problem]) -> np.ndarray:
    """Problems for token counts, runtimes and energies no measurement can have; returns
    which trials have such an energy (NaN, infinite, 0 or negative, where one was stored)."""
    bad_tokens = ~np.isfinite(X).all(axis=1) | (X <= 0).any(axis=1)
    if bad_tokens.any():
        problems.append(Problem(where, f"{_trials_word(int(bad_tokens.sum()))} (ids {_ids(ids[bad_tokens])}) have token "
                                "counts that are not > 0", "input_tokens/output_tokens", "whole numbers > 0"))
    bad_runtime = ~np.isfinite(runtime) | (runtime <= 0)
    if bad_runtime.any():
        problems.append(Problem(where, f"{_trials_word(int(bad_runtime.sum()))} (ids {_ids(ids[bad_runtime])}) have a "
                                "runtime that is missing, not finite or not > 0", "runtime_s",
                                "a positive number of seconds"))
    bad_energy = ~missing & (~np.isfinite(energy) | (energy <= 0))
    if bad_energy.any():
        kinds = []
        if (~missing & np.isnan(energy)).any():
            kinds.append("NaN")
        if (~missing & np.isinf(energy)).any():
            kinds.append("infinite")
        if (~missing & np.isfinite(energy) & (energy <= 0)).any():
            kinds.append("zero or negative")
        problems.append(Problem(where, f"{_trials_word(int(bad_energy.sum()))} (ids {_ids(ids[bad_energy])}) have an "
                                f"energy that is {' or '.join(kinds)}", "energy_j",
                                "a positive number of joules, or empty (NULL) when it was not measured"))
    return bad_energy


def _energy_rows(where: str, group: pd.DataFrame, has_energy: np.ndarray, any_bad_energy: bool,
                 source_filter: str | None, problems: list[Problem]) -> tuple[str | None, np.ndarray]:
    """The energy source of the fit and which trials' energy it uses: one source only,
    the one ``source_filter`` asks for when the trials mix them."""
    sources = group["energy_source"].where(group["energy_source"].notna(), "measured").to_numpy(dtype=object) \
        if "energy_source" in group.columns else np.full(len(group), "measured", dtype=object)
    energy_rows = has_energy.copy()
    if not has_energy.any():
        if not any_bad_energy:
            problems.append(Problem(where, f"has no energy measurements (energy_j is empty in all "
                                    f"{_trials_word(len(group))}); runtime alone cannot be planned with", "energy_j",
                                    "trials with a measured or estimated energy"))
        return None, energy_rows
    present = sorted(set(sources[has_energy].tolist()))
    if source_filter is None and len(present) > 1:
        counts = ", ".join(f"{s} ({_trials_word(int((sources[has_energy] == s).sum()))})" for s in present)
        problems.append(Problem(where, f"mixes energy sources: {counts}; a surface fitted to both would "
                                "pass estimates off as measurements", "energy_source",
                                "one energy source: fit only the measured or only the estimated trials (the energy "
                                "source setting), or remove the other trials"))
        return None, energy_rows
    if source_filter is None:
        return present[0], energy_rows
    energy_rows &= sources == source_filter
    if not energy_rows.any():
        problems.append(Problem(where, f"has no {source_filter} energy (sources here: {', '.join(present)})",
                                "energy_source", f"trials with energy_source = {source_filter}, or another "
                                "energy source"))
    return source_filter, energy_rows


def _dynamic_energy(where: str, group: pd.DataFrame, ids: np.ndarray, energy: np.ndarray, runtime: np.ndarray,
                    energy_rows: np.ndarray, sensor: dict, warnings: list[str],
                    problems: list[Problem]) -> tuple[np.ndarray, np.ndarray]:
    """Total − idle power × runtime, on the trials whose idle power is known; returns the
    values and the trials they are fitted on (and notes the median idle power in ``sensor``)."""
    idle = group["idle_power_w"].to_numpy(dtype=float)
    known = np.isfinite(idle) & (idle >= 0)
    if not (energy_rows & known).any():
        problems.append(Problem(where, "has no idle power, so dynamic energy (total − idle power × runtime) "
                                "cannot be computed", "idle_power_w",
                                "measurements with idle_power_w, or the total energy scope"))
        return energy.copy(), energy_rows
    left_out = int((energy_rows & ~known).sum())
    if left_out:
        warnings.append(f"{_trials_word(left_out)} without idle power left out of the dynamic energy fit")
    energy_rows = energy_rows & known
    dynamic = energy - np.where(known, idle, 0.0) * runtime
    not_positive = energy_rows & ~(dynamic > 0)
    if not_positive.any():
        problems.append(Problem(where, f"{_trials_word(int(not_positive.sum()))} (ids "
                                f"{_ids(ids[not_positive])}) have idle power × runtime ≥ their total "
                                "energy, so no dynamic energy remains", "idle_power_w",
                                "an idle power below the power drawn while running, or the total energy scope"))
    sensor["idle_power_w"] = float(np.median(idle[energy_rows])) if energy_rows.any() else None
    return dynamic, energy_rows


def id_ranges(ids) -> list[list[int]]:
    """Sorted ids as inclusive ranges [[first, last], ...] (compact for consecutive ids)."""
    values = np.unique(np.asarray(ids, dtype=np.int64))
    if values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate([[values[0]], values[breaks + 1]])
    ends = np.concatenate([values[breaks], [values[-1]]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def expand_id_ranges(ranges) -> list[int]:
    """The ids of :func:`id_ranges` output, one by one."""
    return [i for first, last in ranges for i in range(int(first), int(last) + 1)]
