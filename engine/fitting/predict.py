"""Using fits: predictions with uncertainty and guardrails, plot grids, what to measure next."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from engine.errors import InputError, Problem
from engine.fitting.result import FitResult

PREDICTION_COLUMNS = ("model", "device", "input_tokens", "output_tokens", "energy_j", "runtime_s",
                      "energy_j_uncertainty", "runtime_s_uncertainty", "in_domain", "energy_estimated",
                      "energy_scope", "source", "energy_j_raw", "runtime_s_raw", "clamped", "warning")


_WARNINGS = ("the form predicts a negative value here (the paper's form); clamped to 0",
             "outside the measured token range", "energy is estimated, not measured",
             "published coefficients, no measurements")


def _index_fits(fits: Iterable[FitResult], energy_scope: str | None) -> dict[tuple[str, str], dict[str, FitResult]]:
    """(model, device) -> {target: fit}. Later fits win; measured beats published; with no
    scope asked, 'total' beats 'dynamic' (the runtime fit goes with the chosen scope)."""
    def rank(fit: FitResult) -> tuple:
        return (fit.energy_scope == "total", fit.source == "measured", fit.fit_id or 0)

    chosen: dict[tuple[str, str], dict[str, FitResult]] = {}
    for fit in fits:
        if energy_scope is not None and fit.energy_scope != energy_scope:
            continue
        slot = chosen.setdefault((fit.model, fit.device), {})
        current = slot.get(fit.target)
        if current is None or rank(fit) >= rank(current):
            slot[fit.target] = fit
    return chosen


def predict(fits: Iterable[FitResult], points: pd.DataFrame, energy_scope: str | None = None, *,
            where: str = "points", first_line: int = 2) -> pd.DataFrame:
    """Energy and runtime for each row of ``points`` (model, device, input_tokens, output_tokens).

    Returns the input's columns followed by: energy_j, runtime_s (never negative: a
    negative raw value of the paper's form is clamped to 0 and flagged), their
    uncertainties (half-width of a 90% prediction interval; NaN for published
    coefficients), in_domain (False outside the measured range of either fit),
    energy_estimated, energy_scope, source ('measured'|'published'), energy_j_raw,
    runtime_s_raw (the form's own value), clamped, and warning (a sentence or "").

    Raises :class:`InputError` with one Problem per bad row (``where:line``; line
    numbers count the CSV header as line ``first_line - 1``): a missing or non-whole
    token count, or a (model, device) with no energy or runtime fit.
    """
    index = _index_fits(fits, energy_scope)
    required = ("model", "device", "input_tokens", "output_tokens")
    absent = [c for c in required if c not in points.columns]
    if absent:
        raise InputError(Problem(where, f"lacks the column{'s' if len(absent) > 1 else ''} {', '.join(absent)}",
                                 None, "columns " + ", ".join(required)))
    frame = points.reset_index(drop=True).copy()
    problems: list[Problem] = []
    tokens = {column: _token_counts(frame, column, where, first_line, problems)
              for column in ("input_tokens", "output_tokens")}
    keys = pd.DataFrame({"model": frame["model"].astype(str), "device": frame["device"].astype(str)})
    groups = {key: np.asarray(rows) for key, rows in keys.groupby(["model", "device"], sort=False).indices.items()}
    problems += _missing_fits(index, groups, energy_scope, where, first_line)
    if problems:
        raise InputError(sorted(problems, key=lambda p: int(p.where.rsplit(":", 1)[1])))

    values = _predict_groups(index, groups, tokens["input_tokens"], tokens["output_tokens"], len(frame))
    result = frame
    result["input_tokens"] = tokens["input_tokens"].astype(np.int64)
    result["output_tokens"] = tokens["output_tokens"].astype(np.int64)
    result["energy_j"] = np.maximum(values["energy_j_raw"], 0.0)
    result["runtime_s"] = np.maximum(values["runtime_s_raw"], 0.0)
    for column in ("energy_j_uncertainty", "runtime_s_uncertainty", "in_domain", "energy_estimated", "energy_scope",
                   "source", "energy_j_raw", "runtime_s_raw"):
        result[column] = values[column]
    result["clamped"] = (values["energy_j_raw"] < 0) | (values["runtime_s_raw"] < 0)
    result["warning"] = _warnings(result["clamped"].to_numpy(), values["in_domain"], values["energy_estimated"],
                                  values["source"] == "published")
    extra = [c for c in result.columns if c not in PREDICTION_COLUMNS]
    return result[extra + list(PREDICTION_COLUMNS)]


def _token_counts(frame: pd.DataFrame, column: str, where: str, first_line: int,
                  problems: list[Problem]) -> np.ndarray:
    """The column as floats, with a problem for every row that is not a whole number > 0."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values <= 0) | (np.round(values) != values)
    for row in np.flatnonzero(bad):
        problems.append(Problem(f"{where}:{first_line + row}", f"{frame[column].iloc[row]!r} is not a token count",
                                column, "a whole number > 0"))
    return values


def _missing_fits(index: dict[tuple[str, str], dict[str, FitResult]], groups: dict[tuple[str, str], np.ndarray],
                  energy_scope: str | None, where: str, first_line: int) -> list[Problem]:
    """One problem per row whose (model, device) lacks an energy or a runtime fit."""
    scope_note = f" in the {energy_scope} energy scope" if energy_scope else ""
    problems = []
    for (model, device), rows in groups.items():
        slot = index.get((model, device), {})
        lacking = [t for t in ("energy", "runtime") if t not in slot]
        for row in rows if lacking else ():
            problems.append(Problem(f"{where}:{first_line + row}",
                                    f"no {' or '.join(lacking)} fit for model {model!r} on device {device!r}{scope_note}",
                                    "model", "a (model, device) that has been fitted (python -m engine fit)"))
    return problems


def _predict_groups(index: dict[tuple[str, str], dict[str, FitResult]], groups: dict[tuple[str, str], np.ndarray],
                    input_tokens: np.ndarray, output_tokens: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per row: raw values, uncertainties, in_domain, energy_estimated, energy_scope and
    source, each (model, device) predicted by its fits in one go."""
    out = {c: np.full(n, np.nan) for c in ("energy_j_raw", "runtime_s_raw", "energy_j_uncertainty",
                                            "runtime_s_uncertainty")}
    out["in_domain"] = np.zeros(n, dtype=bool)
    out["energy_estimated"] = np.zeros(n, dtype=bool)
    out["energy_scope"] = np.empty(n, dtype=object)
    out["source"] = np.empty(n, dtype=object)
    for key, rows in groups.items():
        energy_fit, runtime_fit = index[key]["energy"], index[key]["runtime"]
        tin, tout = input_tokens[rows], output_tokens[rows]
        out["energy_j_raw"][rows] = energy_fit.predict_raw(tin, tout)
        out["runtime_s_raw"][rows] = runtime_fit.predict_raw(tin, tout)
        out["energy_j_uncertainty"][rows] = energy_fit.uncertainty(tin, tout)
        out["runtime_s_uncertainty"][rows] = runtime_fit.uncertainty(tin, tout)
        out["in_domain"][rows] = energy_fit.in_domain(tin, tout) & runtime_fit.in_domain(tin, tout)
        out["energy_estimated"][rows] = energy_fit.energy_estimated
        out["energy_scope"][rows] = energy_fit.energy_scope
        out["source"][rows] = "published" if "published" in (energy_fit.source, runtime_fit.source) else "measured"
    return out


def _warnings(clamped: np.ndarray, in_domain: np.ndarray, estimated: np.ndarray, published: np.ndarray) -> np.ndarray:
    """Per row, the sentence of its flags ("" when none): one sentence per combination of
    flags (16 at most), looked up per row."""
    flags = clamped * 1 + (~in_domain) * 2 + estimated * 4 + published * 8
    sentences = np.array(["; ".join(text for bit, text in enumerate(_WARNINGS) if code >> bit & 1)
                          for code in range(16)], dtype=object)
    return sentences[flags.astype(int)]


def surface_grid(fit: FitResult, n: int = 30, log: bool = True, extend: float = 1.0) -> pd.DataFrame:
    """An n x n grid over the fit's domain for a surface plot (long format, one row per cell).

    ``log`` spaces the grid geometrically (for log axes); ``extend`` > 1 widens the
    domain by that factor on both sides to show extrapolation (flagged in_domain=False).
    Columns: input_tokens, output_tokens (floats), <value> (clamped at 0), <value>_raw,
    <value>_uncertainty, <value>_per_token (value / (input + output tokens)), in_domain,
    where <value> is ``fit.value_column`` (energy_j or runtime_s).
    """
    if n < 2:
        raise InputError(Problem("n", f"{n} is too few grid steps", None, "2 or more"))
    (in_lo, in_hi), (out_lo, out_hi) = fit.domain["input_tokens"], fit.domain["output_tokens"]
    spacing = np.geomspace if log else np.linspace
    axis_in = spacing(max(in_lo / extend, 1.0), in_hi * extend, n)
    axis_out = spacing(max(out_lo / extend, 1.0), out_hi * extend, n)
    grid_in, grid_out = np.meshgrid(axis_in, axis_out)
    tin, tout = grid_in.ravel(), grid_out.ravel()
    raw = fit.predict_raw(tin, tout)
    column = fit.value_column
    return pd.DataFrame({
        "input_tokens": tin, "output_tokens": tout, column: np.maximum(raw, 0.0), f"{column}_raw": raw,
        f"{column}_uncertainty": fit.uncertainty(tin, tout), f"{column}_per_token": np.maximum(raw, 0.0) / (tin + tout),
        "in_domain": fit.in_domain(tin, tout),
    })


def residuals(fit: FitResult, trials: pd.DataFrame) -> pd.DataFrame:
    """Measured against predicted for each trial (from :func:`load_trials`), for a residual plot.

    Columns: id, input_tokens, output_tokens, measured, predicted, residual
    (measured − predicted, in the fit's unit), relative_residual (residual / measured).
    Trials without a value for the fit's target are left out. A fit with a batch axis
    predicts each trial's whole batch; a fit without one, only its trials at batch size 1.
    """
    frame = trials[trials[fit.value_column].notna()]
    if fit.has_batch_axis and "batch_size" in frame.columns:  # each trial is one batch: predict that batch
        sizes = frame["batch_size"].fillna(1).to_numpy(dtype=float)
    else:
        sizes = None
        if "batch_size" in frame.columns:  # a fit of one request says nothing about batch trials
            frame = frame[frame["batch_size"].fillna(1) == 1]
    measured = frame[fit.value_column].to_numpy(dtype=float)
    predicted = fit.predict_raw(frame["input_tokens"], frame["output_tokens"], sizes)
    return pd.DataFrame({"id": frame["id"].to_numpy() if "id" in frame.columns else np.arange(len(frame)),
                         "input_tokens": frame["input_tokens"].to_numpy(), "output_tokens": frame["output_tokens"].to_numpy(),
                         "measured": measured, "predicted": predicted, "residual": measured - predicted,
                         "relative_residual": (measured - predicted) / measured})


def _powers_of_two_between(lo: float, hi: float) -> list[int]:
    return [2 ** k for k in range(0, 31) if lo <= 2 ** k <= hi]


def _candidate_levels(lo: int, hi: int, measured: Sequence[int], midpoints: bool) -> list[int]:
    """Measured levels and powers of two within [lo, hi]; with ``midpoints``, also the
    geometric midpoints between neighbours (for a grid already measured in full)."""
    levels = sorted(set(int(v) for v in measured if lo <= v <= hi) | set(_powers_of_two_between(lo, hi))
                    | {int(lo), int(hi)})
    if midpoints:
        levels = sorted(set(levels) | {int(round(np.sqrt(a * b))) for a, b in zip(levels, levels[1:]) if b > a + 1})
    return levels


def with_batch_size(point: Sequence) -> tuple[int, int, int]:
    """A point as (τin, τout, B): given as a pair (stored by a fit without a batch axis) it is at batch size 1."""
    return int(point[0]), int(point[1]), int(point[2]) if len(point) > 2 else 1


def suggest_points(fits: FitResult | Sequence[FitResult], n: int = 3,
                   candidates: Sequence[tuple[int, ...]] | None = None, beyond_domain: bool = False) -> pd.DataFrame:
    """The next points to measure: where the surface is least sure.

    ``fits`` are the energy and/or runtime fits of one (model, device). Each candidate
    is scored by the largest relative standard error of the mean surface among the
    fits (bootstrap SE / prediction); the top ``n`` are taken greedily, skipping
    candidates next to one already taken (within a factor of 2 on every axis), so the
    suggestions spread out. Default candidates: the grid of measured levels and powers
    of two within the domain, minus measured points (geometric midpoints too when that
    grid is measured in full); ``beyond_domain`` adds one doubling (and halving) past
    each token edge. For fits with a batch axis a candidate is a (τin, τout, B) point, B
    from the measured batch sizes and the powers of two between them, and the score is
    that of the whole batch's prediction; without one, B is 1. Candidates given as
    (τin, τout) pairs are at batch size 1. Returns columns input_tokens, output_tokens,
    batch_size, relative_standard_error, in_domain.
    """
    fits = [fits] if isinstance(fits, FitResult) else list(fits)
    if not fits:
        raise InputError(Problem("fits", "none given", None, "the fits of one (model, device)"))
    if any(f.coef_cov is None for f in fits):
        raise InputError(Problem("fits", "published coefficients carry no uncertainty to guide measurements",
                                 None, "fits made from measurements"))
    if len({(f.model, f.device) for f in fits}) > 1:
        raise InputError(Problem("fits", "belong to more than one (model, device)", None, "the fits of one pair"))
    batch_axis = all(f.has_batch_axis for f in fits)
    measured = {with_batch_size(p) for f in fits for p in f.details.get("points", [])}
    if candidates is None:
        candidates = _default_candidates(fits[0], measured, beyond_domain, batch_axis)
    candidates = [with_batch_size(c) for c in candidates]
    columns = ["input_tokens", "output_tokens", "batch_size", "relative_standard_error", "in_domain"]
    if not candidates:
        return pd.DataFrame(columns=columns)
    tin, tout, size = (np.array([c[k] for c in candidates], dtype=float) for k in range(3))
    sizes = size if batch_axis else None
    score = np.zeros(len(candidates))
    for fit in fits:
        value = np.maximum(fit.predict_raw(tin, tout, sizes), 1e-300)
        score = np.maximum(score, fit.standard_error(tin, tout, sizes) / value)
    order = np.argsort(-score, kind="stable")
    taken: list[int] = []
    for i in order:
        if len(taken) == n:
            break
        near = any(abs(np.log2(tin[i] / tin[j])) <= 1 and abs(np.log2(tout[i] / tout[j])) <= 1
                   and abs(np.log2(size[i] / size[j])) <= 1 for j in taken)
        if not near:
            taken.append(int(i))
    for i in order:  # fewer spread-out candidates than asked: fill with the next best
        if len(taken) >= n:
            break
        if int(i) not in taken:
            taken.append(int(i))
    in_domain = np.all([f.in_domain(tin, tout, size) for f in fits], axis=0)
    return pd.DataFrame({"input_tokens": tin[taken].astype(int), "output_tokens": tout[taken].astype(int),
                         "batch_size": size[taken].astype(int), "relative_standard_error": score[taken],
                         "in_domain": in_domain[taken]}, columns=columns)


def _default_candidates(fit: FitResult, measured: set[tuple[int, int, int]], beyond_domain: bool,
                        batch_axis: bool) -> list[tuple[int, int, int]]:
    """The grid :func:`suggest_points` scores by default: token levels (with midpoints when the
    plain grid is measured in full) crossed with the batch levels, minus the measured points."""
    (in_lo, in_hi), (out_lo, out_hi) = fit.domain["input_tokens"], fit.domain["output_tokens"]
    if beyond_domain:
        in_lo, in_hi, out_lo, out_hi = max(in_lo // 2, 1), in_hi * 2, max(out_lo // 2, 1), out_hi * 2
    batch_levels = [1]
    if batch_axis:
        batch_lo, batch_hi = fit.batch_domain
        batch_levels = _candidate_levels(batch_lo, batch_hi, [p[2] for p in measured], midpoints=False)
    candidates: list[tuple[int, int, int]] = []
    for midpoints in (False, True):
        levels_in = _candidate_levels(in_lo, in_hi, [p[0] for p in measured], midpoints)
        levels_out = _candidate_levels(out_lo, out_hi, [p[1] for p in measured], midpoints)
        candidates = [(i, o, b) for i in levels_in for o in levels_out for b in batch_levels
                      if (i, o, b) not in measured]
        if candidates:
            break
    return candidates
