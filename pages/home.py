"""Home: the real state of this installation, each part linked to its page."""

import pandas as pd
import streamlit as st

from engine.energy import discover_sensors
from engine.errors import PlannerError
from engine.overview import read_overview
from pages.common import ensure_app_navigation, format_accuracy, format_params, get_store, show_error

ensure_app_navigation()
st.title("Joule Planner")
st.caption("Profile local LLMs, fit their energy and runtime, and plan batch work for the least energy.")


@st.cache_data(ttl=30, show_spinner="Looking for energy sensors…")
def sensors_table() -> pd.DataFrame:
    return pd.DataFrame([s.to_dict() for s in discover_sensors()])


try:
    view = read_overview(get_store())
except PlannerError as exc:
    show_error(exc)
    st.stop()

st.subheader("Energy sensors on this host")
sensors = sensors_table()
measured = sensors[sensors.status == "measured"]
estimated = sensors[sensors.status == "estimated"]
if len(measured):
    st.success(f"{len(measured)} energy sensor(s) measure here: " + ", ".join(sorted(set(measured.source))))
if len(estimated):
    st.warning("No CPU energy sensor here: CPU energy will be **estimated** and labelled so everywhere it appears.")
st.table(
    sensors.fillna("").rename(columns={"source": "Source", "device": "Device", "status": "Status", "detail": "Detail",
                                       "fix": "How to fix"}),
    hide_index=True,
)

left, right = st.columns(2)
with left:
    st.subheader("Models in the catalog")
    if view.models.empty:
        st.info("The catalog is empty. Add a model on the Models page, or run `make run` to generate the demo models.")
    else:
        table = view.models.assign(
            accuracy=view.models.accuracy.map(format_accuracy),
            params=view.models.params_b.map(format_params),
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
        st.dataframe(view.measured_pairs, hide_index=True, width="stretch")
    st.subheader("Latest work")
    links = {"Profiling job": ("pages/profile.py", "Open the Profile page"),
             "Fit": ("pages/models.py", "See the surfaces on the Models page"),
             "Plan": ("pages/plan.py", "Plan a workload"),
             "Execution": ("pages/execute.py", "Execute a plan")}
    for label, record in (("Profiling job", view.latest_job), ("Fit", view.latest_fit),
                          ("Plan", view.latest_plan), ("Execution", view.latest_execution)):
        if record is None:
            st.markdown(f"**{label}:** none yet")
        else:
            st.markdown(f"**{label} #{record['id']}:** " + ", ".join(
                f"{k} {v}" for k, v in record.items() if k not in ("id",) and v is not None and v == v))
        if label in links:
            st.page_link(links[label][0], label=links[label][1])

st.caption(f"Database: `{view.db_path}` (schema version {view.schema_version})")
