"""The fitted surfaces part of the Models page: energy and runtime over (input, output) tokens.

Not a page of its own: pages/models.py calls :func:`show_surfaces`.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.errors import PlannerError
from engine.fitting import (energy_model_card, fit_all, load_latest_fits, load_reference_profiles, load_trials,
                            residuals, save_fits, suggest_points, surface_grid)
from engine.formatting import format_percent
from ui.common import show_error


def _surface_figure(fit, trials: pd.DataFrame | None, view: str, log_axes: bool) -> go.Figure:
    grid = surface_grid(fit, n=25, log=True)
    column = fit.value_column
    z_column = f"{column}_per_token" if view == "per token" else f"{column}_raw"
    size = int(np.sqrt(len(grid)))
    x = grid.input_tokens.to_numpy().reshape(size, size)
    y = grid.output_tokens.to_numpy().reshape(size, size)
    z = grid[z_column].to_numpy().reshape(size, size)
    unit = "J" if fit.target == "energy" else "s"
    what = f"{fit.target} ({unit}{' per token' if view == 'per token' else ''}" \
           f"{', estimated' if fit.target == 'energy' and fit.energy_estimated else ''})"
    figure = go.Figure(go.Surface(x=x, y=y, z=z, colorscale="Viridis", opacity=0.85, name=fit.form,
                                  colorbar={"title": unit}))
    uncertainty = grid[f"{column}_uncertainty"].to_numpy().reshape(size, size)
    if np.isfinite(uncertainty).any():
        # The 90% band of a single request's value: trial noise plus the coefficients' own uncertainty.
        band = uncertainty / (x + y) if view == "per token" else uncertainty
        for sign, label in ((1, "upper"), (-1, "lower")):
            figure.add_trace(go.Surface(x=x, y=y, z=z + sign * band, showscale=False, opacity=0.2,
                                        colorscale=[[0, "grey"], [1, "grey"]], name=f"90% band ({label})",
                                        hoverinfo="skip"))
    if trials is not None and len(trials) and trials[column].notna().any():
        shown = trials[trials[column].notna()]
        values = shown[column] / (shown.input_tokens + shown.output_tokens) if view == "per token" else shown[column]
        figure.add_trace(go.Scatter3d(x=shown.input_tokens, y=shown.output_tokens, z=values, mode="markers",
                                      marker={"size": 3, "color": "crimson"}, name="measured trials"))
    axis_type = "log" if log_axes else "linear"
    figure.update_layout(
        title=f"{fit.model} on {fit.device}: {what}, form {fit.form}", height=520,
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
        scene={"xaxis": {"title": "input tokens", "type": axis_type},
               "yaxis": {"title": "output tokens", "type": axis_type},
               "zaxis": {"title": what}})
    return figure


def _residual_figure(fit, trials: pd.DataFrame) -> go.Figure:
    frame = residuals(fit, trials)
    figure = go.Figure(go.Scatter(x=frame.predicted, y=frame.relative_residual * 100, mode="markers",
                                  marker={"size": 5}, text=[f"{i} in, {o} out" for i, o in
                                                            zip(frame.input_tokens, frame.output_tokens)]))
    figure.add_hline(y=0, line_dash="dot")
    unit = "J" if fit.target == "energy" else "s"
    figure.update_layout(title=f"Residuals of {fit.target}: (measured − predicted) / measured", height=360,
                         xaxis_title=f"predicted {fit.target} ({unit})", yaxis_title="relative residual (%)")
    return figure


def show_surfaces(store) -> None:
    """Fit, and show the latest fits with their measured points, metrics and model card."""
    st.header("Fitted surfaces")
    st.caption("Energy and runtime per request as functions of input and output tokens, fitted per model and device. "
               "The form is chosen by cross-validated relative error on held-out design points (CV MAPE); "
               "R² is shown beside it, never alone.")
    left, right = st.columns(2)
    executed = store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0]
    include_executed = left.checkbox(
        f"Include the {executed:,} queries measured while executing plans", value=False, key="fit_include_executed",
        disabled=not executed, help="Executed queries are real requests (real prompts, answers that may end early); "
                                    "profiling trials are controlled. Off: fit on profiling trials only.")
    if left.button("Fit all measured models", type="primary", key="fit_all"):
        try:
            before = {f.key: f for f in load_latest_fits(store, source="measured")}
            with st.spinner("Fitting…"):
                saved = save_fits(store, fit_all(store, include_executed=include_executed))
            st.success(f"Fitted {len(saved)} surfaces" + (" including executed queries." if include_executed else "."))
            changes = [{"model": f.model, "device": f.device, "target": f.target,
                        "trials before": before[f.key].n_trials if f.key in before else None, "trials now": f.n_trials,
                        "form before": before[f.key].form if f.key in before else "", "form now": f.form,
                        "CV MAPE before": format_percent(before[f.key].cv_mape, unknown="") if f.key in before else "",
                        "CV MAPE now": format_percent(f.cv_mape, unknown="")}
                       for f in saved]
            st.markdown("**How the fits changed**")
            st.dataframe(changes, hide_index=True, width="stretch")
        except PlannerError as exc:
            show_error(exc)
    if right.button("Load the paper's published A100 profiles", key="load_reference",
                    help="Coefficients of Wilkins et al. Table 5.2 (Swing, AMD + A100): published, no measurements."):
        try:
            load_reference_profiles(store)
            st.success("Loaded the published A100 coefficients as reference fits (no measurements).")
        except PlannerError as exc:
            show_error(exc)

    fits = load_latest_fits(store)
    if not fits:
        st.info("No fits yet: profile a model on the Profile page (or import measurements), then fit.")
        return
    pairs = sorted({(f.model, f.device) for f in fits})
    model, device = st.selectbox("Model and device", pairs, format_func=lambda p: f"{p[0]} on {p[1]}", key="fit_pair")
    pair = [f for f in fits if (f.model, f.device) == (model, device)]
    scopes = sorted({f.energy_scope for f in pair})
    scope = st.radio("Energy scope", scopes, horizontal=True, key="fit_scope") if len(scopes) > 1 else scopes[0]
    pair = [f for f in pair if f.energy_scope == scope]
    published = all(f.source == "published" for f in pair)
    if published:
        st.warning("Published coefficients, no measurements: these are the paper's fits on its A100 system. "
                   "Where they predict negative energy (long inputs, short outputs) the surface shows it; plans clamp "
                   "it at 0 with a warning.")
    elif any(f.energy_estimated for f in pair if f.target == "energy"):
        st.info("Energy here is **estimated** (no sensor on the host that measured it).")
    trials = None
    if not published:
        try:
            trials = load_trials(store, model, device, energy_scope=scope)
        except PlannerError as exc:
            show_error(exc)

    c1, c2 = st.columns(2)
    view = c1.radio("View", ["per request", "per token"], horizontal=True, key="fit_view")
    log_axes = c2.toggle("Log axes", value=True, key="fit_log")
    for fit in sorted(pair, key=lambda f: f.target):
        st.plotly_chart(_surface_figure(fit, trials, view, log_axes), width="stretch",
                        key=f"surface_{fit.fit_id}_{view}_{log_axes}")

    rows = []
    for fit in pair:
        for candidate in fit.candidates or []:
            rows.append({"target": fit.target, "form": candidate.form, "CV MAPE": candidate.cv_mape,
                         "R²": candidate.r2, "chosen": "✓" if candidate.chosen else "",
                         "offered": "yes" if candidate.offered else "no"})
    if rows:
        st.subheader("Forms compared")
        table = pd.DataFrame(rows)
        st.dataframe(table, hide_index=True, width="stretch", column_config={
            "CV MAPE": st.column_config.NumberColumn(format="percent"),
            "R²": st.column_config.NumberColumn(format="%.4f")})
    st.subheader("Chosen coefficients")
    for fit in sorted(pair, key=lambda f: f.target):
        units = fit.units or {}
        coefficients = pd.DataFrame([{"term": term, "value": value, "unit": units.get(term, "")}
                                     for term, value in fit.coefficients.items()])
        st.markdown(f"**{fit.target}** — form `{fit.form}`, CV MAPE "
                    f"{format_percent(fit.cv_mape)}, "
                    f"R² {'—' if fit.r2 is None else f'{fit.r2:.4f}'}, domain input "
                    f"{fit.domain['input_tokens']}, output {fit.domain['output_tokens']} tokens")
        st.dataframe(coefficients, hide_index=True, width="stretch",
                     column_config={"value": st.column_config.NumberColumn(format="%.6g")})
    if trials is not None and len(trials):
        for fit in sorted(pair, key=lambda f: f.target):
            st.plotly_chart(_residual_figure(fit, trials), width="stretch", key=f"residual_{fit.fit_id}")
        try:
            suggestions = suggest_points(pair, n=3)
            st.markdown("**Measure next** (largest uncertainty): " + ", ".join(
                f"({int(r.input_tokens)} in, {int(r.output_tokens)} out)" for r in suggestions.itertuples()))
        except PlannerError:
            pass
    card = energy_model_card(pair)
    st.download_button("Download the energy model card (JSON)", json.dumps(card, indent=2),
                       file_name=f"energy-model-card-{model}-{device}.json".replace(" ", "_").replace(":", "_"),
                       mime="application/json", key="card_download")
