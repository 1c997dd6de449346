"""The state of a database at a glance, for the Home page and ``python -m engine status``."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from engine.store import Store


@dataclass(frozen=True)
class Overview:
    """Counts and the latest of each kind of record, read in one connection."""

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


def _latest(con, sql: str) -> dict | None:
    frame = con.execute(sql).df()
    return None if frame.empty else frame.iloc[0].to_dict()


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
        return Overview(
            db_path=str(store.path),
            schema_version=current_version(con),
            models=models,
            n_measurements=int(n_measurements),
            n_measurements_estimated=int(n_estimated),
            measured_pairs=pairs,
            latest_job=_latest(con, "SELECT id, model, device, status, reason, created_at FROM profiling_jobs ORDER BY id DESC LIMIT 1"),
            latest_fit=_latest(con, "SELECT id, model, device, target, form, cv_mape, created_at FROM fits ORDER BY id DESC LIMIT 1"),
            latest_plan=_latest(con, "SELECT id, status, energy_j, accuracy, created_at FROM plans ORDER BY id DESC LIMIT 1"),
            latest_execution=_latest(con, "SELECT id, plan_id, status, reason, created_at FROM executions ORDER BY id DESC LIMIT 1"),
        )
