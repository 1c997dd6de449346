"""Plan: upload a workload, set targets, get the energy-optimal schedule and its context."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.errors import InputError, PlannerError
from engine.execution import learned_output_lengths
from engine.fitting import load_reference_profiles
from engine.paths import PROJECT_ROOT
from engine.formatting import format_accuracy, format_duration, format_energy, format_percent, format_watt_hours
from engine.planning import (
    PlanSettings,
    list_plans,
    load_options,
    load_plan,
    pareto_curve,
    plan_workload,
    read_workload,
    read_workload_upload,
    schedule_csv,
)
from ui.common import flash, get_store, show_error, show_flash
from ui.navigation import ensure_app_navigation

SAMPLE_WORKLOAD = PROJECT_ROOT / "data" / "workloads" / "sample_50.csv"
TIMELINE_MAX_BARS = 400

ensure_app_navigation()
st.title("Plan")
st.caption("Upload a workload, set the accuracy and deadline you need, and get the schedule that meets them with the "
           "least energy, with a proof of how close to optimal it is.")
store = get_store()
show_flash()


def energy_text(joules: float | None, estimated: bool) -> str:
    return format_energy(joules) + (" (estimated)" if estimated else "")


# -- options ----------------------------------------------------------------------------------

scope = st.radio("Energy to minimise", ["total", "dynamic"], horizontal=True, key="plan_scope",
                 help="Total: everything the sensor counted. Dynamic: total minus the device's idle power x runtime. "
                      "Needs fits of that scope (Models page).")
try:
    options, notes = load_options(store, scope)
except PlannerError as exc:
    show_error(exc)
    st.stop()

if not options:
    st.info("Nothing to plan with yet: no model has both an energy and a runtime fit in this scope and an accuracy "
            "score. Profile and fit the demo models first, or load the paper's published A100 reference profiles "
            "to explore data-centre-scale plans.")
    left, right = st.columns(2)
    left.page_link("pages/profile.py", label="Profile a model", icon=":material/speed:")
    if right.button("Load the published A100 reference profiles", key="load_reference"):
        try:
            names = load_reference_profiles(store)
            flash(f"Loaded {len(names)} reference profiles (published coefficients, no measurements).")
            st.rerun()
        except PlannerError as exc:
            show_error(exc)
    for note in notes:
        st.caption(note)
    st.stop()

option_rows = pd.DataFrame([{
    "option": o.key, "model": o.model, "device": o.device, "accuracy": format_accuracy(o.accuracy),
    "energy": ("published, no measurements" if o.published else
               "estimated (no sensor)" if o.energy_estimated else "measured"),
    "energy fit": f"{o.energy_fit.form}, CV MAPE {format_percent(o.energy_fit.cv_mape)}"
    if o.energy_fit.cv_mape is not None else o.energy_fit.form,
} for o in options])
with st.expander(f"{len(options)} options available (model on device)", expanded=False):
    st.dataframe(option_rows, hide_index=True, width="stretch")
    for note in notes:
        st.caption(note)

# -- workload -----------------------------------------------------------------------------------

st.subheader("1. Workload")
st.caption("CSV with a header: `[id,] prompt | input_tokens [, output_tokens | max_output_tokens] "
           "[, min_accuracy, category]`. Prompts are counted with each model's own tokenizer.")
source = st.radio("Workload", ["Upload a CSV", f"Sample workload ({SAMPLE_WORKLOAD.name})"], horizontal=True,
                  key="plan_source", label_visibility="collapsed")
upload = None
if source == "Upload a CSV":
    upload = st.file_uploader("Workload CSV", type=["csv"], key="workload_upload")
drop_bad = st.checkbox("Drop bad rows and plan the rest", value=False, key="plan_drop_bad",
                       help="Off: a file with any bad row is refused, with every problem listed.")

workload = None
try:
    if source != "Upload a CSV":
        workload = read_workload(SAMPLE_WORKLOAD, drop_bad_rows=drop_bad)
    elif upload is not None:
        workload = read_workload_upload(upload.getvalue(), upload.name, drop_bad_rows=drop_bad)
except InputError as exc:
    st.error(f"The workload has {len(exc.problems)} problem{'s' if len(exc.problems) > 1 else ''}; nothing was "
             "planned. Fix them, or tick *Drop bad rows* to plan the rest.")
    st.dataframe(pd.DataFrame([{"where": p.where, "column": p.column or "", "problem": p.message,
                                "expected": p.expected or ""} for p in exc.problems]),
                 hide_index=True, width="stretch")
except PlannerError as exc:
    show_error(exc)

if workload is not None:
    try:
        learned = learned_output_lengths(store)
    except PlannerError:
        learned = pd.DataFrame()
    missing = workload.queries.output_tokens.isna() & workload.queries.max_output_tokens.isna()
    if len(learned) and missing.any():
        overall = learned[learned.category == "(all)"]
        by_category = learned[learned.category != "(all)"].groupby("category")["median_output_tokens"].median()
        fallback = float(overall.median_output_tokens.median())
        if st.checkbox(f"Use output lengths learned from executions for the {int(missing.sum())} queries without one "
                       f"(median {fallback:.0f} tokens; per category where known)", value=True, key="plan_learned"):
            categories = workload.queries.category.where(missing)
            filled = categories.map(by_category).fillna(fallback).round().clip(lower=1)
            queries = workload.queries.copy()
            queries.loc[missing, "output_tokens"] = filled[missing].astype("int64")
            workload = replace(workload, queries=queries, warnings=workload.warnings + [
                f"{int(missing.sum())} queries planned with output lengths learned from executed prompts"])
    queries = workload.queries
    with_prompt = int(queries.prompt.notna().sum())
    st.success(f"{workload.n_queries:,} queries read from {workload.name}: {with_prompt:,} with a prompt, "
               f"{workload.n_queries - with_prompt:,} with token counts only.")
    for warning in workload.warnings:
        st.warning(warning)
    if workload.dropped:
        st.warning(f"{len(workload.dropped)} bad rows were dropped and will not be planned:")
        st.dataframe(pd.DataFrame([{"where": p.where, "column": p.column or "", "problem": p.message}
                                   for p in workload.dropped]), hide_index=True, width="stretch")
    with st.expander("Preview the queries"):
        st.dataframe(queries.head(200), hide_index=True, width="stretch")

# -- targets ------------------------------------------------------------------------------------

st.subheader("2. Targets")
accuracies = sorted({o.accuracy for o in options})
default_target = round(float(np.mean(accuracies)), 2)
devices = list(dict.fromkeys(o.device for o in options))
with st.form("plan_settings"):
    left, middle, right = st.columns(3)
    with left:
        use_target = st.checkbox("Require a mean accuracy", value=True, key="plan_use_target")
        target = st.number_input("Accuracy target (fraction)", min_value=0.0, max_value=1.0, value=default_target,
                                 step=0.01, format="%.3f", key="plan_target",
                                 help=f"The models here score {accuracies[0]:.3f} to {accuracies[-1]:.3f}.")
        mode = st.radio("Accuracy weighting", ["query", "token"], horizontal=True, key="plan_mode",
                        help="query: every query counts once. token: weighted by τin + τout, the paper's "
                             "A_K·(τin + τout).")
    with middle:
        use_deadline = st.checkbox("Deadline per device", value=True, key="plan_use_deadline",
                                   help="The queries a device runs, one after another, must finish in time. "
                                        "Devices run in parallel.")
        deadline_min = st.number_input("Deadline (minutes, every device)", min_value=0.01, value=60.0, step=5.0,
                                       key="plan_deadline")
        per_device = {}
        if len(devices) > 1:
            for device in devices:
                value = st.number_input(f"Deadline on {device} (minutes; 0 = as above)", min_value=0.0, value=0.0,
                                        key=f"plan_deadline_{device}")
                if value > 0:
                    per_device[device] = value * 60
        default_output = st.number_input("Output length where the workload gives none (tokens)", min_value=1,
                                         max_value=100_000, value=128, step=16, key="plan_default_output")
    with right:
        objective = st.radio("Objective", ["least energy", "the paper's ζ-weighted cost"], key="plan_objective")
        zeta = st.slider("ζ (weight of energy against accuracy)", 0.0, 1.0, 0.5, 0.05, key="plan_zeta",
                         help="Only for the ζ-weighted cost: ζ·energy/max − (1 − ζ)·token accuracy/max.")
        chosen = st.multiselect("Options to use", [o.key for o in options], default=[o.key for o in options],
                                key="plan_options")
    with st.expander("Advanced: model load costs, minimum shares, solver"):
        st.caption("Load costs are counted once for each model used on a device (time on its deadline, energy in "
                   "the total). Leave 0 to ignore.")
        loads = st.data_editor(pd.DataFrame({"option": [o.key for o in options], "load_s": 0.0, "load_energy_j": 0.0}),
                               hide_index=True, disabled=["option"], key="plan_loads", width="stretch")
        shares = st.data_editor(pd.DataFrame({"model": sorted({o.model for o in options}), "min_share": 0.0}),
                                hide_index=True, disabled=["model"], key="plan_shares", width="stretch")
        time_limit = st.number_input("Solver time limit (s)", min_value=1.0, max_value=600.0, value=30.0,
                                     key="plan_time_limit")
    submitted = st.form_submit_button("Plan", type="primary", disabled=workload is None)
if workload is None:
    st.caption("Choose a workload above to plan.")

if submitted and workload is not None:
    load_costs = {row.option: (float(row.load_s), float(row.load_energy_j)) for row in loads.itertuples()
                  if (row.load_s or 0) > 0 or (row.load_energy_j or 0) > 0}
    settings = PlanSettings(
        accuracy_target=float(target) if use_target else None, accuracy_mode=mode,
        deadline_s=float(deadline_min) * 60 if use_deadline else None,
        deadlines_s=per_device if use_deadline else {},
        objective="energy" if objective == "least energy" else "zeta",
        zeta=float(zeta) if objective != "least energy" else None,
        min_share={row.model: float(row.min_share) for row in shares.itertuples() if (row.min_share or 0) > 0},
        count_load=bool(load_costs), energy_scope=scope, time_limit_s=float(time_limit))
    try:
        with st.spinner(f"Counting tokens, predicting and solving for {workload.n_queries:,} queries…"):
            result = plan_workload(store, workload, settings, default_output_tokens=int(default_output),
                                   only=chosen or None, load_costs=load_costs or None)
        st.session_state["plan_result"] = result
        st.session_state.pop("plan_curves", None)
    except PlannerError as exc:
        show_error(exc)

# -- the result ---------------------------------------------------------------------------------

result = st.session_state.get("plan_result")
if result is not None:
    st.subheader("3. The schedule" + (f" (plan #{result.plan_id})" if result.plan_id else ""))
    estimated = result.energy_estimated
    for warning in result.warnings:
        st.warning(warning)
    if not result.has_schedule:
        st.error("No schedule meets these targets.\n\n" + "\n".join(f"- {line}" for line in result.diagnosis))
        best = result.best_achievable
        if best:
            st.dataframe(pd.DataFrame([{"what": k, "best achievable": v} for k, v in best.items()]),
                         hide_index=True)
    else:
        if estimated:
            st.info("Some options' energy is **estimated** (no sensor on the device that was profiled); every energy "
                    "figure below that includes them is an estimate.")
        n = result.n_queries
        top = st.columns(4)
        top[0].metric("Energy" + (" (estimated)" if estimated else ""), format_energy(result.energy_j),
                      help=f"{result.energy_scope} energy, predicted by the fits")
        per_query_j = result.energy_j / n
        top[1].metric("Per query", format_watt_hours(per_query_j), help=f"{format_energy(per_query_j)} per query")
        top[2].metric("Mean accuracy", f"{result.accuracy:.4f}", help=f"{result.settings.accuracy_mode}-weighted")
        top[3].metric("Proven gap", format_percent(result.gap, 4),
                      help="(energy − lower bound) / energy: no schedule can use less than the lower bound.")
        bound = (f"lower bound {energy_text(result.lower_bound_j, estimated)}" if result.lower_bound_j is not None
                 else f"objective bound {result.objective_lower_bound:.6g}")
        st.caption(f"Status **{result.status}**; {bound}; solved in {format_duration(result.solve_s)} "
                   f"({format_duration(result.plan_s)} including token counts, predictions and baselines); "
                   f"{result.solver.get('method', '')}.")

        device_rows = []
        for device, seconds in result.per_device_runtime_s.items():
            limit = result.settings.device_deadline(device)
            device_rows.append({"device": device, "busy": format_duration(seconds),
                                "deadline": format_duration(limit) if limit else "none",
                                "used": format_percent(seconds / limit, 0) if limit else ""})
        schedule = result.schedule
        per_option = schedule.assign(option=schedule.model + "@" + schedule.device).groupby("option").agg(
            queries=("id", "size"), energy_j=("predicted_energy_j", "sum"), runtime_s=("predicted_runtime_s", "sum"))
        left, right = st.columns(2)
        left.markdown("**Per device**")
        left.dataframe(pd.DataFrame(device_rows), hide_index=True, width="stretch")
        right.markdown("**Queries per option**")
        right.dataframe(per_option.reset_index().assign(
            energy=lambda f: f.energy_j.map(format_energy), time=lambda f: f.runtime_s.map(format_duration))[
            ["option", "queries", "energy", "time"]], hide_index=True, width="stretch")

        if result.constraint_costs:
            st.markdown("**What each constraint costs**")
            for cost in result.constraint_costs:
                st.markdown(f"- {cost.text}")

        outside = schedule[~schedule.in_domain]
        if len(outside):
            st.warning(f"{len(outside):,} scheduled queries lie outside the token range their option was measured "
                       "over; their predictions are extrapolated.")
            with st.expander("Queries outside the measured range"):
                st.dataframe(outside, hide_index=True, width="stretch")
        if schedule.clamped.any():
            st.warning(f"{int(schedule.clamped.sum()):,} scheduled queries had a negative prediction (the paper's "
                       "published form) clamped to 0.")

        st.download_button("Download the schedule (CSV)", schedule_csv(schedule),
                           file_name=f"schedule_plan_{result.plan_id or 'unsaved'}.csv", mime="text/csv",
                           key="download_schedule", type="primary")

        # Timeline: one bar per block of consecutive queries of one model on a device.
        st.markdown("**Timeline per device**")
        blocks = schedule.assign(block=(schedule.model != schedule.model.shift())
                                 | (schedule.device != schedule.device.shift()))
        blocks["block"] = blocks["block"].cumsum()
        spans = blocks.groupby("block").agg(device=("device", "first"), model=("model", "first"),
                                            start=("device_start_s", "min"), queries=("id", "size"),
                                            end=("predicted_runtime_s", "sum"))
        spans["end"] = spans["start"] + spans["end"]
        timeline = go.Figure()
        for model, part in spans.groupby("model"):
            timeline.add_trace(go.Bar(y=part.device, x=part.end - part.start, base=part.start, orientation="h",
                                      name=model, customdata=part.queries,
                                      hovertemplate="%{y}: " + model + ", %{customdata} queries<br>"
                                                    "%{base:.1f} s to %{x:.1f} s later<extra></extra>"))
        makespan = max(result.per_device_runtime_s.values()) or 1.0
        far = []
        for device in result.per_device_runtime_s:
            limit = result.settings.device_deadline(device)
            if limit and limit <= 3 * makespan:
                timeline.add_vline(x=limit, line_dash="dash", annotation_text=f"deadline {device}")
            elif limit:
                far.append(f"{device} {format_duration(limit)}")
        title = "When each device runs which model"
        if far:
            title += f" (deadlines far to the right: {', '.join(far)})"
        timeline.update_layout(barmode="overlay", title=title,
                               xaxis_title="time from start (s)", yaxis_title="device", height=260 + 40 * len(devices),
                               margin=dict(t=50, b=40))
        st.plotly_chart(timeline, width="stretch", key="plan_timeline")

    if result.baselines:
        st.markdown("**Compared with the obvious alternatives** (same predictions)")
        rows = []
        for name, b in result.baselines.items():
            saving = (1 - result.energy_j / b.energy_j) if (result.has_schedule and b.energy_j) else math.nan
            rows.append({"schedule": name, "energy": format_energy(b.energy_j),
                         "plan saves": format_percent(saving, unknown=""),
                         "accuracy": f"{b.accuracy:.4f}", "makespan": format_duration(b.makespan_s),
                         "meets the targets": "yes" if b.feasible else "no", "energy_j": b.energy_j})
        table = pd.DataFrame(rows).sort_values("energy_j").drop(columns="energy_j")
        st.dataframe(table, hide_index=True, width="stretch")
        if estimated:
            st.caption("Energies include estimated figures (labelled above).")

    if result.has_schedule and result.predictions is not None:
        st.markdown("**Trade-offs**")
        if st.button("Draw energy against the accuracy target and the deadline", key="plan_draw_curves"):
            with st.spinner("Solving the plan at 9 accuracy targets and 9 deadlines…"):
                st.session_state["plan_curves"] = (
                    pareto_curve(result.predictions, result.settings, result.allowed, vary="accuracy"),
                    pareto_curve(result.predictions, result.settings, result.allowed, vary="deadline"))
        curves = st.session_state.get("plan_curves")
        if curves is not None:
            by_accuracy, by_deadline = curves
            left, right = st.columns(2)
            figure = go.Figure()
            ok = by_accuracy[by_accuracy.energy_j.notna()]
            figure.add_trace(go.Scatter(x=ok.value, y=ok.energy_j / 1e3, mode="lines+markers", name="optimal plan"))
            if result.settings.accuracy_target is not None:
                figure.add_trace(go.Scatter(x=[result.settings.accuracy_target], y=[result.energy_j / 1e3],
                                            mode="markers", marker=dict(size=14, symbol="star"), name="this plan"))
            figure.update_layout(title="Energy against the accuracy target", xaxis_title="mean accuracy target",
                                 yaxis_title="energy (kJ)" + (", estimated" if estimated else ""))
            left.plotly_chart(figure, width="stretch", key="plan_pareto_accuracy")
            figure = go.Figure()
            ok = by_deadline[by_deadline.energy_j.notna()]
            figure.add_trace(go.Scatter(x=ok.value / 60, y=ok.energy_j / 1e3, mode="lines+markers",
                                        name="optimal plan"))
            if result.settings.deadline_s:
                figure.add_trace(go.Scatter(x=[result.settings.deadline_s / 60], y=[result.energy_j / 1e3],
                                            mode="markers", marker=dict(size=14, symbol="star"), name="this plan"))
            figure.update_layout(title="Energy against the deadline (every device)", xaxis_title="deadline (min)",
                                 yaxis_title="energy (kJ)" + (", estimated" if estimated else ""), xaxis_type="log")
            right.plotly_chart(figure, width="stretch", key="plan_pareto_deadline")
            missing = int(by_accuracy.energy_j.isna().sum() + by_deadline.energy_j.isna().sum())
            if missing:
                st.caption(f"{missing} points have no feasible schedule and are left out.")

# -- stored plans --------------------------------------------------------------------------------

with st.expander("Stored plans"):
    try:
        plans = list_plans(store)
    except PlannerError as exc:
        show_error(exc)
        plans = pd.DataFrame()
    if plans.empty:
        st.caption("No plans stored yet.")
    else:
        st.dataframe(plans, hide_index=True, width="stretch")
        plan_id = st.selectbox("Download the schedule of plan", plans.id.tolist(), key="stored_plan")
        try:
            row, stored_schedule = load_plan(store, int(plan_id))
            if stored_schedule.empty:
                st.caption(f"Plan #{plan_id} has no schedule ({row['status']}).")
            else:
                st.download_button(f"Download plan #{plan_id} (CSV)", schedule_csv(stored_schedule),
                                   file_name=f"schedule_plan_{plan_id}.csv", mime="text/csv", key="download_stored")
        except PlannerError as exc:
            show_error(exc)
