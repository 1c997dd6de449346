"""The worker process of an execution: ``python -m engine.execution.worker --db PATH --execution ID``.

One process per device, devices in parallel (:func:`run_devices` with ``isolate``): each
device's energy is read in its own process, so a device is charged its own work only,
never another device's, a model load of another device or this process's database
writes (see "Attribution" below). On each device the queries run in the schedule's order,
grouped by model so each model is loaded once; after each load the device does what a
profiling job does (idle baseline, then discarded warm-up runs: the first query is not
cold), and the load and warm-up are measured and kept as the model's load cost
(:mod:`engine.energy.load_cost`). A prompt is answered as given (capped at the planned
output length), a token-count query runs a synthetic prompt of exactly that length. Each
query's result (answer, actual token counts, runtime, energy with its source, the
prediction it had) is stored the moment it is measured, together with a measurement row
(origin 'executed') so a refit can learn from it. A query that fails alone
(out of memory, too long for the context) is stored with its error and the run goes on.
SIGTERM stops every device after its query in flight. Queries already stored are skipped
(resume).

The measuring (:func:`run_devices`, :func:`run_device`) never touches the database: it is
given the queries left and hands every result to a :class:`ResultSink`; here the sink
writes it to the database (:class:`StoreResultSink`, one transaction a query). Device
processes hand their results to this process through a pipe; only this process writes.

Attribution: the CPU estimate counts the CPU time of the device's own process (its
inference threads included); a GPU is read alone. A RAPL package is one reading for all
devices: each device process is charged the package's energy in a window times its share
of the CPU time that all device processes of the execution used in that window
(:func:`engine.energy.cpu_time.peer_share`). Device threads in one process
(``isolate=False``, used with fakes in tests) would each be charged the whole process.
"""

from __future__ import annotations

import abc
import json
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pandas as pd

from engine import __version__, catalog, runs
from engine.backends import open_backend
from engine.backends.base import Backend
from engine.energy import EnergyMeter, IdleBaseline, measure_idle_power, open_meter
from engine.energy.load_cost import WARMUP_RUNS, LoadCost, measure_window, warm_up
from engine.energy.meter import IDLE_BASELINE_S
from engine.energy.waiting import WAIT_POLICY_ENV, apply_passive_waiting
from engine.errors import InputError, PlannerError, TokenCountMismatchError
from engine.execution.jobs import get_execution, plan_queries
from engine.fitting import load_latest_fits
from engine.runs import EXECUTION
from engine.store import Store, append_frame

IDLE_S = IDLE_BASELINE_S  # as a profiling job's default: one rule for both
# Device threads (or the threads relaying device processes' results) write one at a time: two
# transactions updating the execution's row at once would conflict in DuckDB and roll one back.
_WRITE_LOCK = threading.Lock()


class ExecutionCancelled(runs.RunCancelled):
    """The execution was asked to stop."""


# -- where results go ----------------------------------------------------------------------------

class ResultSink(abc.ABC):
    """Where an execution's query results go, one at a time, the moment each is measured."""

    @abc.abstractmethod
    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        """Keep one query's result (a row of execution_results) and, when the query generated
        tokens, its measurement (a row of measurements, which the result then refers to)."""


class StoreResultSink(ResultSink):
    """Writes each result (and its measurement) to the database as it comes, in one transaction."""

    def __init__(self, store: Store, execution_id: int) -> None:
        self.store, self.execution_id = store, execution_id

    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        with _WRITE_LOCK, self.store.transaction() as con:
            if measurement is not None:
                measurement_id = con.execute("SELECT nextval('measurement_id_seq')").fetchone()[0]
                append_frame(con, "measurements", pd.DataFrame([{"id": measurement_id, **measurement}]))
                result = {**result, "measurement_id": measurement_id}
            append_frame(con, "execution_results", pd.DataFrame([result]))
            con.execute("UPDATE executions SET queries_done = (SELECT count(*) FROM execution_results "
                        "WHERE execution_id = ?) WHERE id = ?", [self.execution_id, self.execution_id])


# -- what is left to run ---------------------------------------------------------------------------

def _uncertainty(store: Store, queries: pd.DataFrame) -> np.ndarray:
    """Half-width of the 90% prediction interval of each query's energy, from the current fits (NaN if none)."""
    out = np.full(len(queries), np.nan)
    fits = {(f.model, f.device): f for f in load_latest_fits(store, energy_scope="total") if f.target == "energy"}
    for (model, device), rows in queries.groupby(["model", "device"]).indices.items():
        fit = fits.get((model, device))
        if fit is not None:
            out[rows] = fit.uncertainty(queries.input_tokens.to_numpy()[rows], queries.output_tokens.to_numpy()[rows])
    return out


def queries_left(store: Store, execution_id: int, plan_id: int) -> pd.DataFrame:
    """The plan's queries not yet stored for this execution, in run order, with their position and band."""
    queries = plan_queries(store, plan_id)
    queries["position"] = queries.groupby("device").cumcount()
    queries["uncertainty_j"] = _uncertainty(store, queries)
    done = set(store.query_df("SELECT query_id FROM execution_results WHERE execution_id = ?",
                              [int(execution_id)])["query_id"])
    return queries[~queries["query_id"].isin(done)]


def run_execution(store: Store, execution_id: int, stop: threading.Event, *, sink: ResultSink | None = None,
                  **measuring) -> None:
    """Run (or continue) an execution to the end. Raises the first device failure.

    ``measuring`` goes to :func:`run_devices` (``isolate``) and :func:`run_device` (factories,
    idle time, progress).
    """
    execution = get_execution(store, execution_id)
    runs.mark_running(store, EXECUTION, execution_id)
    left = queries_left(store, execution_id, execution.plan_id)
    entries = {model: catalog.get_model(store, model) for model in left["model"].unique()}
    run_devices(execution_id, left, entries, sink or StoreResultSink(store, execution_id), stop,
                hold_device=lambda device: runs.device_lock(store, device), **measuring)
    runs.mark_done(store, EXECUTION, execution_id)


# -- measuring -----------------------------------------------------------------------------------

def run_devices(execution_id: int, queries: pd.DataFrame, entries: dict[str, catalog.CatalogEntry | None],
                sink: ResultSink, stop: threading.Event, *,
                hold_device: Callable[[str], AbstractContextManager] = lambda device: nullcontext(),
                isolate: bool = False, **measuring) -> None:
    """Run the queries, devices in parallel, each holding its device (``hold_device``) while it runs.

    With ``isolate`` each device runs in a process of its own (:func:`_run_device_process`),
    so that its energy is its own (the worker does this); else in a thread of this process
    (tests with in-process fakes). ``measuring`` goes to :func:`run_device`; with
    ``isolate`` it must pickle, except ``progress``, which is called here.

    One device failing stops the others at their next query; raises the first failure, or
    :class:`ExecutionCancelled` when stopped. Never touches the database.
    """
    errors: list[BaseException] = []
    parts = list(queries.groupby("device", sort=False))
    # Each device process's pid, filled in as they start: a device's peers (see the module docstring).
    peer_slots = multiprocessing.get_context("spawn").Array("i", len(parts), lock=False) if isolate else None

    def device_thread(slot: int, device: str, part: pd.DataFrame) -> None:
        try:
            with hold_device(device):
                if isolate:
                    _run_device_process(execution_id, device, part, entries, sink, stop, peer_slots, slot, **measuring)
                else:
                    run_device(execution_id, device, part, entries, sink, stop, **measuring)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
            if not isinstance(exc, ExecutionCancelled):
                stop.set()

    threads = [threading.Thread(target=device_thread, args=(slot, device, part), name=f"execute-{device}")
               for slot, (device, part) in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # short joins, so that SIGTERM's handler runs meanwhile
            thread.join(timeout=0.2)
    failures = [e for e in errors if not isinstance(e, ExecutionCancelled)]
    if failures:
        raise failures[0]
    if errors or stop.is_set():
        raise ExecutionCancelled()


def run_device(execution_id: int, device: str, queries: pd.DataFrame, entries: dict[str, catalog.CatalogEntry | None],
               sink: ResultSink, stop: threading.Event, *, backend_factory: Callable = open_backend,
               meter_factory: Callable = open_meter, idle_s: float = IDLE_S, warmup_runs: int = WARMUP_RUNS,
               progress: Callable[[str], None] = lambda line: None,
               peers: Callable[[], Sequence[int]] | None = None) -> None:
    """Run one device's queries (already in order, those done removed), model by model.

    After each load, as in profiling: the idle baseline (``idle_s``), then ``warmup_runs``
    discarded requests; the load and warm-up are measured into the provenance of every
    measurement of that model (its load cost). ``peers`` (the other device processes) goes
    to the meter, which splits a shared package reading with them.

    Raises on a failure that stops the device (a model gone from the catalog or that
    cannot load); a query that fails alone is a result with its error.
    """
    meter = meter_factory(device, peers=peers) if peers is not None else meter_factory(device)
    try:
        for model in dict.fromkeys(queries["model"]):
            if stop.is_set():
                raise ExecutionCancelled()
            entry = entries.get(model)
            if entry is None:
                raise PlannerError(f"model {model} is no longer in the catalog")
            options = {"trust_remote_code": True} if entry.trust_remote_code else {}
            progress(f"{device}: loading {model}")
            backend = backend_factory(entry.backend, catalog.resolve_model_path(entry.path), device, **options)
            loaded = measure_window(meter, backend.load)  # once per model and device
            try:
                idle = measure_idle_power(meter, idle_s)
                warmed = measure_window(meter, lambda: warm_up(backend, warmup_runs))
                load = LoadCost.from_windows(loaded, warmed, warmup_runs, idle)
                versions = json.dumps({**backend.settings, "engine": __version__, "meter": meter.description,
                                       "origin": "execution", "execution_id": execution_id, "load": load.to_dict(),
                                       "omp_wait_policy": os.environ.get(WAIT_POLICY_ENV)})
                for row in queries[queries["model"] == model].itertuples():
                    if stop.is_set():
                        raise ExecutionCancelled()
                    sink.add_result(*_measure_query(execution_id, device, backend, meter, idle, versions, row))
                    progress(f"{device}: {row.query_id} done")
            finally:
                backend.close()
    finally:
        meter.close()


# -- one process per device ------------------------------------------------------------------------

#: Seconds a device process gets to finish after it was told to stop, before it is killed.
DEVICE_STOP_GRACE_S = 30.0


class _PipeSink(ResultSink):
    """A device process's sink: each result goes through the pipe to the execution's process, which stores it."""

    def __init__(self, connection) -> None:
        self.connection = connection

    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        self.connection.send(("result", result, measurement))


def _run_device_process(execution_id: int, device: str, queries: pd.DataFrame,
                        entries: dict[str, catalog.CatalogEntry | None], sink: ResultSink, stop: threading.Event,
                        peer_slots, slot: int, *, progress: Callable[[str], None] = lambda line: None,
                        **measuring) -> None:
    """Run one device's queries in a child process; its results go to ``sink`` here, as they come.

    A stop here (``stop``) is passed on; the child finishes its query in flight. Raises what
    the child raised (an exception that cannot cross processes as itself, as a
    PlannerError naming it), or PlannerError when the child died without a word.
    """
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state or threads inherited
    receiver, sender = context.Pipe(duplex=False)
    child_stop = context.Event()
    child = context.Process(target=_device_process_main, name=f"execute-{device}", daemon=True,
                            args=(sender, child_stop, os.getpid(), peer_slots, execution_id, device, queries, entries,
                                  measuring))
    child.start()
    sender.close()  # the child holds the writing end: end of file here when it is gone
    peer_slots[slot] = child.pid
    try:
        while True:
            if stop.is_set():
                child_stop.set()
            if not receiver.poll(0.2):
                if child.is_alive():
                    continue
                if not receiver.poll():
                    break
            try:
                message = receiver.recv()
            except EOFError:
                break
            if message[0] == "result":
                sink.add_result(message[1], message[2])
            elif message[0] == "progress":
                progress(message[1])
            elif message[0] == "done":
                return
            elif message[0] == "cancelled":
                raise ExecutionCancelled()
            elif message[0] == "error":
                raise message[1]
        child.join(timeout=5)
        raise PlannerError(f"{device}: its worker process ended without finishing (exit code {child.exitcode})")
    finally:
        child_stop.set()
        child.join(timeout=DEVICE_STOP_GRACE_S)
        if child.is_alive():
            child.kill()
            child.join()
        receiver.close()


def _device_process_main(sender, child_stop, parent_pid: int, peer_slots, execution_id: int, device: str,
                         queries: pd.DataFrame, entries: dict[str, catalog.CatalogEntry | None],
                         measuring: dict[str, Any]) -> None:
    """A device process: run the device's queries, sending results, progress and the outcome to the parent."""
    # Signals are the execution process's to handle; it passes a stop on through child_stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_passive_waiting()
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()

    def peers() -> list[int]:
        return [pid for pid in peer_slots if pid and pid != os.getpid()]

    try:
        run_device(execution_id, device, queries, entries, _PipeSink(sender), child_stop,
                   progress=lambda line: sender.send(("progress", line)), peers=peers, **measuring)
    except ExecutionCancelled:
        sender.send(("cancelled",))
    except BaseException as exc:  # noqa: BLE001 (handed to the parent, which records it)
        if not isinstance(exc, PlannerError):
            traceback.print_exc()  # into the worker's log
        sender.send(("error", _portable(exc)))
    else:
        sender.send(("done",))
    finally:
        sender.close()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process when the execution's process is gone (killed): nobody would store its results."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(3)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a PlannerError that names it."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 (any exception that cannot be pickled)
        return PlannerError(f"{type(exc).__name__}: {exc}")


def _measure_query(execution_id: int, device: str, backend: Backend, meter: EnergyMeter, idle: IdleBaseline,
                   versions: str, row) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one query: its result row and, when it generated tokens, its measurement row."""
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
        return record, None
    record.update(input_tokens=got_in, output_tokens=got_out, runtime_s=runtime, energy_j=columns["energy_j"],
                  energy_source=columns["energy_source"], energy_method=columns["energy_method"],
                  idle_power_w=columns["idle_power_w"], generated_text=text, stopped=stopped)
    if got_out < 1:  # a measurement needs at least one generated token
        return record, None
    measurement = {
        "origin": "executed", "model": row.model, "device": device, "host": runs.host_name(), "input_tokens": got_in,
        "output_tokens": got_out, "batch_size": 1, "trial": 1, "runtime_s": runtime,
        "library_versions": versions, "started_at": window.result.started_at,
        "finished_at": window.result.finished_at, **columns,
    }
    return record, measurement


# -- the process ----------------------------------------------------------------------------------

def _work(store: Store, execution_id: int) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    run_execution(store, execution_id, stop, isolate=True, progress=lambda line: print(line, flush=True))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process; its exit code tells the watcher how it ended."""
    apply_passive_waiting()  # started by the launcher it already is; by hand, before torch loads
    return runs.worker_main(EXECUTION, _work, argv)


if __name__ == "__main__":
    sys.exit(main())
