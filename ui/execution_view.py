"""The Execute page's drawings of a finished (or stopped) run against its plan: the measured
total against the plan's energy band, and predicted against measured per batch. Everything
shown is computed by :mod:`engine.execution`.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine.execution import BandCheck, Comparison, share_rule_sentence, with_batch_bands
from engine.formatting import format_energy, format_percent, format_tokens
from engine.planning.band import EnergyBand


def show_band_check(check: BandCheck) -> None:
    """The measured total against the plan's band, in one sentence: green inside, amber outside, grey unknown."""
    text = f"**Against the plan's energy band:** {check.sentence()}"
    if check.inside is None:
        st.info(text)
    elif check.inside:
        st.success(text)
    else:
        st.warning(text)


def batches_table(comparison: Comparison, band: EnergyBand | None) -> pd.DataFrame:
    """One row per batch that ran, every number written out (the table the page shows): the batches
    of several requests first (a plan's single-query batches would hide them), then in run order."""
    frame = with_batch_bands(comparison.per_batch, band)
    frame = frame.iloc[(-frame["queries"].to_numpy()).argsort(kind="stable")]
    inside = {True: "inside", False: "outside"}
    return pd.DataFrame({
        "batch": [f"#{int(b)}" if pd.notna(b) else "—" for b in frame["batch_id"]],
        "model@device": frame["model"] + "@" + frame["device"],
        "size": frame["batch_size"].astype("Int64"),
        "members": frame["queries"].astype("Int64"),
        "predicted": frame["predicted_energy_j"].map(format_energy),
        "measured": frame["measured_energy_j"].map(lambda j: format_energy(j, unknown="not measured")),
        "error": frame["energy_error"].map(lambda e: format_percent(e, signed=True)),
        "band": frame["half_width_j"].map(lambda h: "± " + format_energy(h) if pd.notna(h) else "—"),
        "in its band": frame["inside_band"].map(lambda v: inside.get(v, "—")),
        "wasted decode": frame["wasted_decode_tokens"].map(format_tokens),
        "padding": frame["padding_tokens"].map(format_tokens),
    })


def batches_chart(comparison: Comparison, band: EnergyBand | None, estimated: bool) -> go.Figure:
    """Each batch's energy error, with its own band as a whisker: a bar past its whisker is outside."""
    frame = with_batch_bands(comparison.per_batch, band)
    frame = frame[frame["energy_error"].notna()]
    names = [f"#{int(b)}" if pd.notna(b) else f"query {i + 1}" for i, b in enumerate(frame["batch_id"])]
    whisker = (frame["half_width_j"] / frame["predicted_energy_j"] * 100).where(frame["predicted_energy_j"] > 0)
    colours = ["#2e7d32" if v is True else "#e65100" if v is False else "#78909c" for v in frame["inside_band"]]
    figure = go.Figure(go.Bar(
        x=names, y=frame["energy_error"] * 100, marker_color=colours,
        error_y=dict(type="data", array=whisker.fillna(0).to_numpy(), visible=bool(whisker.notna().any()),
                     color="#455a64"),
        customdata=frame["model"] + "@" + frame["device"],
        hovertemplate="batch %{x} (%{customdata}): %{y:+.1f}%<extra></extra>"))
    figure.update_layout(
        title="Energy error per batch" + (" (estimated energy)" if estimated else "")
              + (", each batch's band as a whisker" if whisker.notna().any() else ""),
        xaxis_title="batch", yaxis_title="(measured − predicted) / predicted (%)", xaxis_type="category",
        showlegend=False)
    return figure


def show_batches(comparison: Comparison, band: EnergyBand | None, share_rules, estimated: bool) -> None:
    """Predicted against measured per batch (table and chart), with the share rule in a sentence."""
    st.markdown("**Per batch**")
    rule = share_rule_sentence(share_rules)
    if rule:
        st.caption(rule)
    label = " (estimated)" if estimated else ""
    st.dataframe(batches_table(comparison, band), hide_index=True, width="stretch", column_config={
        "size": st.column_config.NumberColumn("size", help="The batch size the plan formed this batch at"),
        "members": st.column_config.NumberColumn("members", help="Requests of this batch that ran"),
        "measured": st.column_config.TextColumn("measured" + label, help="The batch's own measurement"),
        "predicted": st.column_config.TextColumn("predicted", help="The plan's prediction of the batch"),
        "band": st.column_config.TextColumn("band", help="The batch's own band: its fit's held-out error × its "
                                                         "energy plus its 90% interval"),
        "wasted decode": st.column_config.TextColumn(
            "wasted decode", help="Decode steps run for requests already done (inside a padded batch)"),
        "padding": st.column_config.TextColumn("padding", help="Prompt padding run so that every row has the "
                                                               "longest prompt's length")})
    st.plotly_chart(batches_chart(comparison, band, estimated), width="stretch", key="execute_batches_chart")


def lengths_table(lengths: pd.DataFrame) -> pd.DataFrame:
    """:func:`engine.execution.learned_output_lengths` written out: answer lengths in tokens, the share
    that ended before the cap as a percentage."""
    return pd.DataFrame({
        "model": lengths["model"], "category": lengths["category"], "queries": lengths["queries"],
        "median answer": lengths["median_output_tokens"].map(format_tokens),
        "mean answer": lengths["mean_output_tokens"].map(format_tokens),
        "90th percentile": lengths["p90_output_tokens"].map(format_tokens),
        "ended early": lengths["ended_early"].map(lambda share: format_percent(share, 0)),
    })


__all__ = ["batches_chart", "batches_table", "lengths_table", "show_band_check", "show_batches"]
