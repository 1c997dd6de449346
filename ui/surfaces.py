"""The fitted surfaces part of the Models page: fit (in the background), then energy and
runtime over (input, output) tokens with the measured trials, the forms compared, the
coefficients, the residuals and the model card. A fit with a batch axis is drawn at a chosen
batch size, per request (one batch's value / B), beside the energy per request against batch
size at one request shape (:mod:`engine.batch_curves` computes both).

Not a page of its own: pages/models.py calls :func:`show_surfaces`. A click on the view
(a pair, per token, log axes) reruns only the surfaces panel (a fragment), and the fits,
trials and figures come from caches keyed by fit id and by the database's change marker,
so it answers at once; the charts keep their keys, so the browser updates them in place.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.batch_curves import (batch_size_choices, best_measured_shape, load_trials_by_batch_size,
                                 measured_per_request, per_request_curve, residuals_by_batch_size, surface_grid_at,
                                 trials_at_batch_size)
from engine.errors import PlannerError
from engine.fitting import (FitResult, energy_model_card, fit_all, load_latest_fits, load_reference_profiles,
                            save_fits, suggest_points)
from engine.fitting.predict import with_batch_size
from engine.formatting import format_count, format_energy, format_percent
from engine.overview import count_executed_measurements, data_version
from engine.store import Store
from ui import background
from ui.common import show_error

SURFACE_GRID_N = 25


# -- cached reads and figures (keyed by fit id and the database's change marker) -----------------

@st.cache_resource(max_entries=4, show_spinner=False)
def _latest_fits(db_path: str, version: tuple, _store: Store) -> list[FitResult]:
    return load_latest_fits(_store)


@st.cache_data(max_entries=32, show_spinner=False)
def _trials(db_path: str, version: tuple, model: str, device: str, scope: str, _store: Store) -> pd.DataFrame:
    return load_trials_by_batch_size(_store, model, device, energy_scope=scope)


@st.cache_data(max_entries=64, show_spinner=False)
def _surface_figure(fit_id: int, version: tuple, view: str, log_axes: bool, band: bool, batch_size: int,
                    _fit: FitResult, _trials: pd.DataFrame | None) -> go.Figure:
    return surface_figure(_fit, _trials, view, log_axes, band=band, batch_size=batch_size)


@st.cache_data(max_entries=64, show_spinner=False)
def _batch_curve_figure(fit_id: int, version: tuple, input_tokens: int, output_tokens: int, _fit: FitResult,
                        _trials: pd.DataFrame | None) -> go.Figure:
    return batch_curve_figure(_fit, _trials, input_tokens, output_tokens)


@st.cache_data(max_entries=64, show_spinner=False)
def _residual_figure(fit_id: int, version: tuple, _fit: FitResult, _trials: pd.DataFrame) -> go.Figure:
    return residual_figure(_fit, _trials)


@st.cache_data(max_entries=32, show_spinner=False)
def _suggestions(fit_ids: tuple[int, ...], _pair: list[FitResult]) -> pd.DataFrame | None:
    try:
        return suggest_points(_pair, n=3)
    except PlannerError:
        return None


# -- figures ----------------------------------------------------------------------------------------

#: The views of a surface: per request and per token always; per batch for a fit with a batch axis.
VIEWS = ("per request", "per token")
BATCH_VIEW = "per batch"


def _grid_arrays(fit: FitResult, view: str, batch_size: int = 1
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x, y, z and the 90% half-width of the value shown (a single request's, or per batch a
    whole batch's), on the surface's grid at this batch size."""
    grid = surface_grid_at(fit, batch_size, n=SURFACE_GRID_N, log=True)
    column = fit.value_column
    z_column = {"per token": f"{column}_per_token", BATCH_VIEW: f"{column}_batch"}.get(view, f"{column}_raw")
    size = int(np.sqrt(len(grid)))
    shape = (size, size)
    x = grid.input_tokens.to_numpy().reshape(shape)
    y = grid.output_tokens.to_numpy().reshape(shape)
    uncertainty = grid[f"{column}_uncertainty"].to_numpy().reshape(shape)
    if view == BATCH_VIEW:
        uncertainty = uncertainty * batch_size
    return x, y, grid[z_column].to_numpy().reshape(shape), uncertainty


def _token_axis(title: str, tokens: np.ndarray, log_axes: bool) -> dict:
    """A scene axis of token counts. A log axis is drawn as a linear axis of log10(tokens) with
    the counts as tick labels: switching it then changes only data, which the browser redraws in
    place, where changing the axis type rebuilds the whole 3-D scene (seconds on a CPU-only host)."""
    if not log_axes:
        return {"title": title, "type": "linear"}
    low, high = float(np.nanmin(tokens)), float(np.nanmax(tokens))
    ticks = [2 ** k for k in range(0, 25) if low / 1.5 <= 2 ** k <= high * 1.5]
    if len(ticks) > 7:
        ticks = ticks[::2]
    return {"title": f"{title} (log scale)", "type": "linear", "tickvals": list(np.log10(ticks)),
            "ticktext": [f"{t:,}" for t in ticks]}


def surface_figure(fit: FitResult, trials: pd.DataFrame | None, view: str, log_axes: bool, *,
                   band: bool = True, batch_size: int = 1) -> go.Figure:
    """The fitted surface, its 90% band (trial noise plus the coefficients' uncertainty) and the measured trials.

    A fit with a batch axis is drawn at ``batch_size``, with the trials measured at that batch
    size; "per request" and "per token" are then a request's share of one batch (its value / B).
    """
    batched = fit.has_batch_axis
    x, y, z, uncertainty = _grid_arrays(fit, view, batch_size)
    place = np.log10 if log_axes else (lambda tokens: tokens)
    unit = "J" if fit.target == "energy" else "s"
    per = {"per token": " per token", BATCH_VIEW: " per batch"}.get(view, " per request" if batched else "")
    z_unit = {"per token": "/token", BATCH_VIEW: "/batch"}.get(view, "/request" if batched else "")
    what = f"{fit.target} ({unit}{per}" \
           f"{', estimated' if fit.target == 'energy' and fit.energy_estimated else ''})"
    hover = "%{customdata[0]:,} in, %{customdata[1]:,} out: %{z:.4g} " + unit + "<extra></extra>"
    tokens = np.dstack([x, y])
    figure = go.Figure(go.Surface(x=place(x), y=place(y), z=z, colorscale="Viridis", name=fit.form,
                                  colorbar={"title": unit}, customdata=tokens, hovertemplate=hover))
    if band and np.isfinite(uncertainty).any():
        half_width = uncertainty / (x + y) if view == "per token" else uncertainty
        for sign, label in ((1, "upper"), (-1, "lower")):
            figure.add_trace(go.Surface(x=place(x), y=place(y), z=z + sign * half_width, showscale=False, opacity=0.2,
                                        colorscale=[[0, "grey"], [1, "grey"]], name=f"90% band ({label})",
                                        hoverinfo="skip"))
    column = fit.value_column
    if batched:
        trials = trials_at_batch_size(trials, batch_size)
    if trials is not None and len(trials) and trials[column].notna().any():
        shown = trials[trials[column].notna()]
        values = shown[column] if view == BATCH_VIEW or not batched else shown[column] / batch_size
        if view == "per token":
            values = values / (shown.input_tokens + shown.output_tokens)
        # Trials at points that did not converge: ✕ (a point of a fit with a batch axis names its batch size).
        loose = {with_batch_size(point) for point in fit.unconverged_points}
        size = batch_size if batched else 1
        symbols = ["x" if (i, o, size) in loose else "circle" for i, o in zip(shown.input_tokens, shown.output_tokens)]
        figure.add_trace(go.Scatter3d(
            x=place(shown.input_tokens.to_numpy(dtype=float)), y=place(shown.output_tokens.to_numpy(dtype=float)),
            z=values, mode="markers", marker={"size": 3, "color": "crimson", "symbol": symbols},
            name=f"measured trials at batch size {batch_size}" if batched else "measured trials",
            customdata=np.column_stack([shown.input_tokens, shown.output_tokens]), hovertemplate=hover))
    figure.update_layout(
        # Batched: the form is in the caption beside the chart, so that the title fits.
        title=(f"{fit.model} on {fit.device}, batches of {batch_size}: {what}" if batched
               else f"{fit.model} on {fit.device}: {what}, form {fit.form}"), height=480,
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        scene={"xaxis": _token_axis("input tokens", x, log_axes), "yaxis": _token_axis("output tokens", y, log_axes),
               "zaxis": {"title": f"{fit.target} ({unit}{z_unit})"},
               "aspectmode": "cube",
               "camera": {"eye": {"x": -1.7, "y": -1.7, "z": 1.2}}},  # the whole cube in a two-thirds-wide chart
        uirevision=f"{fit.model}@{fit.device}/{fit.target}")  # a redraw keeps the camera the user turned
    return figure


def batch_curve_figure(fit: FitResult, trials: pd.DataFrame | None, input_tokens: int,
                       output_tokens: int) -> go.Figure:
    """A request's share of one batch (the batch's value / B) against the batch size B, at one
    shape, with its 90% band and the trials measured at that shape at each batch size."""
    curve = per_request_curve(fit, input_tokens, output_tokens)
    measured = measured_per_request(trials, fit.value_column, input_tokens, output_tokens)
    unit = fit.unit
    estimated = ", estimated" if fit.energy_estimated else ""
    hover = "B = %{x}: %{y:.4g} " + unit + " per request<extra></extra>"
    figure = go.Figure()
    if curve["per_request_uncertainty"].notna().any():
        low = np.maximum(curve.per_request - curve.per_request_uncertainty, 0.0)
        figure.add_trace(go.Scatter(x=curve.batch_size, y=curve.per_request + curve.per_request_uncertainty,
                                    mode="lines", line={"width": 0}, hoverinfo="skip", showlegend=False))
        figure.add_trace(go.Scatter(x=curve.batch_size, y=low, mode="lines", line={"width": 0}, fill="tonexty",
                                    fillcolor="rgba(128, 128, 128, 0.25)", name="90% band", hoverinfo="skip"))
    figure.add_trace(go.Scatter(x=curve.batch_size, y=curve.per_request, mode="lines", name=f"fitted{estimated}",
                                line={"color": "#440154", "width": 2}, hovertemplate=hover))
    if len(measured):
        figure.add_trace(go.Scatter(x=measured.batch_size, y=measured.per_request, mode="markers",
                                    name=f"measured trials{estimated}", marker={"size": 7, "color": "crimson"},
                                    hovertemplate=hover))
    lo, hi = fit.batch_domain
    ticks = sorted({lo, hi} | {2 ** k for k in range(0, 31) if lo <= 2 ** k <= hi})
    figure.update_layout(
        title=f"{fit.model} on {fit.device}: {fit.target} per request against batch size, "
              f"{input_tokens:,} in, {output_tokens:,} out",
        height=380, margin={"l": 0, "r": 0, "t": 40, "b": 0}, legend={"orientation": "h", "y": -0.2},
        xaxis={"title": "batch size (requests per batch, log scale)", "type": "log",
               "tickvals": ticks, "ticktext": [str(b) for b in ticks]},
        yaxis={"title": f"{unit} per request{estimated}", "rangemode": "tozero"})
    return figure


def residual_figure(fit: FitResult, trials: pd.DataFrame) -> go.Figure:
    frame = residuals_by_batch_size(fit, trials)
    labels = [f"{i} in, {o} out" + (f", batch of {b}" if fit.has_batch_axis else "")
              for i, o, b in zip(frame.input_tokens, frame.output_tokens, frame.batch_size)]
    figure = go.Figure(go.Scatter(x=frame.predicted, y=frame.relative_residual * 100, mode="markers",
                                  marker={"size": 5}, text=labels))
    figure.add_hline(y=0, line_dash="dot")
    unit = "J" if fit.target == "energy" else "s"
    figure.update_layout(title=f"Residuals of {fit.target}: (measured − predicted) / measured", height=360,
                         xaxis_title=f"predicted {fit.target} ({unit}{' per batch' if fit.has_batch_axis else ''})",
                         yaxis_title="relative residual (%)")
    return figure


# -- fitting (in the background) ---------------------------------------------------------------

def _fit_in_background(progress: background.TaskProgress, store: Store, include_executed: bool):
    progress.report("reading the measurements")
    before = {f.key: f for f in load_latest_fits(store, source="measured")}
    progress.report("cross-validating every form for each model and device")
    fits = fit_all(store, include_executed=include_executed)
    progress.check()  # dropped meanwhile: store nothing
    progress.report("storing the fits")
    return before, save_fits(store, fits)


def _show_fit_outcome(outcome: background.Outcome) -> None:
    if outcome.error is not None:
        show_error(outcome.error)
        return
    before, saved = outcome.value
    st.success(f"Fitted {format_count(len(saved), 'surface')}"
               + (" including executed queries." if outcome.request else "."))
    changes = [{"model": f.model, "device": f.device, "target": f.target,
                "trials before": before[f.key].n_trials if f.key in before else None, "trials now": f.n_trials,
                "form before": before[f.key].form if f.key in before else "", "form now": f.form,
                "CV MAPE before": format_percent(before[f.key].cv_mape, unknown="") if f.key in before else "",
                "CV MAPE now": format_percent(f.cv_mape, unknown="")}
               for f in saved]
    st.markdown("**How the fits changed**")
    st.dataframe(changes, hide_index=True, width="stretch")


def show_fit_controls(store: Store) -> None:
    """Fit every measured model (in the background), or load the paper's published A100 profiles."""
    outcome = background.take_outcome("fit")
    if outcome is not None:
        _show_fit_outcome(outcome)
    left, right = st.columns(2)
    executed = count_executed_measurements(store)
    include_executed = left.checkbox(
        f"Include the {format_count(executed, 'query', 'queries')} measured while executing plans", value=False,
        key="fit_include_executed", disabled=not executed,
        help="Executed queries are real requests (real prompts, answers that may end early); profiling trials are "
             "controlled. Off: fit on profiling trials only.")
    if left.button("Fit all measured models", type="primary", key="fit_all"):
        background.start("fit", "Fitting", partial(_fit_in_background, store=store,
                                                   include_executed=include_executed),
                         request=include_executed)
    if right.button("Load the paper's published A100 profiles", key="load_reference",
                    help="Coefficients of Wilkins et al. Table 5.2 (Swing, AMD + A100): published, no measurements."):
        try:
            load_reference_profiles(store)
            st.success("Loaded the published A100 coefficients as reference fits (no measurements).")
        except PlannerError as exc:
            show_error(exc)
    background.show_progress("fit", stop_label="Stop waiting")


# -- the panel of one (model, device) --------------------------------------------------------------

def _show_forms(pair: list[FitResult]) -> None:
    rows = [{"target": fit.target, "form": candidate.form, "CV MAPE": candidate.cv_mape, "R²": candidate.r2,
             "chosen": "✓" if candidate.chosen else "", "offered": "yes" if candidate.offered else "no"}
            for fit in pair for candidate in fit.candidates or []]
    if rows:
        st.subheader("Forms compared")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
            "CV MAPE": st.column_config.NumberColumn(format="percent"),
            "R²": st.column_config.NumberColumn(format="%.4f")})


def _show_coefficients(pair: list[FitResult]) -> None:
    st.subheader("Chosen coefficients")
    for fit in sorted(pair, key=lambda f: f.target):
        units = fit.units or {}
        coefficients = pd.DataFrame([{"term": term, "value": value, "unit": units.get(term, "")}
                                     for term, value in fit.coefficients.items()])
        r2 = "—" if fit.r2 is None else f"{fit.r2:.4f}"
        st.markdown(f"**{fit.target}** — form `{fit.form}`, CV MAPE {format_percent(fit.cv_mape)}, R² {r2}, domain "
                    f"input {fit.domain['input_tokens']}, output {fit.domain['output_tokens']} tokens"
                    + (f", batch size {list(fit.batch_domain)} (values per batch)" if fit.has_batch_axis else ""))
        st.dataframe(coefficients, hide_index=True, width="stretch",
                     column_config={"value": st.column_config.NumberColumn(format="%.6g")})


def _show_residuals(pair: list[FitResult], trials: pd.DataFrame, version: tuple) -> None:
    for fit in sorted(pair, key=lambda f: f.target):
        st.plotly_chart(_residual_figure(fit.fit_id, version, fit, trials), width="stretch",
                        key=f"residual_{fit.target}")
    suggestions = _suggestions(tuple(f.fit_id for f in pair), pair)
    if suggestions is not None:
        st.markdown("**Measure next** (largest uncertainty): " + ", ".join(map(suggestion_text,
                                                                              suggestions.itertuples())))


def suggestion_text(row) -> str:
    """One suggested point in words: ``(64 in, 16 out)``, or ``(64 in, 16 out, batch of 8)`` on a batch axis."""
    batch = f", batch of {int(row.batch_size)}" if int(getattr(row, "batch_size", 1)) > 1 else ""
    return f"({int(row.input_tokens)} in, {int(row.output_tokens)} out{batch})"


def _scope_note(pair: list[FitResult]) -> bool:
    """Say where the fits come from; returns whether they are published (no trials to show)."""
    published = all(f.source == "published" for f in pair)
    if published:
        st.warning("Published coefficients, no measurements: these are the paper's fits on its A100 system. "
                   "Where they predict negative energy (long inputs, short outputs) the surface shows it; plans clamp "
                   "it at 0 with a warning.")
    elif any(f.energy_estimated for f in pair if f.target == "energy"):
        st.info("Energy here is **estimated** (no sensor on the host that measured it).")
    return published


def _points_sentence(fit: FitResult, trials: pd.DataFrame | None, batch_size: int) -> str:
    """What the red points on the surface are (for a fit with a batch axis: which batch sizes have any)."""
    if not fit.has_batch_axis:
        return "red points are measured trials."
    if trials is None or "batch_size" not in trials.columns:
        return f"red points are measured trials at batch size {batch_size}."
    measured = sorted(int(b) for b in trials.loc[trials[fit.value_column].notna(), "batch_size"].unique())
    if batch_size in measured:
        return f"red points are measured trials at batch size {batch_size}."
    return (f"no trial was measured at batch size {batch_size} (measured at "
            f"{', '.join(map(str, measured)) or 'none'}), so no red points.")


def one_batch_size_note(fit: FitResult) -> str:
    """One line for a fit without a batch axis: the one batch size it was measured at, and how to see batching."""
    return (f"Measured at batch size {fit.batch_domain[0]} only: profile with several batch sizes (`python -m engine "
            "profile --model M --device D --batch-sizes 1,2,4,8`, or the Profile page) and fit again to see the "
            "batching lever.")


def _show_batch_curve(fit: FitResult, trials: pd.DataFrame | None, version: tuple) -> None:
    """Energy per request against batch size at a chosen shape, and what batching saves there."""
    st.subheader("Energy per request against batch size")
    default_in, default_out = best_measured_shape(trials, fit)
    (in_lo, in_hi), (out_lo, out_hi) = fit.domain["input_tokens"], fit.domain["output_tokens"]
    pair_key = f"{fit.model}@{fit.device}"  # each pair has its own token range
    chart, controls = st.columns([3, 2])
    tokens_in = int(controls.number_input("Input tokens", min_value=int(in_lo), max_value=int(in_hi),
                                          value=int(min(max(default_in, in_lo), in_hi)), step=1,
                                          key=f"fit_curve_in_{pair_key}"))
    tokens_out = int(controls.number_input("Output tokens", min_value=int(out_lo), max_value=int(out_hi),
                                           value=int(min(max(default_out, out_lo), out_hi)), step=1,
                                           key=f"fit_curve_out_{pair_key}"))
    chart.plotly_chart(_batch_curve_figure(fit.fit_id, version, tokens_in, tokens_out, fit, trials),
                       width="stretch", key="batch_curve")
    lo, hi = fit.batch_domain
    ends = per_request_curve(fit, tokens_in, tokens_out, [lo, hi])
    first, last = ends.per_request.iloc[0], ends.per_request.iloc[-1]
    estimated = " (estimated)" if fit.energy_estimated else ""
    saving = (f": batches of {hi} use {first / last:.1f}× less energy per request than batches of {lo}"
              if last > 0 and first > last else "")
    controls.markdown(f"Per request{estimated}: **{format_energy(first)}** at batch size {lo}, "
                      f"**{format_energy(last)}** at {hi}{saving}.")
    measured = measured_per_request(trials, fit.value_column, tokens_in, tokens_out)
    if len(measured):
        controls.caption(f"Red points: the {format_count(len(measured), 'trial')} measured at this shape, each "
                         "batch's energy / its batch size. The line is the fit, its band 90%.")
    else:
        controls.caption("No trial was measured at this shape: the line is the fit alone (its band 90%). "
                         f"The default shape, {default_in:,} in and {default_out:,} out, has the most batch sizes "
                         "measured.")


@st.fragment
def surfaces_panel(store: Store) -> None:
    """One (model, device) at a time: choosing it, or the view, reruns only this panel."""
    version = data_version(store)
    fits = _latest_fits(str(store.path), version, store)
    if not fits:
        st.info("No fits yet: profile a model on the Profile page (or import measurements), then fit.")
        return
    pairs = sorted({(f.model, f.device) for f in fits})
    model, device = st.selectbox("Model and device", pairs, format_func=lambda p: f"{p[0]} on {p[1]}", key="fit_pair")
    pair = [f for f in fits if (f.model, f.device) == (model, device)]
    scopes = sorted({f.energy_scope for f in pair})
    scope = st.radio("Energy scope", scopes, horizontal=True, key="fit_scope") if len(scopes) > 1 else scopes[0]
    pair = [f for f in pair if f.energy_scope == scope]
    trials = None
    if not _scope_note(pair):
        try:
            trials = _trials(str(store.path), version, model, device, scope, store)
        except PlannerError as exc:
            show_error(exc)

    by_target = {f.target: f for f in pair}
    targets = sorted(by_target)
    batched = next((f for f in sorted(pair, key=lambda f: f.target) if f.has_batch_axis), None)  # energy first
    chart, controls = st.columns([3, 2])
    # One 3-D chart at a time, two thirds wide, opaque, its band on request: a browser without
    # a GPU draws 3-D in software, and transparent layers cost it seconds per click.
    target = controls.segmented_control("Surface", targets, default=targets[0], key="fit_target") or targets[0]
    if batched is None:
        view = controls.radio("View", list(VIEWS), horizontal=True, key="fit_view")
        batch_size = 1
    else:
        view = controls.radio("View", [*VIEWS, BATCH_VIEW], horizontal=True, key="fit_view_batched",
                              help="Per request and per token: a request's share of one batch (the batch's value / B).")
        choices = batch_size_choices(batched, trials)
        # Keyed per pair: another pair measured other batch sizes.
        batch_size = controls.select_slider(
            "Batch size", choices, value=choices[0], key=f"fit_batch_{model}@{device}",
            help=f"The surface at this many requests per batch (measured {batched.batch_domain[0]} to "
                 f"{batched.batch_domain[1]}), with the trials measured at this batch size.")
    log_axes = controls.toggle("Log axes", value=True, key="fit_log")
    band = controls.toggle("90% band", value=False, key="fit_band",
                           help="The range a single request's value falls in 9 times out of 10: trial noise plus the "
                                "coefficients' own uncertainty, drawn as two grey surfaces.")
    fit = by_target[target]
    size_shown = batch_size if fit.has_batch_axis else 1
    if view == BATCH_VIEW and not fit.has_batch_axis:  # its other target has a batch axis, this one not
        view = "per request"
    controls.caption(f"Form `{fit.form}`, CV MAPE {format_percent(fit.cv_mape)}; "
                     f"{_points_sentence(fit, trials, size_shown)} Drag to turn the surface.")
    # One key: a new view updates the chart in place instead of building a new one.
    chart.plotly_chart(_surface_figure(fit.fit_id, version, view, log_axes, band, size_shown, fit, trials),
                       width="stretch", key="surface")
    if fit.unconverged_points:
        listed = ", ".join(f"{p[0]}×{p[1]}" + (f" at batch size {p[2]}" if len(p) > 2 else "")
                           for p in fit.unconverged_points[:8])
        more = "" if len(fit.unconverged_points) <= 8 else f" and {len(fit.unconverged_points) - 8} more"
        st.warning(f"{format_count(len(fit.unconverged_points), 'measured point')} (input×output tokens: {listed}{more}) "
                   "did not converge: their trials reached the most allowed without a tight 95% interval. They are "
                   "drawn ✕ and weigh less in this fit; profile them again on a quiet machine to firm them up.")
    if batched is None:
        if not all(f.source == "published" for f in pair):
            st.caption(one_batch_size_note(fit))
    elif "energy" in by_target and by_target["energy"].has_batch_axis:
        _show_batch_curve(by_target["energy"], trials, version)
    _show_forms(pair)
    _show_coefficients(pair)
    if trials is not None and len(trials):
        _show_residuals(pair, trials, version)
    card = energy_model_card(pair)
    st.download_button("Download the energy model card (JSON)", json.dumps(card, indent=2),
                       file_name=f"energy-model-card-{model}-{device}.json".replace(" ", "_").replace(":", "_"),
                       mime="application/json", key="card_download")


def show_surfaces(store: Store) -> None:
    """Fit, and show the latest fits with their measured points, metrics and model card."""
    st.header("Fitted surfaces")
    st.caption("Energy and runtime per request as functions of input and output tokens, fitted per model and device. "
               "The form is chosen by cross-validated relative error on held-out design points (CV MAPE); "
               "R² is shown beside it, never alone.")
    show_fit_controls(store)
    surfaces_panel(store)
