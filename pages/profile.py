"""Profile: measure a model's energy and runtime over a design of token counts.

The job runs in its own worker process; this page only starts, watches, cancels and
resumes it, so leaving the page (or the app) does not stop it.
"""

import pandas as pd
import plotly.express as px
import streamlit as st

from engine import catalog
from engine.energy import discover_sensors
from engine.errors import PlannerError
from engine.profiling import jobs
from engine.profiling.design import DEFAULT_BATCH_SIZES, DESIGN_KINDS, parse_batch_sizes, parse_token_list
from engine.formatting import format_count, format_duration, format_percent, format_timestamp
from ui.cluster import cluster_in_use, live_devices, node_list, show_reading
from ui.common import get_store, show_error
from ui.navigation import ensure_app_navigation

ensure_app_navigation()
st.title("Profile")
st.caption("Run a model over a design of input and output token counts; every trial's energy and runtime is stored.")
store = get_store()

try:
    jobs.reconcile_jobs(store)
    models = catalog.list_models(store)
except PlannerError as exc:
    show_error(exc)
    st.stop()

local = models[(models.backend != "external") & models.path.notna() & ~models.path.fillna("").str.startswith("hub:")]
if local.empty:
    st.info("No model with local weights in the catalog. Add one on the Models page (or run `make run` for the demo models).")
    st.page_link("pages/models.py", label="Models", icon=":material/model_training:")
    st.stop()

DEFAULT_BATCH_TEXT = ",".join(map(str, DEFAULT_BATCH_SIZES))
DESIGN_LABELS = {
    "quick": "Quick: {8, 32, 128} × {8, 32, 128}",
    "paper-sweeps": "Paper's sweeps: inputs 8..2048 at 32 out, outputs 8..4096 at 32 in",
    "paper-grid": "Paper's full grid: powers of two 8..2048 (81 points)",
    "space-filling": "Space-filling: few points spread over a range",
    "custom": "Custom lists",
}
gpus = [s.device for s in discover_sensors() if s.device.startswith("cuda:") and s.status == "measured"]
# A cluster's devices (NODE/DEVICE) once its node list has been read, off the script thread.
cluster, _ = cluster_in_use(store)
found = node_list(cluster) if cluster else None
node_devices = live_devices(found)

with st.form("new_job"):
    left, right = st.columns(2)
    model = left.selectbox("Model", local.name.tolist(), key="profile_model")
    device = right.selectbox("Device", ["cpu", *gpus, *node_devices], key="profile_device",
                             help="GPUs appear here when NVML finds them; with a cluster (Home page), the devices of "
                                  "its live nodes as NODE/DEVICE.")
    kind = st.radio("Design", DESIGN_KINDS, format_func=DESIGN_LABELS.get, key="profile_design")
    c1, c2, c3 = st.columns(3)
    inputs_text = c1.text_input("Input tokens", "8,32,128", key="profile_inputs",
                                help="Custom: the list. Space-filling: its smallest and largest values are the range.")
    outputs_text = c2.text_input("Output tokens", "8,32", key="profile_outputs")
    n_points = c3.number_input("Shapes (space-filling)", 2, 400, 16, key="profile_points",
                               help="(input, output) shapes of a space-filling design; each is measured at every "
                                    "batch size below.")
    batch_text = st.text_input(
        "Batch sizes", DEFAULT_BATCH_TEXT, key="profile_batch_sizes",
        help="Every point is measured at each batch size: one trial is one batch of B requests of that shape, run "
             "together, and its energy is shared among them. Two or more sizes let the fits and the plans batch, the "
             "largest energy lever; 1 alone measures one request at a time. Sizes whose largest batch would not fit "
             "in the device's free memory are left out of the default (and refused when you name them).")
    with st.expander("Repetitions and timing"):
        a, b, c = st.columns(3)
        rel_bound = a.number_input("Stop when the 95% CI is within ± (fraction of the mean)", 0.005, 1.0, 0.05,
                                   step=0.01, key="profile_rel")
        min_trials = b.number_input("Fewest trials per point", 1, 1000, 3, key="profile_min")
        max_trials = c.number_input("Most trials per point", 1, 1000, 25, key="profile_max")
        warmup = a.number_input("Warm-up runs (discarded)", 0, 100, 2, key="profile_warmup")
        cooldown = b.number_input("Cool-down after each trial (s)", 0.0, 600.0, 0.0, key="profile_cooldown")
        idle_s = c.number_input("Idle baseline (s)", 0.5, 600.0, 5.0, key="profile_idle")
        seed = a.number_input("Seed of the run order", 0, 2**31 - 1, 0, key="profile_seed")
    preview = st.form_submit_button("Check the design")
    start = st.form_submit_button("Start profiling", type="primary")
if isinstance(found, BaseException):
    st.warning(f"The cluster's devices are not offered: {found}")
if cluster:
    show_reading()


def job_request():
    needs_lists = kind in ("custom", "space-filling")
    inputs = parse_token_list(inputs_text, "Input tokens") if needs_lists else None
    outputs = parse_token_list(outputs_text, "Output tokens") if needs_lists else None
    batch_sizes = parse_batch_sizes(batch_text, "Batch sizes")
    settings = jobs.ProfileSettings(rel_bound=float(rel_bound), min_trials=int(min_trials), max_trials=int(max_trials),
                                    warmup_runs=int(warmup), cooldown_s=float(cooldown), idle_s=float(idle_s),
                                    seed=int(seed), batch_sizes=batch_sizes)
    # The default list left as it is: sizes that do not fit are left out (and named), not refused.
    return dict(design_kind=kind, inputs=inputs, outputs=outputs, n_points=int(n_points), settings=settings,
                default_batch_axis=batch_sizes == DEFAULT_BATCH_SIZES)


if preview or start:
    try:
        request = job_request()
        _, device, design, settings = jobs.prepare_job(store, model, device, **request)
        estimate = jobs.estimate_duration_s(store, model, device, design, settings)
        note = (f"about {format_duration(estimate[0])} to {format_duration(estimate[1])}, from this model's earlier "
                "runtimes here" if estimate else
                f"unknown until the first points are measured: {settings.min_trials * len(design.points)} to "
                f"{settings.max_trials * len(design.points)} trials")
        sizes = design.batch_sizes
        axis = (f" ({len(design.points) // len(sizes)} shapes × batch sizes {', '.join(map(str, sizes))})"
                if len(sizes) > 1 else f" at batch size {sizes[0]}")
        st.info(f"{len(design.points)} points{axis}; estimated duration {note}.")
        for dropped in design.dropped:
            st.warning(f"Dropped {dropped}.")
        if start:
            job = jobs.create_job(store, model, device, **request)
            jobs.start_worker(store, job.id)
            # The jobs panel below opens on the new job at once (its selector keeps its own value otherwise).
            st.session_state["profile_watch"] = job.id
            st.session_state["profile_polling"] = True
    except PlannerError as exc:
        show_error(exc)

with st.expander("Import or export measurements (CSV)"):
    st.markdown("Columns: `model, device, input_tokens, output_tokens, runtime_s, energy_j` and optionally "
                "`trial, batch_size, energy_source, gpu_energy_j, cpu_energy_j, dram_energy_j, idle_power_w, "
                "started_at`. A row of `batch_size` B is one batch of B requests of that shape (empty: 1). "
                "Leave `energy_j` empty when it was not measured; `energy_source` is `measured` or `estimated`. "
                "A file is imported whole, or not at all when any row is wrong.")
    upload = st.file_uploader("Measurements measured elsewhere", type=["csv"], key="measurements_upload")
    if upload is not None and st.button("Import measurements", key="measurements_import"):
        from engine.measurements_io import import_measurements_bytes

        try:
            report = import_measurements_bytes(store, upload.getvalue(), upload.name)
        except PlannerError as exc:
            show_error(exc)
        else:
            st.success(f"Imported {report.n_rows:,} measurements of {', '.join(report.models)}.")
            for warning in report.warnings:
                st.warning(warning)
    from engine.measurements_io import measurements_csv, measurements_frame

    stored = measurements_frame(store)
    if len(stored):
        st.download_button(f"Download all {len(stored):,} measurements", measurements_csv(stored),
                           file_name="measurements.csv", mime="text/csv")


def job_label(history: pd.DataFrame, job_id: int) -> str:
    """A job's name in the selector. Never its status: the browser keeps showing the label a
    choice was made under, so a label that changes ("queued", then "done") would go stale there."""
    row = history.set_index("id").loc[job_id]
    return f"#{job_id} {row.model} on {row.device}"


def jobs_table(history: pd.DataFrame) -> pd.DataFrame:
    """Every job in words: its points and trials, and local times to the minute."""
    return pd.DataFrame({
        "job": history.id.map(lambda i: f"#{i}"), "model": history.model, "device": history.device,
        "status": history.status, "points": [f"{d} / {t}" for d, t in zip(history.points_done, history.points_total)],
        "trials": history.trials,
        "points not converged": [("" if pd.isna(n) else f"{int(n)}") for n in history.unconverged],
        "reason": history.reason.fillna(""),
        "created": history.created_at.map(format_timestamp), "finished": history.finished_at.map(format_timestamp)})


def point_state(points: pd.DataFrame) -> list[str]:
    """Each point in words: still measuring, converged, or not converged (its trials reached the cap
    with a wide interval: ±x% is the 95% interval of its mean)."""
    if "stopped" not in points.columns:
        return ["" for _ in range(len(points))]
    words = []
    for unconverged, stopped, ci_rel in zip(points.unconverged, points.stopped, points.ci_rel):
        if pd.isna(stopped):
            words.append("measuring")
        elif bool(unconverged):
            words.append("not converged" + ("" if pd.isna(ci_rel) else f" (±{format_percent(ci_rel)})"))
        elif stopped == "converged":
            words.append("converged")
        else:
            words.append({"fixed-trials": "fixed trial count", "budget": "stopped at the budget",
                          "settled": "enough for the fit"}.get(stopped, str(stopped)))
    return words


def show_points(job, points: pd.DataFrame) -> None:
    """What a job measured so far, per point: a chart and a table; points whose trials reached the
    cap without meeting the confidence rule are marked (and weigh less in the fits). A trial of
    batch size B is one batch: its energy per request is a B-th of the batch's."""
    estimated = (points.energy_source == "estimated").any()
    label = "mean energy per request (J, estimated)" if estimated else "mean energy per request (J)"
    state = point_state(points)
    batched = points.batch_size.nunique() > 1 or (points.batch_size > 1).any()
    chart = points.assign(input=points.input_tokens.astype(str), per_request=points.energy_j / points.batch_size,
                          batch=points.batch_size.map(lambda b: f"batch {int(b)}"),
                          state=["not converged" if s.startswith("not") else "ok" for s in state])
    order = [f"batch {b}" for b in sorted(points.batch_size.unique())]
    facets = dict(facet_col="batch", facet_col_wrap=3, category_orders={"batch": order}) if batched else {}
    figure = px.scatter(chart, x="output_tokens", y="per_request", color="input", size="trials", log_x=True,
                        symbol="state", symbol_map={"ok": "circle", "not converged": "x"},
                        title=f"Measured so far: {job.model} on {job.device}", **facets,
                        labels={"output_tokens": "output tokens", "per_request": label, "input": "input tokens",
                                "state": "point"})
    st.plotly_chart(figure, width="stretch", key=f"chart_{job.id}_{int(points.trials.sum())}")
    if estimated:
        st.caption("Energy is **estimated** (no sensor on this host): CPU time × watts per logical CPU.")
    loose = [s for s in state if s.startswith("not")]
    if loose:
        st.warning(f"{format_count(len(loose), 'point')} of {len(points)} did not converge: their trials reached "
                   "the most allowed without a tight 95% interval (a busy machine, usually). They are marked ✕ "
                   "here, and the fits weigh them less and flag them.")
    columns = ["input_tokens", "output_tokens"] + (["batch_size"] if batched else []) + [
        "trials", "runtime_s", "energy_j", "energy_source"]
    shown = points[columns].assign(point=state)
    per = "batch" if batched else "trial"
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={"batch_size": st.column_config.NumberColumn("batch size"),
                                "runtime_s": st.column_config.NumberColumn(f"mean runtime per {per} (s)",
                                                                           format="%.4f"),
                                "energy_j": st.column_config.NumberColumn(f"mean energy per {per} (J)", format="%.4f")})


def job_monitor(job_id: int) -> None:
    """One job: its progress, its times, Cancel or Resume, and what it measured so far."""
    progress = jobs.job_progress(store, job_id)
    job = progress.job
    active = job.status in jobs.ACTIVE
    fraction = job.points_done / job.points_total if job.points_total else 0.0
    st.progress(min(fraction, 1.0), text=f"Job #{job.id}: {job.model} on {job.device} — {job.status}")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Points", f"{job.points_done} / {job.points_total}")
    m2.metric("Trials", f"{progress.trials:,}")
    m3.metric("Elapsed", format_duration(progress.elapsed_s),
              help="Measuring time of the job across its runs (a resumed job goes on counting; pauses do not count).")
    if not active:
        remaining = "—"
    elif progress.remaining_s is not None:
        remaining = format_duration(progress.remaining_s)
    else:
        remaining = "finishing" if job.points_done >= job.points_total else "estimating…"
    m4.metric("Remaining", remaining, help="From the points measured so far; a rough guide.")
    if job.status == "failed":
        st.error(f"Failed: {job.reason}")
    elif job.status == "cancelled":
        st.warning(job.reason or "Cancelled.")
    elif job.status == "done":
        st.success(f"Done: {format_count(progress.trials, 'trial')} over {format_count(job.points_total, 'point')}.")
    if active:
        if st.button("Cancel job", key=f"cancel_{job.id}"):
            try:
                jobs.cancel_job(store, job.id)
            except PlannerError as exc:
                show_error(exc)
            st.rerun(scope="app")
    elif job.status in ("failed", "cancelled"):
        if st.button("Resume job", type="primary", key=f"resume_{job.id}"):
            try:
                jobs.resume_job(store, job.id)
                jobs.start_worker(store, job.id)
                st.session_state["profile_polling"] = True
            except PlannerError as exc:
                show_error(exc)
            else:
                st.rerun(scope="app")
    if len(progress.points):
        show_points(job, progress.points)


try:
    history = jobs.list_jobs(store)
except PlannerError as exc:
    show_error(exc)
    st.stop()
if history.empty:
    st.stop()
polling = bool(history.status.isin(jobs.ACTIVE).any()) or st.session_state.pop("profile_polling", False)


@st.fragment(run_every=1.5 if polling else None)
def jobs_panel() -> None:
    """The selector, the chosen job and the list of jobs, read afresh on every poll while a job runs."""
    try:
        jobs.reconcile_jobs(store)
        history = jobs.list_jobs(store)
    except PlannerError as exc:  # the database busy for a moment: say so, try again at the next poll
        show_error(exc)
        return
    ids = history.id.tolist()
    if st.session_state.get("profile_watch") not in ids:
        st.session_state["profile_watch"] = ids[0]
    job_id = st.selectbox("Job", ids, key="profile_watch", format_func=lambda i: job_label(history, i))
    job_monitor(job_id)
    with st.expander("All jobs"):
        st.dataframe(jobs_table(history), hide_index=True, width="stretch")
    if polling and not history.status.isin(jobs.ACTIVE).any():
        st.rerun(scope="app")  # every job has ended: redraw once, and stop polling


st.subheader("Jobs")
jobs_panel()
