"""Plan: upload a workload, choose the options and targets, get the energy-optimal schedule and its context.

Planning and the trade-off curves run in the background (ui.background): the page stays
live, shows their progress, and draws the result when it arrives.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from engine.catalog import list_models
from engine.errors import InputError, PlannerError
from engine.execution import learned_output_lengths
from engine.fitting import load_reference_profiles
from engine.formatting import format_count
from engine.paths import PROJECT_ROOT
from engine.planning import (PlanSettings, list_plans, load_options, load_plan, pareto_curve, plan_workload,
                             read_workload, read_workload_upload, schedule_csv)
from engine.planning.output_lengths import fill_learned_output_lengths
from engine.planning.summary import option_table
from ui import background
from ui.common import flash, get_store, problems_table, show_error, show_flash
from ui.navigation import ensure_app_navigation
from ui.plan_view import (PlanRequest, accuracy_range_text, choose_options, show_assignment, show_baselines,
                          show_curves, show_extrapolation, show_headline, stored_plans_table, timeline_figure,
                          workload_key)

SAMPLE_WORKLOAD = PROJECT_ROOT / "data" / "workloads" / "sample_50.csv"
CURVE_POINTS = 9

ensure_app_navigation()
st.title("Plan")
st.caption("Upload a workload, choose the options and the accuracy and deadline you need, and get the schedule that "
           "meets them with the least energy, with a proof of how close to optimal it is.")
store = get_store()
show_flash()

# What the background work finished since the last run (each outcome is taken once).
planned = background.take_outcome("plan")
if planned is not None:
    if planned.error is not None:
        st.session_state["plan_error"] = planned.error
    else:
        st.session_state["plan_result"] = (planned.request, planned.value)
        st.session_state.pop("plan_curves", None)
drawn = background.take_outcome("plan_curves")
if drawn is not None:
    if drawn.error is not None:
        show_error(drawn.error)
    else:
        st.session_state["plan_curves"] = (drawn.request, drawn.value)


def plan_in_background(progress: background.TaskProgress, **arguments):
    progress.report(f"counting tokens, predicting and solving (the solver stops by "
                    f"{arguments['settings'].time_limit_s:g} s)")
    return plan_workload(store, **arguments)


def curves_in_background(progress: background.TaskProgress, result):
    progress.report(f"solving at {CURVE_POINTS} accuracy targets", done=0, total=2 * CURVE_POINTS)

    def counted(offset: int):
        def on_point(n: int) -> None:
            progress.check()  # a newer plan: stop between solves
            progress.report(done=offset + n)
        return on_point

    by_accuracy = pareto_curve(result.predictions, result.settings, result.allowed, vary="accuracy",
                               points=CURVE_POINTS, on_point=counted(0))
    progress.report(f"solving at {CURVE_POINTS} deadlines")
    by_deadline = pareto_curve(result.predictions, result.settings, result.allowed, vary="deadline",
                               points=CURVE_POINTS, on_point=counted(CURVE_POINTS))
    return by_accuracy, by_deadline


# -- options --------------------------------------------------------------------------------------

scope = st.radio("Energy to minimise", ["total", "dynamic"], horizontal=True, key="plan_scope",
                 help="Total: everything the sensor counted. Dynamic: total minus the device's idle power x runtime. "
                      "Needs fits of that scope (Models page).")
try:
    options, notes = load_options(store, scope)
    catalog = list_models(store)
    demo_models = set(catalog.name[catalog.is_demo.astype(bool)])
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
            flash(f"Loaded {format_count(len(names), 'reference profile')} (published coefficients, no measurements).")
            st.rerun()
        except PlannerError as exc:
            show_error(exc)
    for note in notes:
        st.caption(note)
    st.stop()

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
    fix = "Fix it" if len(exc.problems) == 1 else "Fix them"
    advice = (f"{fix}: these refuse the whole file, even with *Drop bad rows* ticked." if drop_bad else
              f"{fix}, or tick *Drop bad rows* to plan the rest.")
    st.error(f"The workload has {format_count(len(exc.problems), 'problem')}; nothing was planned. {advice}")
    st.dataframe(problems_table(exc.problems), hide_index=True, width="stretch")
except PlannerError as exc:
    show_error(exc)

if workload is not None:
    try:
        learned = learned_output_lengths(store)
    except PlannerError:
        learned = pd.DataFrame()
    filled, fill = fill_learned_output_lengths(workload, learned)
    if fill is not None and st.checkbox(
            f"Use output lengths learned from executions for the {format_count(fill.n_filled, 'query', 'queries')} "
            f"without one (median {fill.overall_median_tokens:.0f} tokens; per category where known)",
            value=True, key="plan_learned"):
        workload = filled
    queries = workload.queries
    with_prompt = int(queries.prompt.notna().sum())
    st.success(f"{format_count(workload.n_queries, 'query')} read from {workload.name}: {with_prompt:,} with a "
               f"prompt, {workload.n_queries - with_prompt:,} with token counts only.")
    for warning in workload.warnings:
        st.warning(warning)
    if workload.dropped:
        st.warning(f"{format_count(len(workload.dropped), 'bad row')} dropped; "
                   f"{'it' if len(workload.dropped) == 1 else 'they'} will not be planned:")
        st.dataframe(problems_table(workload.dropped, expected=False), hide_index=True, width="stretch")
    with st.expander("Preview the queries"):
        st.dataframe(queries.head(200), hide_index=True, width="stretch")

# -- options ----------------------------------------------------------------------------------------

st.subheader("2. Options")
st.caption("Each option is a model on a device with fitted energy and runtime surfaces, at the batch sizes it was "
           "profiled at. Tick the ones the plan may use; the plan chooses the batch size.")
chosen = choose_options(option_table(options, demo_models))
for note in notes:
    st.caption(note)
chosen_options = [o for o in options if o.pair in set(chosen)]  # each model@device at every batch size offered

# -- targets ------------------------------------------------------------------------------------

st.subheader("3. Targets")
accuracies = [o.accuracy for o in {o.pair: o for o in chosen_options}.values()]  # once per model@device
suggested = round(float(np.mean(accuracies)), 2) if accuracies else 0.5
# The target starts at the chosen options' mean score and never changes unannounced. Its widget's key
# carries the suggestion, so a new set of options starts a fresh widget (a form widget's value set
# through session state is not reliably what the browser then submits); a target the user typed is
# carried over.
previous = st.session_state.get("plan_target_suggested")
initial = suggested
if previous is not None and previous != suggested:
    before = st.session_state.get(f"plan_target_{previous:.2f}", previous)
    typed = not np.isclose(before, previous)
    initial = before if typed else suggested
    if not typed:
        st.info(f"Accuracy target set to {suggested:.3f}, the mean score of the chosen options (it was {before:.3f}).")
st.session_state["plan_target_suggested"] = suggested
devices = list(dict.fromkeys(o.device for o in chosen_options or options))
error = st.session_state.pop("plan_error", None)

with st.form("plan_settings", enter_to_submit=False):  # Enter in a field does not plan; only the button does
    left, middle, right = st.columns(3)
    with left:
        use_target = st.checkbox("Require a mean accuracy", value=True, key="plan_use_target")
        target = st.number_input("Accuracy target (fraction)", min_value=0.0, max_value=1.0, value=float(initial),
                                 step=0.01, format="%.3f", key=f"plan_target_{suggested:.2f}",
                                 help=accuracy_range_text(accuracies))
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
    with st.expander("Advanced: model load costs, minimum shares, solver"):
        st.caption("Load costs are counted once for each model used on a device (time on its deadline, energy in "
                   "the total). Leave 0 to ignore.")
        loads = st.data_editor(pd.DataFrame({"option": chosen, "load_s": 0.0, "load_energy_j": 0.0}),
                               hide_index=True, disabled=["option"], key="plan_loads", width="stretch")
        shares = st.data_editor(pd.DataFrame({"model": sorted({o.model for o in chosen_options}), "min_share": 0.0}),
                                hide_index=True, disabled=["model"], key="plan_shares", width="stretch")
        time_limit = st.number_input("Solver time limit (s)", min_value=1.0, max_value=600.0, value=30.0,
                                     key="plan_time_limit")
    submitted = st.form_submit_button("Plan", type="primary", disabled=workload is None)
if workload is None:
    st.caption("Choose a workload above to plan.")
if error is not None:
    show_error(error)

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
        if not chosen:
            raise PlannerError("No option is ticked: tick at least one in the table of options.")
        settings.validate()
    except PlannerError as exc:
        show_error(exc)
    else:
        request = PlanRequest(workload_key(workload), workload.name, workload.n_queries, tuple(chosen), settings)
        background.start("plan", f"Planning {format_count(workload.n_queries, 'query')}", partial(
            plan_in_background, workload=workload, settings=settings, default_output_tokens=int(default_output),
            only=chosen, load_costs=load_costs or None), request=request)
background.show_progress("plan", stop_label="Stop planning")

# -- the result ---------------------------------------------------------------------------------

kept = st.session_state.get("plan_result")
current_key = workload_key(workload) if workload is not None else None
if kept is not None and kept[0].workload_key != current_key:
    request, result = kept
    st.info(f"The workload changed after plan #{result.plan_id} ({format_count(request.n_queries, 'query')} of "
            f"{request.workload_name}), so it is not shown. Press **Plan** to plan this workload; stored plans are "
            "listed below.")
elif kept is not None:
    request, result = kept
    st.subheader("4. The schedule" + (f" (plan #{result.plan_id})" if result.plan_id else ""))
    if request.options != tuple(chosen) or request.settings.energy_scope != scope:
        st.warning("The options or the energy scope changed after this plan was made; press **Plan** to update it.")
    for warning in result.warnings:
        st.warning(warning)
    if not result.has_schedule:
        st.error("No schedule meets these targets.\n\n" + "\n".join(f"- {line}" for line in result.diagnosis))
        if result.best_achievable:
            st.dataframe(pd.DataFrame([{"what": k, "best achievable": v} for k, v in result.best_achievable.items()]),
                         hide_index=True)
    else:
        if result.energy_estimated:
            st.info("Some options' energy is **estimated** (no sensor on the device that was profiled); every energy "
                    "figure below that includes them is an estimate.")
        show_headline(result)
        show_assignment(result)
        if result.constraint_costs:
            st.markdown("**What each constraint costs**")
            for cost in result.constraint_costs:
                st.markdown(f"- {cost.text}")
        show_extrapolation(result)
        st.download_button("Download the schedule (CSV)", schedule_csv(result.schedule),
                           file_name=f"schedule_plan_{result.plan_id or 'unsaved'}.csv", mime="text/csv",
                           key="download_schedule", type="primary")
        st.markdown("**Timeline per device**")
        st.plotly_chart(timeline_figure(result), width="stretch", key="plan_timeline")
    if result.baselines:
        show_baselines(result)

    if result.has_schedule and result.predictions is not None:
        st.markdown("**Trade-offs**")
        curves_key = (result.plan_id, id(result))
        if st.button("Draw energy against the accuracy target and the deadline", key="plan_draw_curves"):
            background.start("plan_curves", "Drawing the trade-offs", partial(curves_in_background, result=result),
                             request=curves_key)
        background.show_progress("plan_curves", stop_label="Stop drawing")
        curves = st.session_state.get("plan_curves")
        if curves is not None and curves[0] == curves_key:
            show_curves(result, curves[1])

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
        st.dataframe(stored_plans_table(plans), hide_index=True, width="stretch")
        plan_id = st.selectbox("Download the schedule of plan", plans.id.tolist(), key="stored_plan",
                               format_func=lambda i: f"#{i}")
        try:
            row, stored_schedule = load_plan(store, int(plan_id))
            if stored_schedule.empty:
                st.caption(f"Plan #{plan_id} has no schedule ({row['status']}).")
            else:
                st.download_button(f"Download plan #{plan_id} (CSV)", schedule_csv(stored_schedule),
                                   file_name=f"schedule_plan_{plan_id}.csv", mime="text/csv", key="download_stored")
        except PlannerError as exc:
            show_error(exc)
