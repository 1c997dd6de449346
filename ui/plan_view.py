"""The Plan page's drawings: the option table, a solved plan, its timeline, its baselines
and its trade-off curves. Everything shown is computed by :mod:`engine.planning`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.formatting import (format_accuracy, format_count, format_duration, format_energy, format_percent,
                               format_timestamp, format_watt_hours)
from engine.planning import PlanResult, PlanSettings, Workload
from engine.planning.band import band_sentence, uncertainty_against_gap
from engine.planning.summary import (SOURCE_DEMO, batching_sentences, compare_with_baselines, gap_sentence,
                                     offers_batches, option_usage, single_options_at_best_batch, timeline_batches,
                                     timeline_blocks)

#: Above this many batches the timeline draws one bar per block of a model instead of one per batch.
TIMELINE_MAX_BARS = 2000


# -- what a plan was made for ----------------------------------------------------------------

def workload_key(workload: Workload) -> str:
    """A fingerprint of a workload's queries as planned: a new upload (or other lengths) changes it."""
    digest = hashlib.sha256(workload.name.encode())
    digest.update(pd.util.hash_pandas_object(workload.queries.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PlanRequest:
    """What one press of Plan asked for; a result is shown only while the page still asks for its workload."""

    workload_key: str
    workload_name: str
    n_queries: int
    options: tuple[str, ...]
    settings: PlanSettings = field(compare=False)


# -- options -------------------------------------------------------------------------------------

def choose_options(table: pd.DataFrame) -> list[str]:
    """The option table with a tick per option; returns the options ticked.

    The editor's key follows the set of options, so loading new options starts again
    from their defaults instead of applying old ticks to other rows.
    """
    key = "plan_options_" + hashlib.sha256("|".join(table.option).encode()).hexdigest()[:10]
    edited = st.data_editor(
        table, key=key, hide_index=True, width="stretch", disabled=[c for c in table.columns if c != "use"],
        column_config={
            "use": st.column_config.CheckboxColumn("use", help="Plan with this option"),
            "option": None,  # model and device say it
            "source": st.column_config.TextColumn(
                "source", help="measured: fitted from trials measured here or imported; published: the paper's A100 "
                               "coefficients; demo: a demo model with random weights"),
        })
    chosen = edited[edited["use"].astype(bool)]
    demo = chosen["source"] == SOURCE_DEMO
    if demo.any() and not demo.all():
        st.warning("The chosen options mix demo models (random weights, meaningless answers) with real ones.")
    elif (table["source"] == SOURCE_DEMO).any() and not demo.any() and len(chosen):
        st.caption("Demo models are left out while real options exist; tick them to include them.")
    return chosen["option"].tolist()


# -- the result ----------------------------------------------------------------------------------

def energy_text(joules: float | None, estimated: bool) -> str:
    return format_energy(joules) + (" (estimated)" if estimated else "")


def show_headline(result: PlanResult) -> None:
    """Energy with the range it is expected to measure in, energy per query, accuracy and the
    proven gap; in words, which is larger (the prediction's uncertainty or the gap), which problem
    the gap is for, and what batching saves; then the solve's status line."""
    estimated = result.energy_estimated
    band = result.energy_band
    batched = offers_batches(result)
    top = st.columns(4)
    top[0].metric("Energy" + (" (estimated)" if estimated else ""), format_energy(result.energy_j),
                  delta=f"±{format_percent(band.relative)} expected" if band is not None else None,
                  delta_color="off", delta_arrow="off",
                  help=f"{result.energy_scope} energy, predicted by the fits ({format_watt_hours(result.energy_j)})"
                       + ("" if band is None else f"; expected to measure between {format_energy(band.low_j)} and "
                                                  f"{format_energy(band.high_j)}"))
    per_query_j = result.energy_j / result.n_queries
    top[1].metric("Per query", format_energy(per_query_j), help=f"{format_watt_hours(per_query_j)} per query")
    top[2].metric("Mean accuracy", f"{result.accuracy:.4f}", help=f"{result.settings.accuracy_mode}-weighted")
    top[3].metric("Proven gap", format_percent(result.gap, 4),
                  help=("of the assignment problem, which costs each query its per-request share of a batch: "
                        if batched else "") + "(energy − lower bound) / energy; no schedule can use less than the "
                                              "lower bound.")
    st.markdown(f"{band_sentence(band, estimated)} {uncertainty_against_gap(band, result.gap)}")
    st.markdown(gap_sentence(result))
    for line in batching_sentences(result):
        st.markdown(line)
    bound = (f"lower bound {energy_text(result.lower_bound_j, estimated)}" if result.lower_bound_j is not None
             else f"objective bound {result.objective_lower_bound:.6g}")
    method = result.solver.get("method", "")
    st.caption(f"Status **{result.status}**; {bound}; solved in {format_duration(result.solve_s)} "
               f"({format_duration(result.plan_s)} including token counts, predictions and baselines)"
               + (f"; {method}." if method else "."))


def show_assignment(result: PlanResult) -> None:
    """Per device: busy time against its deadline; per option: its batch size, queries (and the
    batches they were formed into), energy and time."""
    device_rows = []
    for device, seconds in result.per_device_runtime_s.items():
        limit = result.settings.device_deadline(device)
        device_rows.append({"device": device, "busy": format_duration(seconds),
                            "deadline": format_duration(limit) if limit else "none",
                            "used": format_percent(seconds / limit, 0) if limit else ""})
    usage = option_usage(result).assign(energy=lambda f: f.energy_j.map(format_energy),
                                        time=lambda f: f.runtime_s.map(format_duration))
    columns = ["option", "batch size", "queries"] + (["batches", "formed"] if offers_batches(result) else []) + [
        "energy", "time"]
    left, right = st.columns([1, 2])
    left.markdown("**Per device**")
    left.dataframe(pd.DataFrame(device_rows), hide_index=True, width="stretch")
    right.markdown("**Queries per option**")
    right.dataframe(usage[columns], hide_index=True, width="stretch", column_config={
        "batch size": st.column_config.TextColumn("batch size", help="The batch size the plan runs this model at "
                                                                       "on this device (1: one request at a time)"),
        "formed": st.column_config.TextColumn("batches formed", help="How many batches of each size, formed from the "
                                                                      "queries' real lengths (a batch may be smaller "
                                                                      "than the batch size where that costs less)")})


def show_extrapolation(result: PlanResult) -> None:
    """Warnings for queries predicted outside the measured range, or whose prediction was clamped."""
    schedule = result.schedule
    outside = schedule[~schedule.in_domain]
    if len(outside):
        st.warning(f"{format_count(len(outside), 'scheduled query', 'scheduled queries')} lie outside the token range "
                   "their option was measured over; their predictions are extrapolated.")
        with st.expander("Queries outside the measured range"):
            st.dataframe(outside, hide_index=True, width="stretch")
    clamped = int(schedule.clamped.sum())
    if clamped:
        st.warning(f"{format_count(clamped, 'scheduled query', 'scheduled queries')} had a negative prediction "
                   "(the paper's published form) clamped to 0.")


def timeline_figure(result: PlanResult) -> go.Figure:
    """One bar per batch (each from its start for its whole runtime; above
    :data:`TIMELINE_MAX_BARS` batches, one per block of consecutive batches of a model), coloured
    by model; deadlines as dashed lines."""
    per_batch = result.n_batches <= TIMELINE_MAX_BARS
    spans = timeline_batches(result.schedule) if per_batch else timeline_blocks(result.schedule)
    figure = go.Figure()
    for model, part in spans.groupby("model"):
        what = ("batch %{customdata[1]}, " if per_batch else "") + "%{customdata[0]} queries"
        labels = part.batch_id.astype(object).where(part.batch_id.notna(), "—") if per_batch else part.queries
        figure.add_trace(go.Bar(y=part.device, x=part.end_s - part.start_s, base=part.start_s, orientation="h",
                                name=model, customdata=list(zip(part.queries, labels)),
                                marker_line=dict(width=1 if per_batch else 0, color="white"),
                                hovertemplate="%{y}: " + model + ", " + what + "<br>"
                                              "from %{base:.1f} s, for %{x:.1f} s<extra></extra>"))
    makespan = max(result.per_device_runtime_s.values(), default=0.0) or 1.0
    far = []
    for device in result.per_device_runtime_s:
        limit = result.settings.device_deadline(device)
        if limit and limit <= 3 * makespan:
            figure.add_vline(x=limit, line_dash="dash", annotation_text=f"deadline {device}")
        elif limit:
            far.append(f"{device} {format_duration(limit)}")
    title = "When each device runs which model" + (", batch by batch" if per_batch and offers_batches(result) else "")
    if far:
        title += f" (deadlines far to the right: {', '.join(far)})"
    figure.update_layout(barmode="overlay", title=title, xaxis_title="time from start (s)", yaxis_title="device",
                         height=260 + 40 * len(result.per_device_runtime_s), margin=dict(t=50, b=40))
    return figure


def show_baselines(result: PlanResult) -> None:
    """The obvious alternatives on the same predictions, what the plan saves, and why one misses the
    targets. When some option batches, each model on its own is listed at its best batch size, and
    every other batch size in an expander."""
    rows = compare_with_baselines(result)
    shown, others = rows, []
    if offers_batches(result):
        best = {f"only {single.option}" + (f"×{single.batch_size}" if single.batch_size > 1 else ""): single
                for single in single_options_at_best_batch(result)}
        shown = [row for row in rows if not row.name.startswith("only ") or row.name in best]
        others = [row for row in rows if row.name.startswith("only ") and row.name not in best]
        names = {name: f"only {single.option} at B={single.batch_size} (its best batch size)"
                 for name, single in best.items()}
    else:
        names = {}
    st.markdown("**Compared with the obvious alternatives** (same predictions)")
    st.dataframe(_baseline_table(shown, names), hide_index=True, width="stretch")
    if others:
        with st.expander(f"Each model on its own at its other batch sizes ({format_count(len(others), 'schedule')})"):
            st.dataframe(_baseline_table(others, {}), hide_index=True, width="stretch")
    if result.energy_estimated:
        st.caption("Energies include estimated figures (labelled above).")


def _baseline_table(rows, names: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame([{"schedule": names.get(row.name, row.name), "energy": format_energy(row.energy_j),
                          "plan saves": format_percent(row.saving, unknown=""), "accuracy": f"{row.accuracy:.4f}",
                          "makespan": format_duration(row.makespan_s),
                          "meets the targets": "yes" if row.meets_targets else "no: " + "; ".join(row.misses)}
                         for row in rows])


# -- the trade-off curves --------------------------------------------------------------------------

def energy_unit(joules: pd.Series | list[float]) -> tuple[float, str]:
    """(factor, unit) to draw energies in J, kJ or MJ, chosen from the largest value."""
    values = [abs(v) for v in joules if v is not None and math.isfinite(v)]
    top = max(values, default=0.0)
    return (1e6, "MJ") if top >= 1e6 else (1e3, "kJ") if top >= 1e3 else (1.0, "J")


#: Round durations for a log axis of seconds: 1 s to 1 day.
_ROUND_DURATIONS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 4 * 3600, 12 * 3600, 86400)


def _short_duration(seconds: float) -> str:
    """``30 s``, ``5 min``, ``2 h``: a round duration as a tick label."""
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def duration_ticks(low_s: float, high_s: float) -> tuple[list[float], list[str]]:
    """Readable ticks for a log axis of seconds: round durations ("30 s", "5 min", "2 h") in the range."""
    inside = [v for v in _ROUND_DURATIONS_S if low_s / 1.5 <= v <= high_s * 1.5]
    while len(inside) > 7:
        inside = inside[::2]
    return [float(v) for v in inside], [_short_duration(v) for v in inside]


def curve_figures(result: PlanResult, by_accuracy: pd.DataFrame, by_deadline: pd.DataFrame
                  ) -> tuple[go.Figure, go.Figure]:
    """Energy against the accuracy target, and against the common deadline (log time axis); this plan as a star."""
    estimated = ", estimated" if result.energy_estimated else ""
    factor, unit = energy_unit(list(by_accuracy.energy_j) + list(by_deadline.energy_j) + [result.energy_j])
    accuracy_figure = go.Figure()
    ok = by_accuracy[by_accuracy.energy_j.notna()]
    accuracy_figure.add_trace(go.Scatter(x=ok.value, y=ok.energy_j / factor, mode="lines+markers",
                                         name="optimal plan"))
    if result.settings.accuracy_target is not None:
        accuracy_figure.add_trace(go.Scatter(x=[result.settings.accuracy_target], y=[result.energy_j / factor],
                                             mode="markers", marker=dict(size=14, symbol="star"), name="this plan"))
    accuracy_figure.update_layout(title="Energy against the accuracy target", xaxis_title="mean accuracy target",
                                  yaxis=dict(title=f"energy ({unit}{estimated})", rangemode="tozero"))

    deadline_figure = go.Figure()
    ok = by_deadline[by_deadline.energy_j.notna()]
    deadline_figure.add_trace(go.Scatter(x=ok.value, y=ok.energy_j / factor, mode="lines+markers",
                                         name="optimal plan",
                                         customdata=[format_duration(v) for v in ok.value],
                                         hovertemplate="deadline %{customdata}: %{y:.3g} " + unit + "<extra></extra>"))
    values = list(ok.value)
    if result.settings.deadline_s:
        deadline_figure.add_trace(go.Scatter(x=[result.settings.deadline_s], y=[result.energy_j / factor],
                                             mode="markers", marker=dict(size=14, symbol="star"), name="this plan"))
        values.append(result.settings.deadline_s)
    ticks, labels = duration_ticks(min(values, default=1.0), max(values, default=1.0))
    deadline_figure.update_layout(
        title="Energy against the deadline (every device)",
        xaxis=dict(title="deadline", type="log", tickvals=ticks, ticktext=labels),
        yaxis=dict(title=f"energy ({unit}{estimated})", rangemode="tozero"))
    return accuracy_figure, deadline_figure


def show_curves(result: PlanResult, curves: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    by_accuracy, by_deadline = curves
    accuracy_figure, deadline_figure = curve_figures(result, by_accuracy, by_deadline)
    left, right = st.columns(2)
    left.plotly_chart(accuracy_figure, width="stretch", key="plan_pareto_accuracy")
    right.plotly_chart(deadline_figure, width="stretch", key="plan_pareto_deadline")
    missing = int(by_accuracy.energy_j.isna().sum() + by_deadline.energy_j.isna().sum())
    if missing:
        one = missing == 1
        st.caption(f"{format_count(missing, 'point')} of the curves {'has' if one else 'have'} no feasible schedule "
                   f"and {'is' if one else 'are'} left out.")


def accuracy_range_text(accuracies: list[float]) -> str:
    """``The chosen options score 45.0% to 62.3%.``"""
    if not accuracies:
        return "No option is chosen."
    low, high = min(accuracies), max(accuracies)
    if np.isclose(low, high):
        return f"The chosen options score {format_accuracy(low)}."
    return f"The chosen options score {format_accuracy(low)} to {format_accuracy(high)}."


def stored_plans_table(plans: pd.DataFrame) -> pd.DataFrame:
    """Stored plans in words: local times, energies with units, the gap and times as such."""
    return pd.DataFrame({
        "plan": plans.id.map(lambda i: f"#{i}"), "created": plans.created_at.map(format_timestamp),
        "workload": plans.workload.fillna("schedule file"),
        "queries": plans.n_queries.map(lambda n: "" if pd.isna(n) else f"{int(n):,}"), "status": plans.status,
        "energy": plans.energy_j.map(format_energy), "scope": plans.energy_scope,
        "accuracy": plans.accuracy.map(lambda a: "—" if pd.isna(a) else f"{a:.4f}"),
        "target": plans.accuracy_target.map(lambda a: "none" if pd.isna(a) else f"{a:.3f}"),
        "deadline": plans.deadline_s.map(lambda d: format_duration(d, unknown="none")),
        "gap": plans.gap.map(lambda g: format_percent(g, 4)), "solved in": plans.solve_s.map(format_duration)})
