"""What the Models page draws of a fit's batch axis: the surface at a chosen batch size, the
energy (or runtime) per request against batch size at one request shape, and the measured
trials at each batch size.

A fit with a batch axis (:attr:`~engine.fitting.FitResult.has_batch_axis`) predicts ONE
BATCH of B requests of the same shape (τin, τout); a request's share of it is the batch's
value / B, which is what makes batch sizes comparable. A fit without a batch axis was
measured at batch size 1 only and is drawn as it always was (:func:`surface_grid_at` hands
it to :func:`~engine.fitting.surface_grid`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from engine.fitting import FitResult, load_trials, residuals, surface_grid
from engine.store import Store

#: Batch sizes drawn on a curve at most: every whole number up to this range, a geometric
#: selection of them beyond.
CURVE_POINTS = 128


def load_trials_by_batch_size(store: Store, model: str, device: str, energy_scope: str = "total") -> pd.DataFrame:
    """The checked trials a fit of (model, device) is made of (:func:`~engine.fitting.load_trials`),
    with a ``batch_size`` column (a NULL batch size is 1; energy_j and runtime_s stay those of
    the whole batch, as stored)."""
    trials = load_trials(store, model, device, energy_scope=energy_scope)
    if "batch_size" in trials.columns:
        return trials.assign(batch_size=trials["batch_size"].fillna(1).astype(int))
    sizes = store.query_df("SELECT id, coalesce(batch_size, 1) AS batch_size FROM measurements "
                           "WHERE model = ? AND device = ?", [model, device])
    merged = trials.merge(sizes, on="id", how="left")
    return merged.assign(batch_size=merged["batch_size"].fillna(1).astype(int))


def batch_size_choices(fit: FitResult, trials: pd.DataFrame | None = None) -> list[int]:
    """The batch sizes a page offers for a fit: the measured ones within its batch range, its
    ends and the powers of two between them; [1] for a fit without a batch axis."""
    if not fit.has_batch_axis:
        return [1]
    lo, hi = fit.batch_domain
    sizes = {lo, hi} | {2 ** k for k in range(0, 31) if lo <= 2 ** k <= hi}
    if trials is not None and "batch_size" in trials.columns:
        sizes |= {int(b) for b in trials["batch_size"].dropna().unique() if lo <= b <= hi}
    return sorted(sizes)


def trials_at_batch_size(trials: pd.DataFrame | None, batch_size: int) -> pd.DataFrame | None:
    """The trials measured at this batch size (trials without a batch_size column are at 1)."""
    if trials is None:
        return None
    sizes = trials["batch_size"] if "batch_size" in trials.columns else pd.Series(1, index=trials.index)
    return trials[sizes.to_numpy() == int(batch_size)]


def surface_grid_at(fit: FitResult, batch_size: int = 1, n: int = 30, log: bool = True) -> pd.DataFrame:
    """:func:`~engine.fitting.surface_grid` at one batch size, per request.

    For a fit with a batch axis the columns are those of ``surface_grid`` with every value a
    request's share of one batch of ``batch_size`` (the batch's value / B), plus
    ``<value>_batch``: the whole batch's value (clamped at 0). A fit without a batch axis
    refuses any batch size but 1 (ValueError, from the fit) and returns ``surface_grid`` itself.
    """
    if not fit.has_batch_axis:
        fit.predict_raw(1, 1, batch_size)  # raises for a batch size the fit cannot predict
        return surface_grid(fit, n=n, log=log)
    grid = surface_grid(fit, n=n, log=log)  # the axes over the token domain, as at batch size 1
    tin, tout = grid["input_tokens"].to_numpy(), grid["output_tokens"].to_numpy()
    size = float(batch_size)
    batch_raw = fit.predict_raw(tin, tout, size)
    column = fit.value_column
    per_request_raw = batch_raw / size
    grid[f"{column}_batch"] = np.maximum(batch_raw, 0.0)
    grid[f"{column}_raw"] = per_request_raw
    grid[column] = np.maximum(per_request_raw, 0.0)
    grid[f"{column}_uncertainty"] = fit.uncertainty(tin, tout, size) / size
    grid[f"{column}_per_token"] = grid[column] / (tin + tout)
    grid["in_domain"] = fit.in_domain(tin, tout, size)
    return grid


def curve_batch_sizes(fit: FitResult, extra: Sequence[int] = ()) -> np.ndarray:
    """The batch sizes a per-request curve is drawn at: every whole number in the fit's batch
    range (a geometric selection when the range is wide), and ``extra`` sizes within it."""
    lo, hi = fit.batch_domain
    if hi - lo + 1 <= CURVE_POINTS:
        sizes = np.arange(lo, hi + 1)
    else:
        sizes = np.unique(np.round(np.geomspace(lo, hi, CURVE_POINTS)).astype(int))
    inside = [int(b) for b in extra if lo <= b <= hi]
    return np.unique(np.concatenate([sizes, np.asarray(inside, dtype=int)])).astype(int)


def per_request_curve(fit: FitResult, input_tokens: int, output_tokens: int,
                      batch_sizes: Sequence[int] | None = None) -> pd.DataFrame:
    """A request's share of one batch, against the batch size, at one shape (τin, τout).

    Columns: batch_size; batch (the whole batch's predicted value, clamped at 0, in J or s);
    per_request (batch / batch_size); per_request_uncertainty (the half-width of the batch's
    90% interval / batch_size; NaN when unknown); in_domain. Default batch sizes:
    :func:`curve_batch_sizes`. Raises ValueError for a fit without a batch axis asked for a
    batch size other than 1.
    """
    sizes = np.asarray(curve_batch_sizes(fit) if batch_sizes is None else batch_sizes, dtype=float)
    tin, tout = float(input_tokens), float(output_tokens)
    batch = np.maximum(fit.predict_raw(tin, tout, sizes), 0.0)
    return pd.DataFrame({
        "batch_size": sizes.astype(int), "batch": batch, "per_request": batch / sizes,
        "per_request_uncertainty": fit.uncertainty(tin, tout, sizes) / sizes,
        "in_domain": fit.in_domain(tin, tout, sizes),
    })


def measured_per_request(trials: pd.DataFrame | None, column: str, input_tokens: int,
                         output_tokens: int) -> pd.DataFrame:
    """The trials measured at one shape, each as a request's share of its batch.

    Columns: id, batch_size, batch (the trial's measured ``column``: energy_j or runtime_s
    of the whole batch), per_request (batch / batch_size). Trials without a value for
    ``column`` are left out; sorted by batch size.
    """
    empty = pd.DataFrame({"id": pd.Series(dtype="int64"), "batch_size": pd.Series(dtype="int64"),
                          "batch": pd.Series(dtype=float), "per_request": pd.Series(dtype=float)})
    if trials is None or trials.empty:
        return empty
    sizes = trials["batch_size"] if "batch_size" in trials.columns else pd.Series(1, index=trials.index)
    shape = ((trials["input_tokens"] == int(input_tokens)) & (trials["output_tokens"] == int(output_tokens))
             & trials[column].notna())
    if not shape.any():
        return empty
    chosen = trials[shape]
    batch_size = sizes[shape].astype(int).to_numpy()
    frame = pd.DataFrame({"id": chosen["id"].to_numpy(), "batch_size": batch_size,
                          "batch": chosen[column].to_numpy(dtype=float)})
    frame["per_request"] = frame["batch"] / frame["batch_size"]
    return frame.sort_values(["batch_size", "id"], kind="stable").reset_index(drop=True)


def best_measured_shape(trials: pd.DataFrame | None, fit: FitResult) -> tuple[int, int]:
    """The shape (τin, τout) to draw a per-request curve at by default: the measured shape
    with the most batch sizes (then the most trials, then the smallest); without trials, the
    geometric middle of the fit's token domain."""
    if trials is not None and len(trials):
        sizes = trials["batch_size"] if "batch_size" in trials.columns else pd.Series(1, index=trials.index)
        counts = (trials.assign(batch_size=sizes).groupby(["input_tokens", "output_tokens"])
                  .agg(sizes=("batch_size", "nunique"), n=("batch_size", "size")).reset_index())
        best = counts.sort_values(["sizes", "n", "input_tokens", "output_tokens"],
                                  ascending=[False, False, True, True], kind="stable").iloc[0]
        return int(best.input_tokens), int(best.output_tokens)
    (in_lo, in_hi), (out_lo, out_hi) = fit.domain["input_tokens"], fit.domain["output_tokens"]
    return (int(round(np.sqrt(max(in_lo, 1) * in_hi))), int(round(np.sqrt(max(out_lo, 1) * out_hi))))


def residuals_by_batch_size(fit: FitResult, trials: pd.DataFrame) -> pd.DataFrame:
    """:func:`~engine.fitting.residuals`, each trial predicted at its own batch size (a fit
    with a batch axis predicts a whole batch, which is what a batched trial measured).

    Columns: those of ``residuals`` and batch_size. A fit without a batch axis is handed
    to ``residuals`` unchanged (its trials are all at batch size 1).
    """
    if not fit.has_batch_axis:
        frame = residuals(fit, trials)
        return frame.assign(batch_size=1)
    chosen = trials[trials[fit.value_column].notna()]
    sizes = (chosen["batch_size"] if "batch_size" in chosen.columns else pd.Series(1, index=chosen.index))
    measured = chosen[fit.value_column].to_numpy(dtype=float)
    predicted = fit.predict_raw(chosen["input_tokens"].to_numpy(dtype=float),
                                chosen["output_tokens"].to_numpy(dtype=float), sizes.to_numpy(dtype=float))
    return pd.DataFrame({"id": chosen["id"].to_numpy() if "id" in chosen.columns else np.arange(len(chosen)),
                         "input_tokens": chosen["input_tokens"].to_numpy(),
                         "output_tokens": chosen["output_tokens"].to_numpy(),
                         "measured": measured, "predicted": predicted, "residual": measured - predicted,
                         "relative_residual": (measured - predicted) / measured,
                         "batch_size": sizes.to_numpy(dtype=int)})
