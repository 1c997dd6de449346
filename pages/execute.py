"""Execute: run a stored plan on this host with one click, and see what it really cost."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import execution
from engine.csvio import csv_text
from engine.errors import PlannerError
from engine.formatting import format_count, format_duration, format_energy, format_percent, format_timestamp
from engine.planning import list_plans
from engine.cluster.inventory import ClusterInventory
from engine.cluster.runstate import apply_moves, move_candidates, part_states, parts_table, planned_devices
from ui.cluster import cluster_in_use, live_devices, node_list, show_reading
from ui.common import flash, get_store, show_error, show_flash
from ui.execution_view import lengths_table, show_band_check, show_batches
from ui.navigation import ensure_app_navigation

ensure_app_navigation()
st.title("Execute")
st.caption("Run a plan on this host (and on the nodes of a cluster, for devices named NODE/DEVICE): every query on "
           "its model and device, devices in parallel, each model loaded "
           "once. Every result is stored as it is measured; closing the browser does not stop the run.")
store = get_store()
show_flash()
cluster, _ = cluster_in_use(store)  # runs on a node's device (NODE/DEVICE) go through the cluster

try:
    execution.reconcile_executions(store)
    plans = list_plans(store)
    runs = execution.list_executions(store)
except PlannerError as exc:
    show_error(exc)
    st.stop()

runnable = plans[plans.status.isin(["optimal", "feasible", "imported"])] if len(plans) else plans

# -- start ------------------------------------------------------------------------------------

st.subheader("Run a plan")
if runnable.empty:
    st.info("No plan to run yet. Make one on the Plan page.")
    st.page_link("pages/plan.py", label="Plan a workload", icon=":material/route:")
else:
    def plan_label(row) -> str:
        workload = row.workload if isinstance(row.workload, str) else "schedule file"
        queries = format_count(row.n_queries, "query") if not pd.isna(row.n_queries) else "queries"
        energy = format_energy(float(row.energy_j)) + " predicted" if not pd.isna(row.energy_j) else "no prediction"
        return f"Plan #{row.id}: {workload}, {queries}, {energy} ({row.status})"

    # A plan of models without local files, or of devices this host lacks, is listed but not the default.
    blocked = {int(row.id): execution.why_plan_cannot_run_here(store, int(row.id)) for row in runnable.itertuples()}
    labels = {plan_id: plan_label(row) + ("" if not blocked[plan_id] else " — cannot run here")
              for plan_id, row in zip(blocked, runnable.itertuples())}
    ids = list(labels)
    if "execute_plan" not in st.session_state or st.session_state["execute_plan"] not in ids:
        st.session_state["execute_plan"] = next((i for i in ids if not blocked[i]), ids[0])
    chosen = st.selectbox("Plan", ids, format_func=labels.get, key="execute_plan")
    if blocked[chosen]:
        st.warning(f"Plan #{chosen} cannot run on this host:\n\n" + "\n".join(f"- {p}" for p in blocked[chosen]))
    if st.button("Execute this plan", type="primary", key="execute_start", disabled=bool(blocked[chosen])):
        try:
            run = execution.create_execution(store, int(chosen))
            execution.start_worker(store, run.id)
            st.session_state["execution_id"] = run.id
            st.session_state["execution_pick"] = run.id  # the selectbox keeps its own value otherwise
            flash(f"Execution #{run.id} started: {format_count(run.queries_total, 'query')}.")
            st.rerun()
        except PlannerError as exc:
            show_error(exc)

runs = execution.list_executions(store)
if runs.empty:
    st.stop()

st.subheader("Executions")
ids = runs.id.astype(int).tolist()
current = st.session_state.get("execution_id", ids[0])
execution_id = st.selectbox("Execution", ids, index=ids.index(current) if current in ids else 0,
                            format_func=lambda i: f"#{i}: plan {int(runs.set_index('id').loc[i, 'plan_id'])}, "
                                                  f"started {format_timestamp(runs.set_index('id').loc[i, 'created_at'])}",
                            key="execution_pick")
st.session_state["execution_id"] = execution_id


def energy_label(joules: float | None, estimated: bool) -> str:
    if joules is None:
        return "not measured"
    return format_energy(joules) + (" (estimated)" if estimated else "")


def cluster_parts(progress) -> None:
    """A cluster execution's progress by node and device, and each failed part with its reason."""
    table = parts_table(progress.devices, part_states(store, progress.execution.id))
    moved = table.runs_on != table.device
    shown = table.assign(queries=[f"{d} of {t}" for d, t in zip(table.done, table.total)],
                         runs_on=table.runs_on.where(moved, ""), reason=table.reason.fillna(""),
                         node=table.node.replace("", "this host"))
    st.dataframe(shown[["node", "device", "queries", "status", "runs_on", "reason"]].rename(
        columns={"node": "Node", "device": "Device", "queries": "Queries", "status": "Part", "runs_on": "Runs on",
                 "reason": "Reason"}), hide_index=True, width="stretch")
    for row in table[table.status == "failed"].itertuples():
        st.error(f"{row.device}: failed after {row.done} of {format_count(row.total, 'query')}: {row.reason}")


def resume_choices(execution_id: int, found) -> dict[str, str]:
    """For each stopped cluster part: where its queries run when resumed (its node, or a live device of the
    same type on another node, from the node list)."""
    parts = part_states(store, execution_id)
    stopped = {device: part for device, part in parts.items() if part.status in ("failed", "cancelled")}
    if not stopped:
        return {}
    if isinstance(found, BaseException):
        st.caption(f"Resuming on another node needs the cluster's node list: {found}")
    live = live_devices(found)
    planned = planned_devices(store, execution_id)
    same_type = found.same_type if isinstance(found, ClusterInventory) else None
    choices = {}
    for device, part in sorted(stopped.items()):
        options = list(dict.fromkeys([part.runs_on, device, *(move_candidates(device, planned, live, same_type)
                                                               if same_type else [])]))
        choices[device] = st.selectbox(
            f"Resume {device}'s queries on", options, key=f"resume_on_{execution_id}_{device}",
            format_func=lambda d, device=device: f"{d} (its own node)" if d == device else f"{d} (same type)",
            help="Its own node once it is back, or a live device of the same type on another node.")
    return choices


@st.fragment(run_every=1.0)
def live_progress(execution_id: int, found=None) -> None:
    """Progress while it runs; refreshes itself every second, and the whole page once at the end."""
    try:
        execution.reconcile_executions(store)
        progress = execution.execution_progress(store, execution_id)
    except PlannerError as exc:  # the database busy for a moment: say so, try again next second
        show_error(exc)
        return
    run = progress.execution
    status = run.status
    if status in execution.ACTIVE:
        st.session_state["execution_was_active"] = execution_id
    elif st.session_state.get("execution_was_active") == execution_id:
        st.session_state.pop("execution_was_active")
        st.rerun()  # the run just ended: redraw the results below
    share = progress.done / progress.total if progress.total else 0.0
    devices = progress.devices
    # One device: its name in the one bar. Several: a bar each, below the total (same counts, one read).
    where = f" on {devices.device.iloc[0]}" if len(devices) == 1 else ""
    st.progress(share, text=f"{status}: {progress.done} of {format_count(progress.total, 'query')}{where}")
    columns = st.columns(4)
    columns[0].metric("Energy so far" + (" (estimated)" if progress.energy_estimated else ""),
                      energy_label(progress.measured_energy_j, False))
    columns[1].metric("Predicted for these queries", format_energy(progress.predicted_done_j)
                      if progress.predicted_done_j is not None else "—")
    columns[2].metric("Elapsed", format_duration(progress.elapsed_s),
                      help="Running time of the execution across its runs (pauses between runs do not count).")
    columns[3].metric("Remaining (estimate)", format_duration(progress.remaining_s)
                      if status in execution.ACTIVE else "—")
    on_cluster = bool(part_states(store, execution_id))
    if on_cluster:
        cluster_parts(progress)
    for row in devices.itertuples() if len(devices) > 1 and not on_cluster else ():
        estimated = False if pd.isna(row.estimated) else bool(row.estimated)  # NULL until a query is done
        st.progress(row.done / row.total if row.total else 0.0,
                    text=f"{row.device}: {row.done} of {format_count(row.total, 'query')}; "
                         f"{energy_label(None if pd.isna(row.measured_energy_j) else row.measured_energy_j, estimated)}"
                         f" measured vs {format_energy(row.predicted_done_j) if not pd.isna(row.predicted_done_j) else '—'} "
                         "predicted so far")
    if run.reason:
        (st.error if status == "failed" else st.info)(run.reason)
    moves = resume_choices(execution_id, found) if on_cluster and status in ("failed", "cancelled") else {}
    left, right = st.columns(2)
    if status in execution.ACTIVE and left.button("Cancel", key=f"cancel_{execution_id}"):
        try:
            execution.cancel_execution(store, execution_id)
            st.rerun(scope="app")
        except PlannerError as exc:
            show_error(exc)
    if status in ("failed", "cancelled") and progress.done < progress.total and \
            right.button(f"Resume ({format_count(progress.total - progress.done, 'query', 'queries')} left)",
                         key=f"resume_{execution_id}"):
        try:
            if moves:
                apply_moves(store, execution_id, moves,
                            same_type=found.same_type if isinstance(found, ClusterInventory) else None)
            execution.resume_execution(store, execution_id)
            execution.start_worker(store, execution_id)
            st.rerun(scope="app")
        except PlannerError as exc:
            show_error(exc)


# A stopped cluster execution may resume on another node: the node list is read (off the script thread) for it.
stopped_on_cluster = cluster and any(p.status in ("failed", "cancelled")
                                     for p in part_states(store, execution_id).values())
live_progress(execution_id, node_list(cluster) if stopped_on_cluster else None)
if stopped_on_cluster:
    show_reading()

# -- predicted against measured -----------------------------------------------------------------

try:
    results = execution.execution_results(store, execution_id)
    scope = execution.execution_energy_scope(store, execution_id)
except PlannerError as exc:
    show_error(exc)
    st.stop()
if results.empty:
    st.caption("Results appear here as queries finish.")
    st.stop()
comparison = execution.compare(results, scope)
estimated = comparison.energy_estimated
try:
    band = execution.execution_energy_band(store, execution_id)
    batches = execution.execution_batches(store, execution_id)
except PlannerError as exc:
    show_error(exc)
    st.stop()
st.subheader("Predicted against measured" + (" (dynamic energy)" if scope == "dynamic" else ""))
if estimated:
    st.info("There is no energy sensor for this device here, so the measured energy is **estimated** "
            "(CPU time x a power model); the predictions come from fits of estimated energy too.")
top = st.columns(4)
top[0].metric("Energy" + (" (estimated)" if estimated else ""), energy_label(comparison.measured_energy_j, False),
              delta=f"{format_percent(comparison.energy_error, signed=True)} vs predicted"
              if comparison.energy_error is not None else None,
              delta_color="off")
top[1].metric("Predicted energy", format_energy(comparison.predicted_energy_j)
              if comparison.predicted_energy_j is not None else "—")
top[2].metric("Runtime (sum over queries)", format_duration(comparison.measured_runtime_s),
              delta=f"{format_percent(comparison.runtime_error, signed=True)} vs predicted"
              if comparison.runtime_error is not None else None,
              delta_color="off")
top[3].metric("Queries outside their 90% interval", f"{comparison.outside_band} of {comparison.with_band}",
              help="Queries whose measured energy lies outside their fit's 90% prediction interval for one request "
                   "(the plan's energy band, below, is for the total). A query run in a batch of several has no "
                   "interval of its own: its batch is judged against the batch's band, in the per-batch table.")
if comparison.n_failed:
    st.warning(f"{format_count(comparison.n_failed, 'query')} failed and "
               f"{'is' if comparison.n_failed == 1 else 'are'} left out of the comparison (see the table).")
show_band_check(execution.check_band(comparison, band))
if comparison.per_query_energy_error_median is not None:
    st.caption(f"Per query, energy error: median {format_percent(comparison.per_query_energy_error_median, signed=True)}, "
               f"mean absolute {format_percent(comparison.per_query_energy_error_mean_abs)}.")

per_option = comparison.per_option.assign(
    measured=lambda f: f.measured_energy_j.map(format_energy), predicted=lambda f: f.predicted_energy_j.map(format_energy),
    error=lambda f: f.energy_error.map(lambda e: format_percent(e, signed=True, unknown="")))
st.dataframe(per_option[["option", "queries", "measured", "predicted", "error"]].rename(
    columns={"measured": "measured (estimated)"} if estimated else {}), hide_index=True, width="stretch")
if (comparison.per_batch["queries"] > 1).any() or (comparison.per_batch["batch_size"] > 1).any():
    show_batches(comparison, band, batches.loc[batches.members > 1, "share_rule"], estimated)

per_query = comparison.per_query
left, right = st.columns(2)
scatter = go.Figure()
for option, part in per_query.assign(option=per_query.model + "@" + per_query.device).groupby("option"):
    scatter.add_trace(go.Scatter(x=part.predicted_energy_j, y=part.energy_j, mode="markers", name=option,
                                 text=part.id, hovertemplate="%{text}: predicted %{x:.2f} J, measured %{y:.2f} J"))
top_value = float(pd.concat([per_query.predicted_energy_j, per_query.energy_j]).max() or 1)
scatter.add_trace(go.Scatter(x=[0, top_value], y=[0, top_value], mode="lines", name="measured = predicted",
                             line=dict(dash="dash")))
scatter.update_layout(title="Energy per query", xaxis_title="predicted energy (J)",
                      yaxis_title="measured energy (J)" + (", estimated" if estimated else ""))
left.plotly_chart(scatter, width="stretch", key="execute_scatter")
errors = per_query.energy_error.dropna() * 100
histogram = go.Figure(go.Histogram(x=errors, nbinsx=30))
histogram.update_layout(title="Energy error per query", xaxis_title="(measured − predicted) / predicted (%)",
                        yaxis_title="queries")
right.plotly_chart(histogram, width="stretch", key="execute_histogram")

with st.expander("Every query"):
    st.dataframe(results, hide_index=True, width="stretch")
st.download_button("Download the results (CSV)", csv_text(results), file_name=f"execution_{execution_id}.csv",
                   mime="text/csv", key="execute_download")

lengths = execution.learned_output_lengths(store)
if len(lengths):
    st.subheader("Output lengths learned from executed prompts")
    st.caption("What the models really produced for prompts (capped at the planned length). Use them as the output "
               "length of queries without one on the Plan page.")
    st.dataframe(lengths_table(lengths), hide_index=True, width="stretch")
st.caption("Executed queries are stored as measurements; refit with them on the Models page "
           "(*Include the queries measured while executing plans*).")
