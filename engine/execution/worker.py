"""The worker process of an execution: ``python -m engine.execution.worker --db PATH --execution ID``.

One thread per device, devices in parallel. On each device the queries run in the
schedule's order, grouped by model so each model is loaded once; a prompt is answered as
given (capped at the planned output length), a token-count query runs a synthetic prompt of
exactly that length. Each query's result (answer, actual token counts, runtime, energy with
its source, the prediction it had) is stored the moment it is measured, together with a
measurement row (origin 'executed') so a refit can learn from it. A query that fails alone
(out of memory, too long for the context) is stored with its error and the run goes on.
SIGTERM stops every device after its query in flight. Queries already stored are skipped
(resume).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from collections.abc import Callable

import numpy as np
import pandas as pd

from engine import __version__, catalog
from engine.backends import open_backend
from engine.energy import measure_idle_power, open_meter
from engine.errors import InputError, PlannerError, TokenCountMismatchError
from engine.execution.jobs import get_execution, plan_queries, set_status
from engine.fitting import load_latest_fits
from engine.profiling.jobs import host_name
from engine.profiling.worker import device_lock
from engine.store import Store, append_frame

IDLE_S = 2.0
# Device threads write one at a time: two transactions updating the execution's row at once
# would conflict in DuckDB and roll one back.
_WRITE_LOCK = threading.Lock()


class ExecutionCancelled(Exception):
    """The execution was asked to stop."""


def _uncertainty(store: Store, queries: pd.DataFrame) -> np.ndarray:
    """Half-width of the 90% prediction interval of each query's energy, from the current fits (NaN if none)."""
    out = np.full(len(queries), np.nan)
    fits = {(f.model, f.device): f for f in load_latest_fits(store, energy_scope="total") if f.target == "energy"}
    for (model, device), rows in queries.groupby(["model", "device"]).indices.items():
        fit = fits.get((model, device))
        if fit is not None:
            out[rows] = fit.uncertainty(queries.input_tokens.to_numpy()[rows], queries.output_tokens.to_numpy()[rows])
    return out


def run_device(store: Store, execution_id: int, device: str, queries: pd.DataFrame, stop: threading.Event, *,
               backend_factory: Callable = open_backend, meter_factory: Callable = open_meter,
               idle_s: float = IDLE_S, progress: Callable[[str], None] = lambda line: None) -> None:
    """Run one device's queries (already in order, those done removed). Raises on a failure
    that stops the device (a model that cannot load); per-query failures are stored."""
    with device_lock(store, device):
        meter = meter_factory(device)
        try:
            for model in dict.fromkeys(queries["model"]):
                if stop.is_set():
                    raise ExecutionCancelled()
                entry = catalog.get_model(store, model)
                if entry is None:
                    raise PlannerError(f"model {model} is no longer in the catalog")
                options = {"trust_remote_code": True} if entry.trust_remote_code else {}
                progress(f"{device}: loading {model}")
                backend = backend_factory(entry.backend, catalog.resolve_model_path(entry.path), device, **options)
                backend.load()  # once per model and device
                try:
                    idle = measure_idle_power(meter, idle_s)
                    versions = json.dumps({**backend.settings, "engine": __version__, "meter": meter.description,
                                           "origin": "execution", "execution_id": execution_id})
                    for row in queries[queries["model"] == model].itertuples():
                        if stop.is_set():
                            raise ExecutionCancelled()
                        _run_query(store, execution_id, device, backend, meter, idle, versions, row)
                        progress(f"{device}: {row.query_id} done")
                finally:
                    backend.close()
        finally:
            meter.close()


def _run_query(store: Store, execution_id: int, device: str, backend, meter, idle, versions: str, row) -> None:
    prompt = row.prompt if isinstance(row.prompt, str) and row.prompt.strip() else None
    error = None
    text = stopped = None
    with meter.window() as window:
        try:
            if prompt is not None:
                answer = backend.generate_text(prompt, int(row.output_tokens))
                got_in, got_out, runtime, text, stopped = (answer.input_tokens, answer.output_tokens,
                                                          answer.runtime_s, answer.text, answer.stopped)
            else:
                result = backend.generate(int(row.input_tokens), int(row.output_tokens))
                got_in, got_out, runtime, stopped = result.input_tokens, result.output_tokens, result.runtime_s, \
                    "output cap"
        except (MemoryError, InputError, TokenCountMismatchError, RuntimeError) as exc:
            # RuntimeError covers torch's out-of-memory errors; the query is recorded as failed.
            error = f"{type(exc).__name__}: {exc}"[:500]
    columns = window.result.measurement_columns(idle)
    record = {
        "execution_id": execution_id, "query_id": row.query_id, "model": row.model, "device": device,
        "position": int(row.position), "prompt_kind": "text" if prompt is not None else "tokens",
        "planned_input_tokens": int(row.input_tokens), "planned_output_tokens": int(row.output_tokens),
        "predicted_energy_j": row.predicted_energy_j, "predicted_runtime_s": row.predicted_runtime_s,
        "predicted_energy_uncertainty_j": row.uncertainty_j, "category": row.category,
        "started_at": window.result.started_at, "finished_at": window.result.finished_at,
    }
    if error is not None:
        record.update(input_tokens=int(row.input_tokens), output_tokens=0, error=error)
        with _WRITE_LOCK, store.transaction() as con:
            append_frame(con, "execution_results", pd.DataFrame([record]))
            _count_done(con, execution_id)
        return
    record.update(input_tokens=got_in, output_tokens=got_out, runtime_s=runtime, energy_j=columns["energy_j"],
                  energy_source=columns["energy_source"], energy_method=columns["energy_method"],
                  idle_power_w=columns["idle_power_w"], generated_text=text, stopped=stopped)
    measurement = {
        "origin": "executed", "model": row.model, "device": device, "host": host_name(), "input_tokens": got_in,
        "output_tokens": max(got_out, 1), "batch_size": 1, "trial": 1, "runtime_s": runtime,
        "library_versions": versions, "started_at": window.result.started_at,
        "finished_at": window.result.finished_at, **columns,
    }
    with _WRITE_LOCK, store.transaction() as con:
        if got_out >= 1:  # a measurement needs at least one generated token
            measurement_id = con.execute("SELECT nextval('measurement_id_seq')").fetchone()[0]
            append_frame(con, "measurements", pd.DataFrame([{"id": measurement_id, **measurement}]))
            record["measurement_id"] = measurement_id
        append_frame(con, "execution_results", pd.DataFrame([record]))
        _count_done(con, execution_id)


def _count_done(con, execution_id: int) -> None:
    con.execute("UPDATE executions SET queries_done = (SELECT count(*) FROM execution_results "
                "WHERE execution_id = ?) WHERE id = ?", [execution_id, execution_id])


def run_execution(store: Store, execution_id: int, stop: threading.Event, **kwargs) -> None:
    """Run (or continue) an execution to the end. Raises the first device failure."""
    execution = get_execution(store, execution_id)
    set_status(store, execution_id, "running", None, only_if=("queued", "running"))
    store.execute("UPDATE executions SET started_at = coalesce(started_at, current_timestamp) WHERE id = ?",
                  [execution_id])
    queries = plan_queries(store, execution.plan_id)
    queries["position"] = queries.groupby("device").cumcount()
    queries["uncertainty_j"] = _uncertainty(store, queries)
    done = set(store.query_df("SELECT query_id FROM execution_results WHERE execution_id = ?",
                              [execution_id])["query_id"])
    left = queries[~queries["query_id"].isin(done)]
    errors: list[BaseException] = []

    def device_thread(device: str, part: pd.DataFrame) -> None:
        try:
            run_device(store, execution_id, device, part, stop, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
            if not isinstance(exc, ExecutionCancelled):
                stop.set()  # one device failing stops the others at their next query

    threads = [threading.Thread(target=device_thread, args=(device, part), name=f"execute-{device}")
               for device, part in left.groupby("device", sort=False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.2)
    failures = [e for e in errors if not isinstance(e, ExecutionCancelled)]
    if failures:
        raise failures[0]
    if errors or stop.is_set():
        raise ExecutionCancelled()
    set_status(store, execution_id, "done", None, only_if=("running",))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one execution (started by the app or the CLI).")
    parser.add_argument("--db", required=True)
    parser.add_argument("--execution", type=int, required=True)
    args = parser.parse_args(argv)
    store = Store(args.db, busy_timeout_s=30)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        run_execution(store, args.execution, stop, progress=lambda line: print(line, flush=True))
    except ExecutionCancelled:
        done = store.query_one("SELECT count(*) FROM execution_results WHERE execution_id = ?", [args.execution])[0]
        set_status(store, args.execution, "cancelled", f"cancelled; {done} queries stored")
        return 0
    except Exception as exc:  # noqa: BLE001 (every failure is recorded in words)
        if not isinstance(exc, PlannerError):
            traceback.print_exc()
        done = store.query_one("SELECT count(*) FROM execution_results WHERE execution_id = ?", [args.execution])[0]
        set_status(store, args.execution, "failed",
                   f"{exc} (after {done} queries; their results are stored; resume to run the rest)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
