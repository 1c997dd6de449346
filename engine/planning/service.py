"""Planning a stored or uploaded workload against the database: the one call the CLI and
the Plan page share, and how plans are stored, listed, loaded and written out."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from engine import safe_write
from engine.catalog import get_model
from engine.csvio import csv_text
from engine.errors import InputError, Problem
from engine.formatting import json_safe
from engine.planning.band import EnergyBand
from engine.planning.options import PlanOption, load_options, predict_options, with_load_costs
from engine.planning.plan import Baseline, ConstraintCost, PlanResult, PlanSettings, make_plan
from engine.planning.workload import Workload, planning_tokens, store_workload
from engine.store import Store, append_frame

SCHEDULE_COLUMNS = ("id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j",
                    "predicted_runtime_s", "accuracy", "device_start_s")
#: The schedule's batch columns (DESIGN.md: ``device_start_s[, batch_id, batch_size]``), written after those.
BATCH_COLUMNS = ("batch_id", "batch_size")


def choose_options(store: Store, settings: PlanSettings, only: list[str] | None = None,
                   load_costs: dict[str, tuple[float, float]] | None = None) -> tuple[list[PlanOption], list[str]]:
    """The options a plan may use: every fitted (model, device) with an accuracy at each batch
    size offered (``settings.batch_sizes``), or those named in ``only``: ``model@device`` (at
    every batch size offered for it) or ``model@device×B`` (at that one); with the planner's
    load costs."""
    options, notes = load_options(store, settings.energy_scope, settings.batch_sizes)
    if only:
        known = {o.key: o for o in options}
        pairs = {o.pair for o in options}
        unknown = [key for key in only if key not in known and key not in pairs]
        if unknown:
            raise InputError([Problem("options", f"{key!r} is not an available option", None,
                                      ", ".join(known) or "a fitted model@device") for key in unknown])
        wanted = set(only)
        options = [o for o in options if o.key in wanted or o.pair in wanted]
    if load_costs:
        options = with_load_costs(options, load_costs)
    return options, notes


def plan_workload(store: Store, workload: Workload, settings: PlanSettings, *,
                  default_output_tokens: int | None = None, only: list[str] | None = None,
                  load_costs: dict[str, tuple[float, float]] | None = None, tokenizer_factory=None,
                  save: bool = True, explain: bool = True, started: float | None = None) -> PlanResult:
    """Plan ``workload`` with the fitted options in ``store``; store workload and plan.

    ``started`` is when the workload finished parsing (defaults to now): ``plan_s`` of the
    result counts from then, through tokenizing, predicting, solving and the baselines.
    """
    started = time.perf_counter() if started is None else started
    settings.validate()
    options, notes = choose_options(store, settings, only, load_costs)
    if not options:
        predict_options([], {}, np.zeros(0))  # raises the "nothing to plan with" message
    entries = []
    for model in dict.fromkeys(o.model for o in options):
        entry = get_model(store, model)
        if entry is None:  # removed from the catalog between listing and planning
            raise InputError(Problem("options", f"{model!r} is no longer in the catalog", None, "a catalog model"))
        entries.append(entry)
    tokens = planning_tokens(workload, entries, default_output_tokens, tokenizer_factory=tokenizer_factory)
    predictions = predict_options(options, tokens.input_tokens, tokens.output_tokens)
    warnings = list(workload.warnings) + tokens.warnings + notes
    if workload.dropped:
        warnings.append(f"{len(workload.dropped)} bad row{'s were' if len(workload.dropped) > 1 else ' was'} "
                        "dropped from the workload before planning")
    result = make_plan(predictions, settings, query_ids=workload.queries["query_id"].to_numpy(dtype=object),
                       min_accuracy=workload.queries["min_accuracy"].to_numpy(dtype=float), explain=explain,
                       started=started, warnings=warnings)
    if save:
        workload_id = workload.workload_id
        if workload_id is None:
            workload_id = store_workload(store, workload)
            workload.workload_id = workload_id
        result.workload_id = workload_id
        result.plan_id = store_plan(store, result, workload_id)
    return result


# -- storage ----------------------------------------------------------------------------

def _json(value) -> str:
    return json.dumps(json_safe(value), allow_nan=False)


def store_plan(store: Store, result: PlanResult, workload_id: int | None) -> int:
    """The plan, its settings and baselines, and (when it has one) its schedule, in one transaction.

    The plans table's energy_j is the energy of the batches as formed, its gap that of the
    assignment problem (see :class:`PlanResult`); the params keep assignment_energy_j,
    formation_overhead_j, the batches per option, what batching saves, and the energy band
    with each batch's own half-width (:meth:`EnergyBand.to_dict`; :func:`stored_energy_band`).

    Baselines are stored whole (:meth:`Baseline.to_dict`); :func:`load_plan` also reads the
    shorter shape of plans stored before (energy_j, accuracy, makespan_s, feasible).
    """
    document = result.to_json()
    params = {key: document[key] for key in ("settings", "warnings", "diagnosis", "best_achievable",
                                             "constraint_costs", "plan_s", "energy_estimated", "objective_value",
                                             "objective_lower_bound", "per_device_runtime_s", "assignments",
                                             "assignment_energy_j", "formation_overhead_j", "n_batches", "batches",
                                             "batch_sizes", "batching_saving", "assignment_deadlines_s",
                                             "gap_as_asked")}
    params["options"] = result.options
    params["energy_band"] = None if result.energy_band is None else result.energy_band.to_dict()
    params["solver"] = result.solver
    baselines = {name: baseline.to_dict() for name, baseline in result.baselines.items()}
    settings = result.settings
    with store.transaction() as con:
        plan_id = int(con.execute(
            """INSERT INTO plans (workload_id, objective, energy_scope, accuracy_target, accuracy_mode, deadline_s,
                                  zeta, status, energy_j, lower_bound_j, gap, solve_s, accuracy, params, baselines)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
            [workload_id, settings.objective, settings.energy_scope, settings.accuracy_target, settings.accuracy_mode,
             settings.deadline_s, settings.zeta, result.status, document["energy_j"], document["lower_bound_j"],
             document["gap"], result.solve_s, document["accuracy"], _json(params), _json(baselines)]).fetchone()[0])
        if result.schedule is not None:
            rows = result.schedule.rename(columns={"id": "query_id"}).drop(columns=["clamped"])  # flagged in params
            rows.insert(0, "plan_id", plan_id)
            append_frame(con, "plan_assignments", rows)
    return plan_id


def list_plans(store: Store) -> pd.DataFrame:
    """Every stored plan, newest first, with its workload's name."""
    return store.query_df(
        """SELECT p.id, p.created_at, w.name AS workload, w.n_queries, p.status, p.objective, p.energy_scope,
                  p.accuracy_target, p.accuracy_mode, p.deadline_s, p.energy_j, p.lower_bound_j, p.gap, p.solve_s,
                  p.accuracy
           FROM plans p LEFT JOIN workloads w ON w.id = p.workload_id ORDER BY p.id DESC""")


def load_plan(store: Store, plan_id: int) -> tuple[dict, pd.DataFrame]:
    """A stored plan's row and its schedule in device order.

    The row's ``params`` is decoded, with ``params["constraint_costs"]`` as
    :class:`ConstraintCost`; its ``baselines`` are ``{name: Baseline}``. Plans stored before
    these types existed load the same way.
    """
    frame = store.query_df("SELECT *, CAST(params AS VARCHAR) AS params_text, CAST(baselines AS VARCHAR) AS "
                           "baselines_text FROM plans WHERE id = ?", [int(plan_id)])
    if frame.empty:
        raise InputError(Problem("plan", f"no plan with id {plan_id}", None, "an id from the list of plans"))
    row = frame.iloc[0].to_dict()
    row["params"] = json.loads(row.pop("params_text") or "{}")
    row["params"]["constraint_costs"] = [ConstraintCost.from_dict(c) for c in row["params"].get("constraint_costs") or []]
    row["baselines"] = {name: Baseline.from_dict(b) for name, b in json.loads(row.pop("baselines_text") or "{}").items()}
    schedule = store.query_df(
        """SELECT query_id AS id, model, device, input_tokens, output_tokens, predicted_energy_j, predicted_runtime_s,
                  accuracy, device_start_s, batch_id, batch_size, in_domain
           FROM plan_assignments WHERE plan_id = ? ORDER BY device, device_start_s, batch_id, rowid""", [int(plan_id)])
    return row, schedule


def stored_energy_band(store: Store, plan_id: int) -> EnergyBand | None:
    """The energy band a stored plan was made with (None for a plan without one: no schedule, a
    fit without held-out error, an imported schedule, or a plan stored before bands)."""
    row = store.query_one("SELECT CAST(params AS VARCHAR) FROM plans WHERE id = ?", [int(plan_id)])
    if row is None or not row[0]:
        return None
    return EnergyBand.from_dict(json.loads(row[0]).get("energy_band"))


def schedule_csv(schedule: pd.DataFrame) -> str:
    """The schedule CSV of DESIGN.md (with batch_id and batch_size where the schedule has them,
    plus in_domain), as text; ids and names that start like a spreadsheet formula get a leading
    quote (:func:`engine.csvio.csv_text`), which import removes. A stored plan from before
    batching has empty batch cells (each query runs on its own)."""
    extra = [c for c in (*BATCH_COLUMNS, "in_domain", "clamped") if c in schedule.columns]
    frame = schedule[list(SCHEDULE_COLUMNS) + extra].copy()
    for column in BATCH_COLUMNS:
        if column in frame.columns:  # whole numbers, empty where unknown (never "3.0")
            frame[column] = frame[column].astype("Int64")
    return csv_text(frame, float_format="%.6g")


def write_schedule(schedule: pd.DataFrame, path: str | Path, *, overwrite: bool = False,
                   inputs: Mapping[str, str | Path] | None = None, where: str | None = None) -> Path:
    """Write the schedule CSV by :func:`engine.safe_write.write_text`: a regular file or a
    new one, all or nothing; an existing file only with ``overwrite``, never one of ``inputs``."""
    return safe_write.write_text(Path(path), schedule_csv(schedule), overwrite=overwrite, inputs=inputs, where=where)
