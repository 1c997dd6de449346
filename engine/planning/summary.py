"""A solved plan as a person reads it: when each device runs which model, and how it
compares with the obvious alternatives (what it saves, and why an alternative misses the
targets). The Plan page draws these; nothing here solves anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from engine.formatting import format_accuracy, format_duration, format_percent
from engine.planning.options import PlanOption
from engine.planning.plan import Baseline, PlanResult, PlanSettings

#: Relative slack when checking a deadline (the solver's own tolerance).
_DEADLINE_TOLERANCE = 1e-7


#: Where an option's surfaces come from, as the Plan page's option table says it.
SOURCE_MEASURED, SOURCE_PUBLISHED, SOURCE_DEMO = "measured", "published", "demo"


def option_table(options: list[PlanOption], demo_models: set[str]) -> pd.DataFrame:
    """The options a plan may use, one readable row each, and whether each is used by default.

    Columns: option (model@device), model, device, source (measured, published: the
    paper's coefficients, demo: a demo model with random weights), accuracy (text),
    energy (measured, estimated or published), fit (form and CV MAPE), use. Demo models
    are not mixed with real ones: while any option is measured or published, demo options
    start unused (a person may still tick them).
    """
    rows = []
    for option in options:
        source = (SOURCE_PUBLISHED if option.published else SOURCE_DEMO if option.model in demo_models
                  else SOURCE_MEASURED)
        fit = option.energy_fit
        rows.append({
            "option": option.key, "model": option.model, "device": option.device, "source": source,
            "accuracy": format_accuracy(option.accuracy),
            "energy": ("published, no measurements" if option.published else
                       "estimated (no sensor)" if option.energy_estimated else "measured"),
            "fit": f"{fit.form}, CV MAPE {format_percent(fit.cv_mape)}" if fit.cv_mape is not None else fit.form,
        })
    table = pd.DataFrame(rows, columns=["option", "model", "device", "source", "accuracy", "energy", "fit"])
    real = table["source"] != SOURCE_DEMO
    table.insert(0, "use", real if real.any() else True)
    return table


def timeline_blocks(schedule: pd.DataFrame) -> pd.DataFrame:
    """Consecutive queries of one model on one device, as one block each.

    Takes a schedule (columns id, model, device, device_start_s, predicted_runtime_s) in
    run order per device. Returns columns device, model, start_s, end_s (seconds from the
    start of the run) and queries, one row per block, in the schedule's order.
    """
    columns = ["device", "model", "start_s", "end_s", "queries"]
    if schedule is None or schedule.empty:
        return pd.DataFrame(columns=columns)
    new_block = (schedule["model"] != schedule["model"].shift()) | (schedule["device"] != schedule["device"].shift())
    ends = schedule["device_start_s"] + schedule["predicted_runtime_s"]
    blocks = schedule.assign(block=new_block.cumsum(), end_s=ends).groupby("block", sort=True).agg(
        device=("device", "first"), model=("model", "first"), start_s=("device_start_s", "min"),
        end_s=("end_s", "max"), queries=("id", "size"))
    return blocks.reset_index(drop=True)[columns]


def baseline_misses(baseline: Baseline, settings: PlanSettings) -> list[str]:
    """Why a baseline misses the plan's targets, one short sentence per target missed.

    Empty when it meets them. A baseline that meets the mean accuracy and every deadline
    and is still not feasible gives some query a model below that query's own minimum.
    """
    if baseline.feasible:
        return []
    reasons = []
    target = settings.accuracy_target
    if target is not None and _finite(baseline.accuracy) and baseline.accuracy < target - 1e-7:
        reasons.append(f"mean accuracy {baseline.accuracy:.4f} is below the target {target:.3f}")
    per_device = baseline.per_device_runtime_s or {}
    for device, seconds in per_device.items():
        limit = settings.device_deadline(device)
        if limit is not None and _finite(seconds) and seconds > limit * (1 + _DEADLINE_TOLERANCE):
            reasons.append(f"{device} needs {format_duration(seconds)}, past its {format_duration(limit)} deadline")
    if not per_device and settings.deadline_s is not None and _finite(baseline.makespan_s) \
            and baseline.makespan_s > settings.deadline_s * (1 + _DEADLINE_TOLERANCE):
        # Plans stored before per-device times were kept: the busiest device against the common deadline.
        reasons.append(f"the busiest device needs {format_duration(baseline.makespan_s)}, past the "
                       f"{format_duration(settings.deadline_s)} deadline")
    if not reasons:
        reasons.append("some queries get a model below their own minimum accuracy")
    return reasons


@dataclass(frozen=True)
class BaselineComparison:
    """One alternative schedule beside the plan.

    energy_j, accuracy, makespan_s: the alternative's (J of the plan's energy scope, a
    fraction, s). saving: the share of the alternative's energy the plan saves (0.25 =
    25% less; negative when the plan uses more, e.g. with the ζ objective; None when
    either energy is unknown or the plan has no schedule). meets_targets: whether the
    alternative meets every target; misses: why not, in words. note: how it was built.
    """

    name: str
    energy_j: float
    accuracy: float
    makespan_s: float
    saving: float | None
    meets_targets: bool
    misses: tuple[str, ...]
    note: str


def compare_with_baselines(result: PlanResult) -> list[BaselineComparison]:
    """Every baseline of a plan with what the plan saves against it, cheapest first."""
    rows = []
    for name, baseline in result.baselines.items():
        saving = None
        if result.has_schedule and _finite(result.energy_j) and _finite(baseline.energy_j) and baseline.energy_j > 0:
            saving = 1.0 - result.energy_j / baseline.energy_j
        rows.append(BaselineComparison(
            name=name, energy_j=baseline.energy_j, accuracy=baseline.accuracy, makespan_s=baseline.makespan_s,
            saving=saving, meets_targets=baseline.feasible, misses=tuple(baseline_misses(baseline, result.settings)),
            note=baseline.note))
    return sorted(rows, key=lambda row: (not _finite(row.energy_j), row.energy_j if _finite(row.energy_j) else 0.0))


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["SOURCE_DEMO", "SOURCE_MEASURED", "SOURCE_PUBLISHED", "BaselineComparison", "baseline_misses",
           "compare_with_baselines", "option_table", "timeline_blocks"]
