"""A solved plan as a person reads it: when each device runs which model, and how it
compares with the obvious alternatives (what it saves, and why an alternative misses the
targets). The Plan page draws these; nothing here solves anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from engine.formatting import format_accuracy, format_duration, format_energy, format_percent
from engine.planning.band import gap_text
from engine.planning.options import PlanOption
from engine.planning.plan import SAME_PLAN_AT_BATCH_ONE, Baseline, PlanResult, PlanSettings

#: Relative slack when checking a deadline (the solver's own tolerance).
_DEADLINE_TOLERANCE = 1e-7


#: Where an option's surfaces come from, as the Plan page's option table says it.
SOURCE_MEASURED, SOURCE_PUBLISHED, SOURCE_DEMO = "measured", "published", "demo"


def option_table(options: list[PlanOption], demo_models: set[str]) -> pd.DataFrame:
    """The options a plan may use, one readable row per model on a device, and whether each is used by default.

    Columns: option (model@device), model, device, batch sizes (those the plan may use, in
    words: ``1, 2, 4, 8, 16``, or ``1 (profiled at batch size 1 only)``), source (measured,
    published: the paper's coefficients, demo: a demo model with random weights), accuracy
    (text), energy (measured, estimated or published), fit (form and CV MAPE), use. Demo
    models are not mixed with real ones: while any option is measured or published, demo
    options start unused (a person may still tick them).
    """
    rows = {}
    for option in options:
        if option.pair in rows:
            rows[option.pair]["sizes"].append(option.batch_size)
            continue
        source = (SOURCE_PUBLISHED if option.published else SOURCE_DEMO if option.model in demo_models
                  else SOURCE_MEASURED)
        fit = option.energy_fit
        rows[option.pair] = {
            "option": option.pair, "model": option.model, "device": option.device, "sizes": [option.batch_size],
            "batch axis": option.has_batch_axis, "source": source, "accuracy": format_accuracy(option.accuracy),
            "energy": ("published, no measurements" if option.published else
                       "estimated (no sensor)" if option.energy_estimated else "measured"),
            "fit": f"{fit.form}, CV MAPE {format_percent(fit.cv_mape)}" if fit.cv_mape is not None else fit.form,
        }
    for row in rows.values():
        sizes = sorted(set(row.pop("sizes")))
        batch_axis = row.pop("batch axis")
        row["batch sizes"] = ", ".join(map(str, sizes)) + ("" if batch_axis else " (profiled at batch size 1 only)")
    columns = ["option", "model", "device", "batch sizes", "source", "accuracy", "energy", "fit"]
    table = pd.DataFrame(list(rows.values()), columns=columns)
    real = table["source"] != SOURCE_DEMO
    table.insert(0, "use", real if real.any() else True)
    return table


def split_option_key(key: str) -> tuple[str, int]:
    """``model@device×B`` -> (``model@device``, B); ``model@device`` -> (it, 1)."""
    pair, _, size = key.partition("×")
    return pair, int(size) if size else 1


def _with_batches(schedule: pd.DataFrame) -> pd.DataFrame:
    """The schedule with each row's batch (its batch_id; a row without one is a batch of its own)
    and the batch's end: its start plus its whole runtime (the sum of its members' shares)."""
    if "batch_id" in schedule.columns:
        alone = -pd.Series(range(1, len(schedule) + 1), index=schedule.index, dtype=float)
        batch = schedule["batch_id"].astype(float).where(schedule["batch_id"].notna(), alone)
    else:
        batch = -pd.Series(range(1, len(schedule) + 1), index=schedule.index, dtype=float)
    runtime = schedule["predicted_runtime_s"].groupby(batch).transform("sum")
    start = schedule["device_start_s"].groupby(batch).transform("min")
    return schedule.assign(batch=batch, end_s=start + runtime)


def timeline_blocks(schedule: pd.DataFrame) -> pd.DataFrame:
    """Consecutive queries of one model on one device, as one block each.

    Takes a schedule (columns id, model, device, device_start_s, predicted_runtime_s, and
    batch_id where it has batches) in run order per device. A batch runs from its start for its
    whole runtime (its members' shares add up to it). Returns columns device, model, start_s,
    end_s (seconds from the start of the run) and queries, one row per block, in the
    schedule's order.
    """
    columns = ["device", "model", "start_s", "end_s", "queries"]
    if schedule is None or schedule.empty:
        return pd.DataFrame(columns=columns)
    new_block = (schedule["model"] != schedule["model"].shift()) | (schedule["device"] != schedule["device"].shift())
    blocks = _with_batches(schedule).assign(block=new_block.cumsum()).groupby("block", sort=True).agg(
        device=("device", "first"), model=("model", "first"), start_s=("device_start_s", "min"),
        end_s=("end_s", "max"), queries=("id", "size"))
    return blocks.reset_index(drop=True)[columns]


def timeline_batches(schedule: pd.DataFrame) -> pd.DataFrame:
    """One row per batch, in the schedule's order: device, model, batch_id (NA for a query
    outside any batch), start_s, end_s (its start plus its whole runtime) and queries (its members)."""
    columns = ["device", "model", "batch_id", "start_s", "end_s", "queries"]
    if schedule is None or schedule.empty:
        return pd.DataFrame(columns=columns)
    frame = _with_batches(schedule)
    batches = frame.groupby("batch", sort=False).agg(
        device=("device", "first"), model=("model", "first"), start_s=("device_start_s", "min"),
        end_s=("end_s", "max"), queries=("id", "size")).reset_index()
    batches["batch_id"] = batches["batch"].where(batches["batch"] > 0).astype("Int64")
    return batches[columns]


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


# -- the batching lever ----------------------------------------------------------------------------

def offers_batches(result: PlanResult) -> bool:
    """Some option of the plan was offered a batch size above 1."""
    return any(size > 1 for sizes in result.batch_sizes.values() for size in sizes)


def _sizes_text(sizes: pd.Series) -> str:
    """``2 × 16, 1 × 7``: how many batches of each size, largest first; ``one at a time`` for all 1."""
    counts = sizes.value_counts().sort_index(ascending=False)
    if list(counts.index) == [1]:
        return "one at a time"
    return ", ".join(f"{count} × {size}" for size, count in counts.items())


def option_usage(result: PlanResult) -> pd.DataFrame:
    """Per model@device the plan uses: the batch size(s) it was planned at, queries, batches and
    the sizes they were formed at, and their predicted energy and time.

    Columns: option, batch size (text: ``16``, or ``16 and 4`` when the plan uses several at
    one model on a device), queries, batches, formed (``2 × 16, 1 × 7``), energy_j, runtime_s.
    """
    columns = ["option", "batch size", "queries", "batches", "formed", "energy_j", "runtime_s"]
    schedule = result.schedule
    if schedule is None or schedule.empty:
        return pd.DataFrame(columns=columns)
    planned: dict[str, list[int]] = {}
    for key in result.assignments:
        pair, size = split_option_key(key)
        planned.setdefault(pair, []).append(size)
    frame = _with_batches(schedule).assign(option=schedule["model"] + "@" + schedule["device"])
    rows = []
    for option, part in frame.groupby("option", sort=False):
        members = part.groupby("batch").size()  # the requests each batch holds
        rows.append({"option": option,
                     "batch size": " and ".join(map(str, sorted(planned.get(option, [1]), reverse=True))),
                     "queries": len(part), "batches": len(members), "formed": _sizes_text(members),
                     "energy_j": float(part["predicted_energy_j"].sum()),
                     "runtime_s": float(part["predicted_runtime_s"].sum())})
    return pd.DataFrame(rows, columns=columns)


@dataclass(frozen=True)
class SingleOption:
    """One model on a device running every query on its own, at its best batch size.

    option: model@device; batch_size: the size of its cheapest schedule (among those that meet
    the targets when any does); energy_j; saving: the share of its energy the plan saves
    (None when unknown); meets_targets; misses: why not, in words.
    """

    option: str
    batch_size: int
    energy_j: float
    saving: float | None
    meets_targets: bool
    misses: tuple[str, ...]

    @property
    def model(self) -> str:
        return self.option.rsplit("@", 1)[0]

    @property
    def device(self) -> str:
        return self.option.rsplit("@", 1)[1]


def single_options_at_best_batch(result: PlanResult) -> list[SingleOption]:
    """Every model on a device of the plan with every query on it, at its best batch size (the
    one whose schedule costs least among those that meet the targets, else least of all),
    cheapest first; what a person could do by hand with one model."""
    by_pair: dict[str, list[tuple[int, BaselineComparison]]] = {}
    for row in compare_with_baselines(result):
        if row.name.startswith("only "):
            pair, size = split_option_key(row.name[len("only "):])
            by_pair.setdefault(pair, []).append((size, row))
    singles = []
    for pair, rows in by_pair.items():
        known = [(size, row) for size, row in rows if _finite(row.energy_j)]
        if not known:
            continue
        meeting = [(size, row) for size, row in known if row.meets_targets]
        size, row = min(meeting or known, key=lambda item: item[1].energy_j)
        singles.append(SingleOption(option=pair, batch_size=size, energy_j=row.energy_j, saving=row.saving,
                                    meets_targets=row.meets_targets, misses=row.misses))
    return sorted(singles, key=lambda single: (not single.meets_targets, single.energy_j))


def batching_sentences(result: PlanResult) -> list[str]:
    """What batching does for this plan, in a few sentences (markdown): what it saves against the
    same plan at batch size 1 and against the best single option at its best batch size; or, when
    no option batches, that plans are at batch size 1 and how to profile batch sizes."""
    if not offers_batches(result):
        return ["Plans here are at batch size 1: no model was profiled at several batch sizes. To plan batches, "
                "profile at several (the Profile page and `python -m engine profile --model M --device D` measure "
                "batch sizes 1 to 32 by default; for the demo models, the Home page's *Measure batching*) and fit "
                "again."]
    lines = []
    same = result.baselines.get(SAME_PLAN_AT_BATCH_ONE)
    if result.batching_saving is not None and same is not None:
        lines.append(f"Batching saves **{format_percent(result.batching_saving)}** against the same plan at batch 1 "
                     f"({format_energy(same.energy_j)}).")
    elif same is not None:
        lines.append(f"The same plan at batch 1 has no schedule: {same.note}.")
    best = next((single for single in single_options_at_best_batch(result) if single.meets_targets), None)
    if best is not None:
        saving = ("" if best.saving is None else
                  f"; this plan saves {format_percent(best.saving)} against it" if best.saving >= 0 else
                  f"; this plan uses {format_percent(-best.saving)} more (its objective is not energy alone)")
        where = best.model if len(result.per_device_runtime_s) <= 1 else f"{best.model} on {best.device}"
        how = (f"batch everything on {where} at B={best.batch_size}" if best.batch_size > 1
               else f"run everything on {where}, one request at a time")
        lines.append(f"The best a user could do by hand: {how}: {format_energy(best.energy_j)}{saving}.")
    else:
        lines.append("No single model, at any batch size, meets the targets on its own.")
    return lines


def gap_sentence(result: PlanResult) -> str:
    """Which problem the proven gap is for, in words: the assignment's (per-request costs) and what
    forming the batches added, or the schedule's own when every batch holds one query."""
    if result.gap is None:
        return ""
    if not offers_batches(result):
        return (f"The schedule is within {gap_text(result.gap)} of the optimum of its predictions (proven)."
                if result.gap > 0 else
                "The schedule is the optimum of its predictions (proven: gap 0).")
    added = ""
    if _finite(result.formation_overhead_j) and _finite(result.assignment_energy_j) and result.assignment_energy_j:
        added = (f"; forming the batches from the queries' real lengths adds "
                 f"{format_percent(result.formation_overhead_j / result.assignment_energy_j)}")
    if result.gap > 0:
        return f"The assignment is within {gap_text(result.gap)} of optimal for per-request costs (proven){added}."
    return f"The assignment is optimal for per-request costs (proven: gap 0){added}."


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["SOURCE_DEMO", "SOURCE_MEASURED", "SOURCE_PUBLISHED", "BaselineComparison", "SingleOption",
           "baseline_misses", "batching_sentences", "compare_with_baselines", "gap_sentence", "offers_batches",
           "option_table", "option_usage", "single_options_at_best_batch", "split_option_key", "timeline_batches",
           "timeline_blocks"]
