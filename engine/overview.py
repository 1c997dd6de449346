"""The state of a database at a glance, for the Home page and ``python -m engine status``,
and the small readers the pages need (so no page holds SQL)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from engine.formatting import format_count, format_energy, format_percent, format_timestamp
from engine.store import Store


@dataclass(frozen=True)
class Overview:
    """Counts and the latest of each kind of record, read in one connection.

    ``has_measured_fits``: some model has surfaces fitted from measurements (not only
    published coefficients).
    """

    db_path: str
    schema_version: int
    models: pd.DataFrame
    n_measurements: int
    n_measurements_estimated: int
    measured_pairs: pd.DataFrame = field(repr=False)
    latest_job: dict | None
    latest_fit: dict | None
    latest_plan: dict | None
    latest_execution: dict | None
    has_measured_fits: bool = False


def _latest(con, sql: str) -> dict | None:
    frame = con.execute(sql).df()
    return None if frame.empty else frame.iloc[0].to_dict()


_LATEST_JOB = """SELECT id, model, device, status, reason, points_done, points_total, created_at
                 FROM profiling_jobs ORDER BY id DESC LIMIT 1"""
_LATEST_FIT = """SELECT id, model, device, energy_scope, target, form, cv_mape, source, created_at
                 FROM fits ORDER BY id DESC LIMIT 1"""
_LATEST_PLAN = """SELECT p.id, p.status, p.energy_j, p.accuracy, p.energy_scope, w.name AS workload, w.n_queries,
                         p.created_at
                  FROM plans p LEFT JOIN workloads w ON w.id = p.workload_id ORDER BY p.id DESC LIMIT 1"""
_LATEST_EXECUTION = """SELECT id, plan_id, status, reason, queries_done, queries_total, created_at
                       FROM executions ORDER BY id DESC LIMIT 1"""


def read_overview(store: Store) -> Overview:
    """Everything the Home page shows, from one short connection."""
    from engine.store.db import current_version

    with store.connect() as con:
        models = con.execute(
            "SELECT name, backend, accuracy, accuracy_source, params_b, is_demo FROM models ORDER BY name"
        ).df()
        n_measurements, n_estimated = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE energy_source = 'estimated') FROM measurements"
        ).fetchone()
        pairs = con.execute(
            """SELECT model, device, count(*) AS trials, min(recorded_at) AS first, max(recorded_at) AS last
               FROM measurements GROUP BY model, device ORDER BY model, device"""
        ).df()
        measured_fits = con.execute("SELECT count(*) FROM fits WHERE source = 'measured'").fetchone()[0]
        return Overview(
            db_path=str(store.path),
            schema_version=current_version(con),
            models=models,
            n_measurements=int(n_measurements),
            n_measurements_estimated=int(n_estimated),
            measured_pairs=pairs,
            latest_job=_latest(con, _LATEST_JOB),
            latest_fit=_latest(con, _LATEST_FIT),
            latest_plan=_latest(con, _LATEST_PLAN),
            latest_execution=_latest(con, _LATEST_EXECUTION),
            has_measured_fits=bool(measured_fits),
        )


# -- the latest work, in words ----------------------------------------------------------------

@dataclass(frozen=True)
class LatestWork:
    """One line of "Latest work": ``kind`` (Profiling job, Fit, Plan, Execution) and ``text``,
    every figure with its unit ("none yet" when there is none)."""

    kind: str
    text: str
    record_id: int | None = None


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and value is not pd.NaT \
        and value is not pd.NA


def _job_text(job: dict) -> str:
    text = f"#{job['id']} {job['model']} on {job['device']}, {job['status']}"
    if _known(job.get("points_total")):
        text += f" ({int(job.get('points_done') or 0)} of {format_count(job['points_total'], 'point')})"
    if _known(job.get("reason")):
        text += f": {job['reason']}"
    return text + f"; created {format_timestamp(job['created_at'])}"


def _fit_text(fit: dict) -> str:
    what = f"energy ({fit['energy_scope']})" if fit["target"] == "energy" else fit["target"]
    quality = ("published coefficients" if fit.get("source") == "published"
               else f"CV MAPE {format_percent(fit['cv_mape'])}")
    return (f"#{fit['id']} {fit['model']} on {fit['device']}, {what}: form {fit['form']}, {quality}; "
            f"{format_timestamp(fit['created_at'])}")


def _plan_text(plan: dict) -> str:
    text = f"#{plan['id']} {plan['status']}"
    if _known(plan.get("n_queries")):
        text += f", {format_count(plan['n_queries'], 'query')}" + (
            f" of {plan['workload']}" if _known(plan.get("workload")) else "")
    if _known(plan.get("energy_j")):
        text += f": {format_energy(plan['energy_j'])} predicted ({plan.get('energy_scope') or 'total'} energy)"
    if _known(plan.get("accuracy")):
        text += f", mean accuracy {plan['accuracy']:.4f}"
    return text + f"; {format_timestamp(plan['created_at'])}"


def _execution_text(execution: dict) -> str:
    text = f"#{execution['id']} of plan #{execution['plan_id']}, {execution['status']}"
    if _known(execution.get("queries_total")):
        text += f" ({int(execution.get('queries_done') or 0)} of {format_count(execution['queries_total'], 'query')})"
    if _known(execution.get("reason")):
        text += f": {execution['reason']}"
    return text + f"; started {format_timestamp(execution['created_at'])}"


def latest_work(view: Overview) -> list[LatestWork]:
    """The latest profiling job, fit, plan and execution, each in one line with units and local times."""
    lines = []
    for kind, record, write in (("Profiling job", view.latest_job, _job_text), ("Fit", view.latest_fit, _fit_text),
                                ("Plan", view.latest_plan, _plan_text),
                                ("Execution", view.latest_execution, _execution_text)):
        lines.append(LatestWork(kind, "none yet") if record is None
                     else LatestWork(kind, write(record), int(record["id"])))
    return lines


# -- small readers for the pages ------------------------------------------------------------------

def count_executed_measurements(store: Store) -> int:
    """How many measurements were taken while executing plans (real requests, not profiling trials)."""
    return int(store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0])


def data_version(store: Store) -> tuple:
    """A marker that changes whenever models, measurements or fits change: a key for the pages' caches.

    Rows are only ever added or removed here (a fit is never edited in place), so the count
    and the largest id of each table catch every change; a model's edit bumps its
    ``updated_at``.
    """
    return tuple(store.query_one(
        """SELECT (SELECT count(*) FROM measurements), (SELECT max(id) FROM measurements),
                  (SELECT count(*) FROM fits), (SELECT max(id) FROM fits),
                  (SELECT count(*) FROM models), (SELECT CAST(max(updated_at) AS VARCHAR) FROM models)"""))
