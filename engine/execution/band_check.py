"""Did an execution land where its plan said it would? The measured total against the plan's
energy band, per execution and per batch, and the share rule, each in one plain sentence.

The band (:mod:`engine.planning.band`) is stored with the plan: its half-width for the whole
schedule, and each batch's own half-width. An execution compares like with like:

- every query of the plan measured: the measured total against the plan's half-width around
  the prediction of the queries that ran (the plan's energy may include load energy, which an
  execution does not measure; the half-width is the same, :meth:`EnergyBand.around`);
- only some measured (failed or stopped, or energy unknown for some): the plan's half-width is
  for all of its queries, so the batches that ran are judged by their own half-widths added
  (each batch's band is the same rule for that batch alone); when a batch that ran has no
  stored half-width, the verdict is unknown, never guessed;
- no band stored (an imported schedule, a fit without held-out error, a plan made before
  bands) or no energy measured: unknown, and the sentence says why.

The CLI's ``execute`` and the Execute page both print :meth:`BandCheck.sentence`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.execution.report import Comparison
from engine.formatting import format_count, format_energy, format_percent, json_safe
from engine.planning.band import EnergyBand
from engine.planning.service import stored_energy_band
from engine.store import Store

#: A verdict's scope: the plan's band for all of its queries, or the batches' own bands added.
PLAN_BAND = "plan"
BATCH_BANDS = "batches"

#: How each stored share rule (execution_batches.share_rule) reads in one sentence.
SHARE_RULE_SENTENCES = {
    "tokens processed": (
        "Each request's share of its batch's measured energy and runtime is in proportion to the tokens it "
        "processed (its prompt tokens plus the tokens it generated): the batch's energy × its tokens ÷ all the "
        "batch's tokens, so a batch of one shape is split equally and the shares add up to the batch's own "
        "measurement."),
}


@dataclass(frozen=True)
class BandCheck:
    """The measured total of an execution against its plan's energy band.

    measured_energy_j and predicted_energy_j: the totals compared (the queries with both a
    measurement and a prediction; None when none has). half_width_j, low_j, high_j: the band
    around predicted_energy_j (None when unknown). inside: whether the measured total lies in
    it (None when unknown: ``reason`` says why). scope: ``plan`` (every planned query measured,
    the plan's band) or ``batches`` (some measured, their batches' own bands added).
    n_compared and n_planned: queries compared and queries in the plan's band (None without
    a band). estimated: whether the measured energy is an estimate.
    """

    measured_energy_j: float | None
    predicted_energy_j: float | None
    half_width_j: float | None
    inside: bool | None
    scope: str | None
    n_compared: int
    n_planned: int | None
    estimated: bool
    reason: str | None = None

    @property
    def low_j(self) -> float | None:
        if self.half_width_j is None or self.predicted_energy_j is None:
            return None
        return max(0.0, self.predicted_energy_j - self.half_width_j)

    @property
    def high_j(self) -> float | None:
        if self.half_width_j is None or self.predicted_energy_j is None:
            return None
        return self.predicted_energy_j + self.half_width_j

    def sentence(self) -> str:
        """``Measured 41.2 J (estimated), predicted 39.8 J ± 5.2 J: inside the band (34.6 J to 45.0 J).``"""
        label = " (estimated)" if self.estimated else ""
        if self.measured_energy_j is None:
            return ("No energy was measured with a prediction beside it, so whether the run lies inside the plan's "
                    "band is unknown.")
        measured = f"Measured {format_energy(self.measured_energy_j)}{label}"
        if self.half_width_j is None:
            return f"{measured}, predicted {format_energy(self.predicted_energy_j)}: {self.reason}"
        where = (f"predicted {format_energy(self.predicted_energy_j)} ± {format_energy(self.half_width_j)} "
                 f"(±{format_percent(self.half_width_j / self.predicted_energy_j)})"
                 if self.predicted_energy_j else f"predicted {format_energy(self.predicted_energy_j)}")
        span = f"{format_energy(self.low_j)} to {format_energy(self.high_j)}"
        if self.inside:
            verdict = f"inside the band ({span})"
        elif self.measured_energy_j > self.high_j:
            verdict = f"outside the band ({span}), {format_energy(self.measured_energy_j - self.high_j)} above it"
        else:
            verdict = f"outside the band ({span}), {format_energy(self.low_j - self.measured_energy_j)} below it"
        scope = ""
        if self.scope == BATCH_BANDS:
            scope = (f" Only {self.n_compared} of {format_count(self.n_planned, 'query')} were measured, so the band "
                     "is that of the batches that ran (each batch's own band, added).")
        return f"{measured}, {where}: {verdict}.{scope}"

    def to_json(self) -> dict:
        """What ``execute --json`` gives as ``energy_band``."""
        return json_safe({"measured_energy_j": self.measured_energy_j, "predicted_energy_j": self.predicted_energy_j,
                          "half_width_j": self.half_width_j, "low_j": self.low_j, "high_j": self.high_j,
                          "inside": self.inside, "scope": self.scope, "n_compared": self.n_compared,
                          "n_planned": self.n_planned, "estimated": self.estimated, "reason": self.reason,
                          "sentence": self.sentence()})


def check_band(comparison: Comparison, band: EnergyBand | None) -> BandCheck:
    """The comparison's measured total against ``band`` (the plan's, or None); see the module docstring."""
    per_query = comparison.per_query
    paired = per_query["energy_j"].notna() & per_query["predicted_energy_j"].notna() if len(per_query) else []
    n_compared = int(np.sum(paired))
    common = dict(n_compared=n_compared, n_planned=None if band is None else band.n_queries,
                  estimated=comparison.energy_estimated)
    measured, predicted = comparison.measured_energy_j, comparison.predicted_energy_j
    if measured is None or predicted is None:
        return BandCheck(measured, predicted, None, None, None, reason="nothing to compare.", **common)
    if band is None:
        return BandCheck(measured, predicted, None, None, None,
                         reason="the plan has no energy band (an imported schedule, a fit without held-out error, "
                                "or a plan made before bands), so whether this lies inside it is unknown.", **common)
    if n_compared >= band.n_queries:
        low, high = band.around(predicted)
        return BandCheck(measured, predicted, band.half_width_j, bool(low <= measured <= high), PLAN_BAND, **common)
    batches = with_batch_bands(comparison.per_batch, band)
    ran = batches[batches["measured_energy_j"].notna() & batches["predicted_energy_j"].notna()]
    if ran.empty or ran["half_width_j"].isna().any():
        return BandCheck(measured, predicted, None, None, None,
                         reason=(f"only {n_compared} of {format_count(band.n_queries, 'query')} were measured and "
                                 "the plan's band is for all of them, so whether this part lies inside it is "
                                 "unknown."), **common)
    measured = float(ran["measured_energy_j"].sum())
    predicted = float(ran["predicted_energy_j"].sum())
    half = float(ran["half_width_j"].sum())
    inside = max(0.0, predicted - half) <= measured <= predicted + half
    return BandCheck(measured, predicted, half, bool(inside), BATCH_BANDS, **common)


def with_batch_bands(per_batch: pd.DataFrame, band: EnergyBand | None) -> pd.DataFrame:
    """:attr:`Comparison.per_batch` with each batch's own band: ``half_width_j`` (its stored
    half-width, NaN where unknown) and ``inside_band`` (True/False, None where unknown)."""
    widths = {} if band is None else band.batch_half_widths_j
    half = [widths.get(int(b), math.nan) if pd.notna(b) else math.nan for b in per_batch["batch_id"]]
    frame = per_batch.assign(half_width_j=pd.Series(half, index=per_batch.index, dtype=float))
    known = frame["half_width_j"].notna() & frame["measured_energy_j"].notna() & frame["predicted_energy_j"].notna()
    gap = (frame["measured_energy_j"] - frame["predicted_energy_j"]).abs()
    frame["inside_band"] = pd.Series([bool(g <= h) if k else None
                                      for g, h, k in zip(gap, frame["half_width_j"], known)],
                                     index=frame.index, dtype=object)
    return frame


def execution_band_check(store: Store, execution_id: int, comparison: Comparison) -> BandCheck:
    """:func:`check_band` against the band stored with the execution's plan."""
    return check_band(comparison, execution_energy_band(store, execution_id))


def execution_energy_band(store: Store, execution_id: int) -> EnergyBand | None:
    """The band stored with an execution's plan (None without one)."""
    row = store.query_one("SELECT plan_id FROM executions WHERE id = ?", [int(execution_id)])
    return None if row is None else stored_energy_band(store, int(row[0]))


def share_rule_sentence(rules) -> str | None:
    """How each request's share of its batch was taken, in one sentence, for the share rules an
    execution's batches were stored with (None when it has no batch of more than one request)."""
    known = sorted({r for r in rules if isinstance(r, str) and r})
    if not known:
        return None
    other = "Each request's share of its batch's energy was taken by the rule \"{}\"."
    return " ".join(SHARE_RULE_SENTENCES.get(rule, other.format(rule)) for rule in known)


__all__ = ["BATCH_BANDS", "PLAN_BAND", "SHARE_RULE_SENTENCES", "BandCheck", "check_band",
           "execution_band_check", "execution_energy_band", "share_rule_sentence", "with_batch_bands"]
