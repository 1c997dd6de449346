"""Predicted against measured, per query, per batch and per option: what an execution teaches about the plan
and the fits."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.store import Store

ALL_CATEGORIES = "(all)"


@dataclass
class Comparison:
    """Totals and errors of the queries that ran (failed queries left out and counted).

    Errors are (measured − predicted) / predicted, per query and in total. ``outside_band``
    counts queries whose measured energy lies outside the fit's 90% prediction interval
    (only where the fit has one). ``per_option`` has per model@device: queries, measured
    and predicted energy and runtime, and the total error.

    Per batch (a query outside any batch is a batch of its own): ``per_batch`` has batch_id
    (NaN for a query outside any batch), model, device, queries, batch_size (planned),
    measured and predicted energy and runtime and their errors, wasted_decode_tokens and
    padding_tokens. A batch's measured figures are its members' shares summed (which is the
    batch's own, by the share rule); its prediction is its members' predictions summed (the
    planner predicts a batch as a whole and gives each member a part of it). ``per_query``
    has, beside each query's error, ``measured_share`` (its part of its batch's measured
    energy) and ``predicted_share`` (its part of the batch's prediction).
    """

    n_run: int
    n_failed: int
    measured_energy_j: float | None
    predicted_energy_j: float | None
    energy_error: float | None
    measured_runtime_s: float
    predicted_runtime_s: float | None
    runtime_error: float | None
    per_query_energy_error_median: float | None
    per_query_energy_error_mean_abs: float | None
    outside_band: int
    with_band: int
    energy_estimated: bool
    per_option: pd.DataFrame
    per_query: pd.DataFrame
    per_batch: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_batches: int = 0
    n_batches_failed: int = 0
    per_batch_energy_error_median: float | None = None
    per_batch_energy_error_mean_abs: float | None = None
    #: The 10th and 90th percentiles of the per-batch energy errors (None without any).
    per_batch_energy_error_p10_p90: tuple[float, float] | None = None


def _relative(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or not predicted or math.isnan(measured) or math.isnan(predicted):
        return None
    return measured / predicted - 1.0


def compare(results: pd.DataFrame, energy_scope: str = "total") -> Comparison:
    """Compare an execution's results (from :func:`engine.execution.execution_results`) with its plan.

    ``energy_scope`` is the plan's: for a plan of dynamic energy, the measured side is
    total − idle power × runtime too (unknown where the idle power is). Since a batch's
    members share its energy and runtime by one rule, their dynamic energies add up to the
    batch's too.
    """
    results = results.assign(batch=_batch_keys(results))
    ran = results[results["error"].isna()].copy()
    if energy_scope == "dynamic":
        ran["energy_j"] = ran["energy_j"] - ran["idle_power_w"] * ran["runtime_s"]
    failed = int(results["error"].notna().sum())
    with_energy = ran[ran["energy_j"].notna() & ran["predicted_energy_j"].notna()]
    measured = float(with_energy["energy_j"].sum()) if len(with_energy) else None
    predicted = float(with_energy["predicted_energy_j"].sum()) if len(with_energy) else None
    per_query = ran.assign(
        energy_error=(ran["energy_j"] / ran["predicted_energy_j"] - 1.0).where(ran["predicted_energy_j"] > 0),
        runtime_error=(ran["runtime_s"] / ran["predicted_runtime_s"] - 1.0).where(ran["predicted_runtime_s"] > 0),
        outside_band=(ran["energy_j"] - ran["predicted_energy_j"]).abs() > ran["predicted_energy_uncertainty_j"],
        measured_share=ran["energy_j"] / ran.groupby("batch", sort=False)["energy_j"].transform(_sum_all),
        predicted_share=ran["predicted_energy_j"] / ran.groupby("batch", sort=False)["predicted_energy_j"].transform(
            _sum_all),
    )
    band = per_query["predicted_energy_uncertainty_j"].notna() & per_query["energy_j"].notna()
    paired = per_query["energy_j"].notna() & per_query["predicted_energy_j"].notna()
    per_option = per_query.assign(
        option=per_query["model"] + "@" + per_query["device"],
        # Energy totals pair only queries with both a measurement and a prediction, like the overall totals.
        energy_j=per_query["energy_j"].where(paired),
        predicted_energy_j=per_query["predicted_energy_j"].where(paired)).groupby("option").agg(
        queries=("id", "size"), measured_energy_j=("energy_j", lambda v: v.sum(min_count=1)),
        predicted_energy_j=("predicted_energy_j", lambda v: v.sum(min_count=1)),
        measured_runtime_s=("runtime_s", "sum"), predicted_runtime_s=("predicted_runtime_s", "sum"),
        median_energy_error=("energy_error", "median")).reset_index()
    per_option["energy_error"] = per_option["measured_energy_j"] / per_option["predicted_energy_j"] - 1.0
    errors = per_query["energy_error"].dropna()
    per_batch = _per_batch(per_query)
    batch_errors = per_batch["energy_error"].dropna()
    predicted_runtime = float(ran["predicted_runtime_s"].sum()) if ran["predicted_runtime_s"].notna().any() else None
    return Comparison(
        n_run=len(ran), n_failed=failed, measured_energy_j=measured, predicted_energy_j=predicted,
        energy_error=_relative(measured, predicted), measured_runtime_s=float(ran["runtime_s"].sum()),
        predicted_runtime_s=predicted_runtime, runtime_error=_relative(float(ran["runtime_s"].sum()), predicted_runtime),
        per_query_energy_error_median=float(errors.median()) if len(errors) else None,
        per_query_energy_error_mean_abs=float(errors.abs().mean()) if len(errors) else None,
        outside_band=int((per_query["outside_band"] & band).sum()), with_band=int(band.sum()),
        energy_estimated=bool((ran["energy_source"] == "estimated").any()), per_option=per_option,
        per_query=per_query.drop(columns="batch"), per_batch=per_batch, n_batches=len(per_batch),
        n_batches_failed=int(results.loc[results["error"].notna(), "batch"].nunique()),
        per_batch_energy_error_median=float(batch_errors.median()) if len(batch_errors) else None,
        per_batch_energy_error_mean_abs=float(batch_errors.abs().mean()) if len(batch_errors) else None,
        per_batch_energy_error_p10_p90=(float(batch_errors.quantile(0.1)), float(batch_errors.quantile(0.9)))
        if len(batch_errors) else None)


def _batch_keys(results: pd.DataFrame) -> pd.Series:
    """Each result's batch: its batch_id, or (a query outside any batch, an older execution) its own id."""
    ids = results["batch_id"] if "batch_id" in results.columns else pd.Series(np.nan, index=results.index)
    alone = "query " + results["id"].astype(str)
    return ids.astype(object).where(ids.notna(), alone)


def _sum_all(values: pd.Series) -> float:
    """The sum when every value is known, else NaN (a batch's figure is all of its members' or unknown)."""
    return float("nan") if values.isna().any() else float(values.sum())


def _per_batch(per_query: pd.DataFrame) -> pd.DataFrame:
    """One row per batch that ran, in the order of its first member (see :class:`Comparison`)."""
    columns = ["batch_id", "model", "device", "queries", "batch_size", "measured_energy_j", "predicted_energy_j",
               "energy_error", "measured_runtime_s", "predicted_runtime_s", "runtime_error", "wasted_decode_tokens",
               "padding_tokens"]
    if per_query.empty:
        return pd.DataFrame(columns=columns)
    frame = per_query.assign(**{column: per_query[column] if column in per_query.columns else np.nan
                                for column in ("batch_id", "batch_size", "wasted_decode_tokens", "padding_tokens")})
    grouped = frame.groupby("batch", sort=False)
    per_batch = grouped.agg(
        batch_id=("batch_id", "first"), model=("model", "first"), device=("device", "first"),
        queries=("id", "size"), batch_size=("batch_size", "first"),
        measured_energy_j=("energy_j", _sum_all), predicted_energy_j=("predicted_energy_j", _sum_all),
        measured_runtime_s=("runtime_s", _sum_all), predicted_runtime_s=("predicted_runtime_s", _sum_all),
        wasted_decode_tokens=("wasted_decode_tokens", lambda v: v.sum(min_count=1)),
        padding_tokens=("padding_tokens", lambda v: v.sum(min_count=1))).reset_index(drop=True)
    per_batch["batch_size"] = per_batch["batch_size"].fillna(per_batch["queries"])
    per_batch["energy_error"] = (per_batch["measured_energy_j"] / per_batch["predicted_energy_j"] - 1.0).where(
        per_batch["predicted_energy_j"] > 0)
    per_batch["runtime_error"] = (per_batch["measured_runtime_s"] / per_batch["predicted_runtime_s"] - 1.0).where(
        per_batch["predicted_runtime_s"] > 0)
    return per_batch[columns]


def execution_batches(store: Store, execution_id: int) -> pd.DataFrame:
    """Per executed batch, as measured (the Execute page's batch table): in run order per device.

    Columns: batch_id, model, device, batch_size (planned), members, query_ids (a list),
    runtime_s (the batch's wall time: each member's latency), energy_j (the whole batch's),
    energy_source, idle_power_w, input_tokens and output_tokens (all members'),
    max_input_tokens, decode_steps, wasted_decode_tokens, padding_tokens, predicted_energy_j
    and predicted_runtime_s (its members' predictions summed), energy_error, runtime_error,
    energy_per_request_j, share_rule, refit_shape (exact, padded, or None when kept out of
    refits), refit_note, measurement_id, error, started_at, finished_at.
    """
    frame = store.query_df(
        """SELECT batch_id, model, device, batch_size, members, CAST(query_ids AS VARCHAR) AS query_ids, runtime_s,
                  energy_j, energy_source, idle_power_w, input_tokens, output_tokens, max_input_tokens, decode_steps,
                  wasted_decode_tokens, padding_tokens, predicted_energy_j, predicted_runtime_s, share_rule,
                  refit_shape, refit_note, measurement_id, error, started_at, finished_at
           FROM execution_batches WHERE execution_id = ? ORDER BY device, position, batch_id""", [int(execution_id)])
    frame["query_ids"] = [json.loads(ids) if isinstance(ids, str) else [] for ids in frame["query_ids"]]
    frame["energy_error"] = (frame["energy_j"] / frame["predicted_energy_j"] - 1.0).where(
        frame["predicted_energy_j"] > 0)
    frame["runtime_error"] = (frame["runtime_s"] / frame["predicted_runtime_s"] - 1.0).where(
        frame["predicted_runtime_s"] > 0)
    frame["energy_per_request_j"] = frame["energy_j"] / frame["members"]
    return frame


def learned_output_lengths(store: Store) -> pd.DataFrame:
    """What executed prompts really produced, per model and per category.

    Only prompts count (token-count queries were forced to their length). Columns: model,
    category (``(all)`` for every query of the model), queries, median_output_tokens, mean_output_tokens, p90_output_tokens,
    ended_early (share that stopped at an end-of-answer token before the cap).
    """
    frame = store.query_df(
        """SELECT model, coalesce(category, '') AS category, output_tokens, stopped
           FROM execution_results WHERE prompt_kind = 'text' AND error IS NULL""")
    if frame.empty:
        return pd.DataFrame(columns=["model", "category", "queries", "median_output_tokens", "mean_output_tokens",
                                     "p90_output_tokens", "ended_early"])
    rows = []

    def summary(model: str, category: str, part: pd.DataFrame) -> dict:
        lengths = part["output_tokens"].to_numpy(dtype=float)
        return {"model": model, "category": category, "queries": len(part),
                "median_output_tokens": float(np.median(lengths)), "mean_output_tokens": float(lengths.mean()),
                "p90_output_tokens": float(np.percentile(lengths, 90)),
                "ended_early": float((part["stopped"] == "end of answer").mean())}

    for model, part in frame.groupby("model"):
        rows.append(summary(model, ALL_CATEGORIES, part))
        for category, piece in part[part["category"] != ""].groupby("category"):
            rows.append(summary(model, category, piece))
    return pd.DataFrame(rows).sort_values(["model", "category"]).reset_index(drop=True)
