"""How sure a plan's predicted energy is: the range its measured total is expected in.

A plan's energy is a prediction of the fits, and the proof's gap says only how close the
schedule is to the optimum *of those predictions*. The band says how far the measurement may
fall from them. Its half-width adds three parts (``plan --json``: ``energy_band_j``):

1. **Held-out error, systematic:** Σ over the (model, device) pairs used of the energy fit's
   cross-validated MAPE × the energy the pair carries. Summed, not root-sum-squared: a fit's
   error is mostly a bias shared by every query it predicts (the same model, host, threads and
   warm state), and the fits of one host move together. Seen on this VM (issue 15): both demo
   models under-predicted (+16.7% and +30.5%), the per-query errors' median +18.8%, so neither
   averages out over many queries.
2. **The fits' coefficient uncertainty:** Σ over the batches of 1.645 × the standard error of
   the fitted surface at the batch (the bootstrap covariance of the coefficients). Summed too:
   the same coefficients move every batch of a fit the same way.
3. **Trial-to-trial noise:** 1.645 × √Σ over the batches of (noise_rel_sd × the batch's
   energy)². Root-sum-squared: separate batches' noise is independent.

(2) and (3) are the parts of each batch's 90% prediction interval
(:meth:`engine.fitting.result.FitResult.uncertainty`, at the batch's shape and size), split
by what is shared and what is not. The three are added: the band is meant to hold the measured
total, so it is conservative (the held-out error already contains some noise). Load energy,
when counted, is the planner's own figure and adds no width. The band is unknown (None, never
a zero width) when a pair's energy fit has no held-out error (the published profiles);
batches whose fit gives no 90% interval (no repeated trials) count with parts (1) only, and
the band says how many.

A batch's own band (for comparing an executed batch) follows the same rule for it alone: its
pair's MAPE × its energy, plus its 90% half-width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.fitting.result import Z_90
from engine.formatting import format_energy, format_percent, json_safe
from engine.planning.batches import RAGGED, batch_rule

#: The rule in one sentence, as the README, the page and the JSON say it.
BAND_RULE = ("predicted energy ± (Σ per model and device of its fit's held-out MAPE × the energy it carries "
             "+ Σ per batch of 1.645 × the fit's standard error there + 1.645 × √Σ per batch of "
             "(trial noise × its energy)²)")


@dataclass(frozen=True)
class EnergyBand:
    """The range a plan's measured total energy is expected in (see the module docstring).

    energy_j: the plan's predicted energy (the band's centre; load energy included when
    counted). half_width_j = heldout_j + coefficient_j + noise_j, each a part of the rule, J.
    schedule_energy_j: the predicted energy of the schedule's queries alone (what an
    execution measures: no load energy). n_queries: the queries it covers.
    batches_without_interval: batches whose fit gives no 90% interval (counted by the
    held-out error alone). batch_half_widths_j: per batch id, the batch's own half-width.
    """

    energy_j: float
    half_width_j: float
    heldout_j: float
    coefficient_j: float
    noise_j: float
    schedule_energy_j: float
    n_queries: int
    batches_without_interval: int = 0
    batch_half_widths_j: dict[int, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def low_j(self) -> float:
        """The lower end (never below 0)."""
        return max(0.0, self.energy_j - self.half_width_j)

    @property
    def high_j(self) -> float:
        return self.energy_j + self.half_width_j

    @property
    def relative(self) -> float:
        """The half-width as a fraction of the predicted energy (0.12 = ±12%)."""
        return self.half_width_j / self.energy_j if self.energy_j > 0 else math.inf

    def around(self, predicted_j: float) -> tuple[float, float]:
        """The same half-width around another prediction of the same queries (an execution's)."""
        return max(0.0, predicted_j - self.half_width_j), predicted_j + self.half_width_j

    def contains(self, measured_j: float, predicted_j: float | None = None) -> bool:
        """Whether ``measured_j`` lies in the band around ``predicted_j`` (default: the plan's energy)."""
        low, high = self.around(self.energy_j if predicted_j is None else predicted_j)
        return low <= measured_j <= high

    def to_json(self) -> dict:
        """The summary ``plan --json`` gives beside ``energy_band_j`` (no per-batch list)."""
        return json_safe({"energy_j": self.energy_j, "low_j": self.low_j, "high_j": self.high_j, "half_width_j": self.half_width_j,
                          "relative": self.relative, "heldout_j": self.heldout_j,
                          "coefficient_j": self.coefficient_j, "noise_j": self.noise_j,
                          "schedule_energy_j": self.schedule_energy_j, "n_queries": self.n_queries,
                          "batches_without_interval": self.batches_without_interval, "rule": BAND_RULE})

    def to_dict(self) -> dict:
        """Everything, per-batch half-widths included (what a stored plan keeps)."""
        document = self.to_json()
        document["batch_half_widths_j"] = {str(k): float(f"{v:.6g}") for k, v in self.batch_half_widths_j.items()}
        return document

    @classmethod
    def from_dict(cls, data: dict | None) -> "EnergyBand | None":
        """A stored band back (None for a plan stored without one)."""
        if not data or data.get("half_width_j") is None:
            return None
        return cls(energy_j=float(data["energy_j"]), half_width_j=float(data["half_width_j"]),
                   heldout_j=float(data["heldout_j"]),
                   coefficient_j=float(data["coefficient_j"]), noise_j=float(data["noise_j"]),
                   schedule_energy_j=float(data["schedule_energy_j"]), n_queries=int(data["n_queries"]),
                   batches_without_interval=int(data.get("batches_without_interval") or 0),
                   batch_half_widths_j={int(k): float(v) for k, v in (data.get("batch_half_widths_j") or {}).items()})


def plan_energy_band(schedule: pd.DataFrame, options, energy_j: float) -> EnergyBand | None:
    """The band of a plan: its ``schedule`` (columns model, device, input_tokens, output_tokens,
    predicted_energy_j, batch_id), the options it was planned with (their energy fits and
    backends) and its predicted ``energy_j``. None when a pair used has no held-out error or
    the plan has no schedule."""
    if schedule is None or schedule.empty or energy_j is None or not math.isfinite(energy_j):
        return None
    by_pair = {o.pair: o for o in options}
    frame = schedule.assign(pair=schedule["model"] + "@" + schedule["device"])
    if "batch_id" not in frame.columns or frame["batch_id"].isna().any():
        frame = frame.assign(batch_id=np.arange(1, len(frame) + 1))
    heldout = 0.0
    coefficient = 0.0
    noise_squared = 0.0
    without = 0
    batch_half = {}
    for pair, part in frame.groupby("pair", sort=False):
        option = by_pair.get(pair)
        cv = None if option is None else option.energy_fit.cv_mape
        if cv is None or not math.isfinite(cv):
            return None
        batches = _batch_parts(part, option)
        heldout += cv * float(part["predicted_energy_j"].sum())
        known = batches["interval_j"].notna()
        without += int((~known).sum())
        coefficient += float(batches.loc[known, "coefficient_j"].sum())
        noise_squared += float((batches.loc[known, "noise_j"] ** 2).sum())
        own = cv * batches["energy_j"] + batches["interval_j"].fillna(0.0)
        batch_half.update({int(b): float(h) for b, h in zip(batches.index, own)})
    noise = math.sqrt(noise_squared)
    return EnergyBand(energy_j=float(energy_j), half_width_j=heldout + coefficient + noise, heldout_j=heldout,
                      coefficient_j=coefficient, noise_j=noise,
                      schedule_energy_j=float(schedule["predicted_energy_j"].sum()), n_queries=len(schedule),
                      batches_without_interval=without, batch_half_widths_j=batch_half)


def _batch_parts(part: pd.DataFrame, option) -> pd.DataFrame:
    """Per batch of one pair (index batch_id): energy_j (its members' predictions summed), and the
    parts of its 90% interval at its shape and size: coefficient_j (1.645·SE), noise_j
    (1.645·noise_rel_sd·energy), interval_j (1.645·√(SE² + noise²)); NaN where the fit gives no
    interval. The shape is the prediction rule's (:mod:`engine.planning.batches`): padded, the
    longest prompt and answer; ragged, each member's own prompt at the longest answer, averaged
    (the mean of the members' standard errors: an upper bound of the mean's)."""
    fit = option.energy_fit
    batch = part["batch_id"]
    grouped = part.groupby(batch, sort=False)
    energy = grouped["predicted_energy_j"].sum()
    index = energy.index
    if fit.coef_cov is None or fit.noise_rel_sd is None:
        unknown = np.full(len(index), np.nan)
        return pd.DataFrame({"energy_j": energy.to_numpy(), "coefficient_j": unknown, "noise_j": unknown,
                             "interval_j": unknown}, index=index)
    size = grouped.size().reindex(index)
    longest_out = grouped["output_tokens"].max().reindex(index)
    if batch_rule(option.backend) == RAGGED:
        per_row = fit.standard_error(part["input_tokens"].to_numpy(), batch.map(longest_out).to_numpy(),
                                     batch.map(size).to_numpy())
        se = pd.Series(per_row, index=part.index).groupby(batch, sort=False).mean().reindex(index).to_numpy()
    else:
        longest_in = grouped["input_tokens"].max().reindex(index)
        se = fit.standard_error(longest_in.to_numpy(), longest_out.to_numpy(), size.to_numpy())
    noise = fit.noise_rel_sd * energy.to_numpy()
    return pd.DataFrame({"energy_j": energy.to_numpy(), "coefficient_j": Z_90 * se, "noise_j": Z_90 * noise,
                         "interval_j": Z_90 * np.sqrt(se * se + noise * noise)}, index=index)


# -- in words ---------------------------------------------------------------------------------

def band_sentence(band: EnergyBand | None, estimated: bool = False) -> str:
    """``Expected to measure 430 J to 540 J (±11.3%).`` or why the band is unknown."""
    if band is None:
        return ("How far the measurement may fall from this prediction is unknown: the published profiles carry no "
                "held-out error.")
    label = ", estimated energy" if estimated else ""
    return (f"Expected to measure between {format_energy(band.low_j)} and {format_energy(band.high_j)} "
            f"(±{format_percent(band.relative)}{label}), from the fits' held-out error and their 90% bands.")


def gap_text(gap: float) -> str:
    """A proven gap in words: ``0.0012%``; ``0%``; ``less than 0.0001%`` below what 4 decimals show."""
    if gap <= 0:
        return "0%"
    if gap < 5e-7:
        return "less than 0.0001%"
    return format_percent(gap, 4)


def uncertainty_against_gap(band: EnergyBand | None, gap: float | None) -> str:
    """Which is larger, in words: the prediction's uncertainty or the proof's gap."""
    if gap is None or not math.isfinite(gap):
        return ""
    proven = gap_text(gap)
    if band is None:
        return f"Only the proof's gap ({proven}) is known; the prediction's uncertainty is not."
    ratio = band.relative / gap if gap > 0 else math.inf
    width = f"±{format_percent(band.relative)}"
    if ratio >= 10:
        return (f"The prediction's uncertainty ({width}) is far larger than the proof's gap ({proven}): the "
                "schedule is as good as the fits can tell; better fits, not a longer solve, would sharpen it.")
    if ratio >= 1:
        return f"The prediction's uncertainty ({width}) is larger than the proof's gap ({proven})."
    return (f"The proof's gap ({proven}) is larger than the prediction's uncertainty ({width}): a longer solve "
            "could still find a cheaper schedule.")


__all__ = ["BAND_RULE", "EnergyBand", "band_sentence", "gap_text", "plan_energy_band", "uncertainty_against_gap"]
