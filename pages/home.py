"""Home: the real state of this installation, each part linked to its page."""

import os
import time

import pandas as pd
import streamlit as st

from engine import firstrun, runs
from engine.energy import discover_sensors
from engine.errors import PlannerError
from engine.fitting import load_reference_profiles
from engine.formatting import (format_accuracy, format_count, format_duration, format_parameters, format_percent,
                               format_timestamp)
from engine.overview import latest_work, read_overview
from engine.profiling import jobs
from engine.cluster.inventory import inventory_tables
from engine.runs.cluster import ADDRESS_ENV, save_address, saved_address
from ui.cluster import cluster_in_use, node_list, show_reading
from ui.common import get_store, show_error
from ui.navigation import ensure_app_navigation

ensure_app_navigation()
st.title("Joule Planner")
st.caption("Profile local LLMs, fit their energy and runtime, and plan batch work for the least energy.")

SAMPLE_LABEL = "Sample workload (sample_50.csv)"  # the Plan page's radio option for data/workloads/sample_50.csv
LATEST_WORK_PAGES = {"Profiling job": ("pages/profile.py", "Open the Profile page"),
                     "Fit": ("pages/models.py", "See the surfaces on the Models page"),
                     "Plan": ("pages/plan.py", "Plan a workload"),
                     "Execution": ("pages/execute.py", "Execute a plan")}


@st.cache_data(ttl=30, show_spinner="Looking for energy sensors…")
def sensors_table() -> pd.DataFrame:
    return pd.DataFrame([s.to_dict() for s in discover_sensors()])


store = get_store()
try:
    runs.reconcile(store)  # a run whose worker was killed reads as failed, not running
    view = read_overview(store)
    first = firstrun.read_state(store)
    batching = firstrun.read_state(store, firstrun.BATCHING_KEY)
except PlannerError as exc:
    show_error(exc)
    st.stop()


def open_plan_with_sample() -> None:
    st.session_state["plan_source"] = SAMPLE_LABEL
    st.switch_page("pages/plan.py")


def explore_published_profiles() -> None:
    try:
        load_reference_profiles(store)
        open_plan_with_sample()
    except PlannerError as exc:
        show_error(exc)


@st.fragment(run_every=2.0)
def first_run_progress() -> None:
    """Follows the first run and its batching step; opens the Plan page when one is done (for the
    session that started it)."""
    for key, name, started_flag in ((firstrun.STATE_KEY, "First run", "first_run_started"),
                                    (firstrun.BATCHING_KEY, "Measuring batching", "batching_started")):
        try:
            state = firstrun.read_state(store, key)
        except PlannerError as exc:  # the database busy for a moment
            show_error(exc)
            return
        if state is None:
            continue
        if state.status == "running":
            for model, job_id in state.jobs.items():
                try:
                    progress = jobs.job_progress(store, job_id)
                    total = progress.job.points_total or 1
                    st.progress(min(progress.job.points_done / total, 1.0),
                                text=f"{model}: {progress.job.points_done} of {format_count(total, 'point')}, "
                                     f"{format_count(progress.trials, 'trial')}")
                except PlannerError:
                    pass
            st.info(f"{name}: {state.step}… ({format_duration(time.time() - state.started)} so far). "
                    "You can leave this page; it goes on.")
        elif state.status == "failed":
            st.error(f"{name} stopped: {state.reason}")
        elif state.status == "done" and st.session_state.pop(started_flag, False):
            open_plan_with_sample()


# -- start here: before the first run it starts one; after it, the next steps ---------------------

running = any(s is not None and s.status == "running" for s in (first, batching))
first_done = first is not None and first.status == "done"
batching_done = batching is not None and batching.status == "done"
with st.container(border=True):
    st.subheader("Start here")
    first_time = not view.has_measured_fits or (first is not None and first.status == "running")
    if first_time:
        budget_min = firstrun.FIRST_RUN_BUDGET_S / 60
        st.markdown("One click profiles the two demo models on this CPU with an adaptive design that stops when "
                    f"its fits stop improving (at most {budget_min:.0f} minutes), fits their energy and runtime, "
                    "and opens the Plan page with the sample workload loaded.")
    else:
        st.markdown("Models here are profiled and fitted. Plan the sample workload with them, profile more on the "
                    "Profile page, or compare with the published A100 profiles.")
    try:  # the database busy for a moment: no offer this time, the next redraw makes it
        offer_batching = (first_done and not batching_done and not first_time
                          and not firstrun.demo_fits_batched(store))
        estimate = firstrun.batching_estimate_s(store) if offer_batching else None
    except PlannerError as exc:
        show_error(exc)
        offer_batching = False
    if offer_batching:
        sizes = ", ".join(map(str, firstrun.BATCHING_SIZES))
        st.markdown(f"The first run measured one request at a time, so its plans run one request at a time. "
                    f"**Measure batching** profiles both demo models at batch sizes {sizes} (requests run together "
                    "share each step's reading of the weights, the largest energy lever), fits them again, and "
                    "opens the Plan page, where plans can then batch"
                    + (f" (at most about {format_duration(estimate)}, from their runtimes so far)." if estimate
                       else "."))
    columns = st.columns(3 if offer_batching else 2)
    left, right = columns[0], columns[-1]
    if first_time:
        if left.button("Profile the demo models and plan", type="primary", disabled=running, key="first_run"):
            try:
                firstrun.start_first_run(store)
                st.session_state["first_run_started"] = True
                st.rerun()
            except PlannerError as exc:
                show_error(exc)
    elif left.button("Plan the sample workload", type="primary", key="plan_sample"):
        open_plan_with_sample()
    if offer_batching and columns[1].button("Measure batching, then plan", disabled=running, key="batching"):
        try:
            firstrun.start_first_run(store, batching=True)
            st.session_state["batching_started"] = True
            st.rerun()
        except PlannerError as exc:
            show_error(exc)
    if right.button("Explore the paper's published A100 profiles", key="home_reference",
                    help="Seven LLMs on an A100 server, from Wilkins et al. (published coefficients, no "
                         "measurements): data-centre-scale what-ifs without a GPU."):
        explore_published_profiles()
    first_run_progress()



def first_run_reached() -> None:
    """What the last first run (and its batching step) reached, per demo model: its time, trials, and
    the fits' cross-validated error beside the floor trial-to-trial noise sets, and their batch axis;
    and a word when a busy machine spoiled it."""
    try:
        reports = [(firstrun.first_run_report(store), first, "What the first run reached"),
                   (firstrun.batching_report(store), batching, "What measuring batching reached")]
    except PlannerError as exc:
        show_error(exc)
        return
    for report, state, title in reports:
        if report.empty or state is None or state.status != "done":
            continue
        with st.expander(title, expanded=not view.has_measured_fits):
            st.table(pd.DataFrame({
                "Model": report.model,
                "Time": report.elapsed_s.map(format_duration),
                "Trials": [f"{int(t)} over {format_count(int(p), 'point')}" for t, p in zip(report.trials,
                                                                                           report.points)],
                "Energy error (CV)": [_error_with_floor(e, n) for e, n in zip(report.energy_cv_mape,
                                                                              report.energy_noise_mape)],
                "Runtime error (CV)": [_error_with_floor(e, n) for e, n in zip(report.runtime_cv_mape,
                                                                                report.runtime_noise_mape)],
                "Batch sizes fitted": [("—" if pd.isna(cv) else "1 only") if b is None else f"{b[0]} to {b[1]}"
                                       for b, cv in zip(report.batch_sizes, report.energy_cv_mape)],
                "Points not converged": report.unconverged_points.map(lambda n: "—" if pd.isna(n) else f"{int(n)}"),
                "Why it stopped": report.job_reason.fillna(""),
            }), hide_index=True)
            st.caption("Error (CV): the fit's mean relative error on design points it did not see; the floor is "
                       "what trial-to-trial noise alone gives. Energy here is **estimated** unless a sensor is "
                       "listed below.")
            loads = [x for x in (state.load_at_start, state.load_at_end) if x is not None]
            cores = os.cpu_count() or 1
            if loads and max(loads) > 0.75 * cores:
                st.warning(f"The machine was busy during this run (load {max(loads):.1f} on {cores} cores): its "
                           "figures are noisier than a quiet run's. Profile again on the Profile page when it is "
                           "quiet.")


def _error_with_floor(error, floor) -> str:
    if error is None or pd.isna(error):
        return "not fitted"
    text = format_percent(error)
    return text if floor is None or pd.isna(floor) else f"{text} (noise floor {format_percent(floor)})"


first_run_reached()

# -- sensors -------------------------------------------------------------------------------------

st.subheader("Energy sensors on this host")
sensors = sensors_table()
measured = sensors[sensors.status == "measured"]
estimated = sensors[sensors.status == "estimated"]
if len(measured):
    st.success(f"{format_count(len(measured), 'energy sensor')} measure{'s' if len(measured) == 1 else ''} here: "
               + ", ".join(sorted(set(measured.source))))
if len(estimated):
    st.warning("No CPU energy sensor here: CPU energy will be **estimated** and labelled so everywhere it appears.")
st.table(
    sensors.fillna("").rename(columns={"source": "Source", "device": "Device", "status": "Status", "detail": "Detail",
                                       "fix": "How to fix"}),
    hide_index=True,
)

# -- the cluster ---------------------------------------------------------------------------------

st.subheader("Cluster")
address, source = cluster_in_use(store)
from_env = source == ADDRESS_ENV


def save_cluster_address(forget: bool = False) -> None:
    """Form callbacks (they run before the page, so the field can be emptied): save or forget the address."""
    try:
        saved = save_address(store, None if forget else st.session_state.get("cluster_address"))
        st.session_state["cluster_address"] = saved or ""
    except PlannerError as exc:
        st.session_state["cluster_address_error"] = exc


if "cluster_address" not in st.session_state:
    st.session_state["cluster_address"] = saved_address(store) or ""
with st.form("cluster_setting", border=False):
    st.text_input("Cluster address (the Ray head's HOST:PORT)", key="cluster_address", disabled=from_env,
                  placeholder="e.g. 10.0.0.5:6379; empty: everything runs on this host",
                  help="Profile and execute on the devices of other hosts through a Ray cluster (README: Running "
                       "on a cluster). This host must be a node of it, with the cluster's token.")
    save_column, forget_column = st.columns(2)
    save_column.form_submit_button("Save", disabled=from_env, on_click=save_cluster_address)
    forget_column.form_submit_button("Forget the address", disabled=from_env, on_click=save_cluster_address,
                                     kwargs={"forget": True})
if "cluster_address_error" in st.session_state:
    show_error(st.session_state.pop("cluster_address_error"))
if from_env:
    st.caption(f"`{ADDRESS_ENV}={address}` is set in the app's environment; it wins over the saved address.")
if address is None:
    st.caption("No cluster: everything runs on this host, and devices keep their short names (`cpu`, `cuda:0`).")
else:
    refresh = st.button("Read the node list again", key="cluster_refresh")
    found = node_list(address, refresh=refresh)
    if isinstance(found, BaseException):
        show_error(found)
    elif found is not None:
        alive = sum(n.alive for n in found.nodes)
        st.markdown(f"**{alive} of {format_count(len(found.nodes), 'node')} alive** in the cluster at `{found.head}`. "
                    "Their devices are named `NODE/DEVICE` on the Profile, Plan and Execute pages.")
        nodes, devices, node_sensors = inventory_tables(found)
        st.table(nodes.rename(columns=str.capitalize), hide_index=True)
        devices = devices.assign(memory_gib=devices.memory_gib.map(lambda gib: "" if pd.isna(gib) else f"{gib:g}"))
        st.table(devices.rename(columns={"device": "Device", "node": "Node", "status": "Node status",
                                         "model": "Model", "memory_gib": "Memory (GiB)"}), hide_index=True)
        if len(node_sensors):
            with st.expander("Energy sensors of the nodes"):
                st.table(node_sensors.rename(columns=str.capitalize), hide_index=True)
    show_reading()

# -- what is stored ------------------------------------------------------------------------------

left, right = st.columns(2)
with left:
    st.subheader("Models in the catalog")
    if view.models.empty:
        st.info("The catalog is empty. Add a model on the Models page, or run `make run` to generate the demo models.")
    else:
        table = view.models.assign(
            accuracy=view.models.accuracy.map(format_accuracy),
            params=view.models.params_b.map(format_parameters),
            kind=view.models.is_demo.map(lambda d: "demo (random weights)" if d else "user"),
        )[["name", "backend", "params", "accuracy", "kind"]]
        st.table(table, hide_index=True)
    st.page_link("pages/models.py", label="Manage models", icon=":material/model_training:")
with right:
    st.subheader("Measurements")
    if view.n_measurements == 0:
        st.info("No measurements stored yet.")
    else:
        st.metric("Trials stored", f"{view.n_measurements:,}")
        if view.n_measurements_estimated:
            st.caption(f"{view.n_measurements_estimated:,} of them with **estimated** energy (no sensor).")
        pairs = view.measured_pairs.assign(first=view.measured_pairs["first"].map(format_timestamp),
                                           last=view.measured_pairs["last"].map(format_timestamp))
        st.dataframe(pairs, hide_index=True, width="stretch")
    st.subheader("Latest work")
    for line in latest_work(view):
        st.markdown(f"**{line.kind}:** {line.text}")
        page, label = LATEST_WORK_PAGES[line.kind]
        st.page_link(page, label=label)

st.caption(f"Database: `{view.db_path}` (schema version {view.schema_version})")
