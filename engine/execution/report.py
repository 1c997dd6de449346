"""Predicted against measured: what an execution teaches about the plan and the fits."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def _relative(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or not predicted or math.isnan(measured) or math.isnan(predicted):
        return None
    return measured / predicted - 1.0


def compare(results: pd.DataFrame, energy_scope: str = "total") -> Comparison:
    """Compare an execution's results (from :func:`engine.execution.execution_results`) with its plan.

    ``energy_scope`` is the plan's: for a plan of dynamic energy, the measured side is
    total − idle power × runtime too (unknown where the idle power is).
    """
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
    predicted_runtime = float(ran["predicted_runtime_s"].sum()) if ran["predicted_runtime_s"].notna().any() else None
    return Comparison(
        n_run=len(ran), n_failed=failed, measured_energy_j=measured, predicted_energy_j=predicted,
        energy_error=_relative(measured, predicted), measured_runtime_s=float(ran["runtime_s"].sum()),
        predicted_runtime_s=predicted_runtime, runtime_error=_relative(float(ran["runtime_s"].sum()), predicted_runtime),
        per_query_energy_error_median=float(errors.median()) if len(errors) else None,
        per_query_energy_error_mean_abs=float(errors.abs().mean()) if len(errors) else None,
        outside_band=int((per_query["outside_band"] & band).sum()), with_band=int(band.sum()),
        energy_estimated=bool((ran["energy_source"] == "estimated").any()), per_option=per_option,
        per_query=per_query)


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
