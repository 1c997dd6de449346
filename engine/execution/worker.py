"""The worker process of an execution: ``python -m engine.execution.worker --db PATH --execution ID``.

One process per device, devices in parallel (:func:`run_devices` with ``isolate``): each
device's energy is read in its own process, so a device is charged its own work only,
never another device's, a model load of another device or this process's database
writes (see "Attribution" below). On each device the plan's batches run in the schedule's
order (start, then batch id), grouped by model so each model is loaded once; after each
load the device does what a profiling job does (idle baseline, then discarded warm-up
runs: the first batch is not cold), and the load and warm-up are measured and kept as the
model's load cost (:mod:`engine.energy.load_cost`).

A batch runs through ``backend.generate_batch`` in one energy window: a token-count query
as an :class:`~engine.backends.batch.ExactRequest` (a synthetic prompt of exactly its
length, exactly its output), a prompt as a :class:`~engine.backends.batch.PromptRequest`
capped at the planned output length (it may end earlier, at an end-of-answer token, as in
service). A batch of one (every query of a plan without batches) runs as a single request
(``generate`` / ``generate_text``), as executions always did. Each batch is stored the
moment it is measured, all its members in one transaction (:class:`StoreResultSink`): the
batch as measured (energy, wall time, waste, members), each member's share of it
(:func:`share_by_tokens`, the rule of :data:`SHARE_RULE`), and, where the batch ran one
exact shape, a measurement (origin 'executed', :func:`refit_shape`) so a refit can learn
from it. A batch that fails alone (out of memory, refused by the backend's memory check,
too long for the context, a library failure) is stored with its error on every member and
the run goes on. SIGTERM stops every device after its batch in flight. Batches already
stored are skipped (resume); one killed in flight runs again whole.

The measuring (:func:`run_devices`, :func:`run_device`) never touches the database: it is
given the queries left and hands every batch to a :class:`ResultSink`; here the sink
writes it to the database. Device processes hand their batches to this process through a
pipe; only this process writes.

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
from engine.backends.batch import STOPPED_CAP, BatchResult, ExactRequest, PromptRequest, RequestResult
from engine.energy import EnergyMeter, IdleBaseline, measure_idle_power, open_meter
from engine.energy.load_cost import WARMUP_RUNS, LoadCost, measure_window, warm_up
from engine.energy.meter import IDLE_BASELINE_S
from engine.energy.waiting import WAIT_POLICY_ENV, apply_passive_waiting
from engine.errors import InferenceError, InputError, PlannerError, TokenCountMismatchError
from engine.execution.jobs import get_execution, plan_queries, with_batches
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
    """Where an execution's results go, a batch at a time, the moment each batch is measured."""

    @abc.abstractmethod
    def add_batch(self, batch: dict[str, Any], results: list[dict[str, Any]],
                  measurement: dict[str, Any] | None) -> None:
        """Keep one batch: its row (of execution_batches), its members' results (rows of
        execution_results, without ``device``: the batch's is theirs) and, when the batch ran
        one exact shape (:func:`refit_shape`), its measurement (a row of measurements, which
        the batch and its members then refer to). All of it or none of it."""

    @abc.abstractmethod
    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        """Keep one query's result outside any batch (a row of execution_results) and its
        measurement. The measuring here hands over batches only; this is the single-record
        form that the cluster's stream protocol is tested with."""


class StoreResultSink(ResultSink):
    """Writes each batch (its members and measurement with it) to the database as it comes, in one transaction.

    A batch already stored for the execution (a stream the cluster re-ran from its start) is
    skipped, so a batch is never stored twice.
    """

    def __init__(self, store: Store, execution_id: int) -> None:
        self.store, self.execution_id = store, execution_id

    def add_batch(self, batch: dict[str, Any], results: list[dict[str, Any]],
                  measurement: dict[str, Any] | None) -> None:
        with _WRITE_LOCK, self.store.transaction() as con:
            ids = [str(r["query_id"]) for r in results]
            stored = con.execute(
                "SELECT (SELECT count(*) FROM execution_batches WHERE execution_id = ? AND batch_id = ?) + "
                "(SELECT count(*) FROM execution_results WHERE execution_id = ? AND list_contains(?, query_id))",
                [self.execution_id, int(batch["batch_id"]), self.execution_id, ids]).fetchone()[0]
            if stored:
                return
            if measurement is not None:
                measurement_id = con.execute("SELECT nextval('measurement_id_seq')").fetchone()[0]
                append_frame(con, "measurements", pd.DataFrame([{"id": measurement_id, **measurement}]))
                batch = {**batch, "measurement_id": measurement_id}
                results = [{**r, "measurement_id": measurement_id} for r in results]
            append_frame(con, "execution_batches", pd.DataFrame([batch]))
            append_frame(con, "execution_results", pd.DataFrame([{**r, "device": batch["device"]} for r in results]))
            self._count_done(con)

    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        with _WRITE_LOCK, self.store.transaction() as con:
            if measurement is not None:
                measurement_id = con.execute("SELECT nextval('measurement_id_seq')").fetchone()[0]
                append_frame(con, "measurements", pd.DataFrame([{"id": measurement_id, **measurement}]))
                result = {**result, "measurement_id": measurement_id}
            append_frame(con, "execution_results", pd.DataFrame([result]))
            self._count_done(con)

    def _count_done(self, con) -> None:
        con.execute("UPDATE executions SET queries_done = (SELECT count(*) FROM execution_results "
                    "WHERE execution_id = ?) WHERE id = ?", [self.execution_id, self.execution_id])


# -- what is left to run ---------------------------------------------------------------------------

def _uncertainty(store: Store, queries: pd.DataFrame) -> np.ndarray:
    """Half-width of the 90% prediction interval of each query's energy, from the current fits (NaN if none).

    Only for queries planned alone: a member of a larger batch is predicted as a share of its
    batch, which a single request's interval does not describe (NaN: no band, not a wrong one).
    """
    out = np.full(len(queries), np.nan)
    fits = {(f.model, f.device): f for f in load_latest_fits(store, energy_scope="total") if f.target == "energy"}
    inputs, outputs = queries.input_tokens.to_numpy(), queries.output_tokens.to_numpy()
    alone = queries["batch_size"].to_numpy() == 1
    for (model, device), rows in queries.groupby(["model", "device"]).indices.items():
        fit = fits.get((model, device))
        rows = rows[alone[rows]]
        if fit is not None and len(rows):
            out[rows] = fit.uncertainty(inputs[rows], outputs[rows])
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
    """Run one device's batches (their queries already in order, those done removed), model by model.

    A query without ``batch_id`` runs alone (:func:`engine.execution.jobs.with_batches`).
    After each load, as in profiling: the idle baseline (``idle_s``), then ``warmup_runs``
    discarded requests; the load and warm-up are measured into the provenance of every
    measurement of that model (its load cost). Then each batch of the model, in order, in
    one energy window (:func:`_measure_batch`), handed to ``sink`` whole. ``peers`` (the
    other device processes) goes to the meter, which splits a shared package reading with them.

    Raises on a failure that stops the device (a model gone from the catalog or that
    cannot load); a batch that fails alone is stored with its error on every member.
    """
    queries = with_batches(queries)  # a batch id missing (a frame of older callers): the query alone
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
                versions = {**backend.settings, "engine": __version__, "meter": meter.description,
                            "origin": "execution", "execution_id": execution_id, "load": load.to_dict(),
                            "omp_wait_policy": os.environ.get(WAIT_POLICY_ENV)}
                for batch_id, members in queries[queries["model"] == model].groupby("batch_id", sort=False):
                    if stop.is_set():
                        raise ExecutionCancelled()
                    named = _named(members["query_id"].astype(str).tolist())
                    progress(f"{device}: batch {batch_id} started ({named})")
                    sink.add_batch(*_measure_batch(execution_id, device, entry.backend, backend, meter, idle,
                                                   versions, members))
                    # A query alone says so as it always did (the cluster's tests and people read these lines).
                    progress(f"{device}: {named} done" if len(members) == 1 else
                             f"{device}: batch {batch_id} done ({named})")
            finally:
                backend.close()
    finally:
        meter.close()


def _named(ids: list[str]) -> str:
    """``q1``, ``q1, q2``, ``q1, q2, q3 and 5 more``."""
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")


# -- one process per device ------------------------------------------------------------------------

#: Seconds a device process gets to finish after it was told to stop, before it is killed.
DEVICE_STOP_GRACE_S = 30.0


class _PipeSink(ResultSink):
    """A device process's sink: each batch goes through the pipe to the execution's process, which stores it."""

    def __init__(self, connection) -> None:
        self.connection = connection

    def add_batch(self, batch: dict[str, Any], results: list[dict[str, Any]],
                  measurement: dict[str, Any] | None) -> None:
        self.connection.send(("batch", batch, results, measurement))

    def add_result(self, result: dict[str, Any], measurement: dict[str, Any] | None) -> None:
        self.connection.send(("result", result, measurement))


def _run_device_process(execution_id: int, device: str, queries: pd.DataFrame,
                        entries: dict[str, catalog.CatalogEntry | None], sink: ResultSink, stop: threading.Event,
                        peer_slots, slot: int, *, progress: Callable[[str], None] = lambda line: None,
                        **measuring) -> None:
    """Run one device's batches in a child process; each goes to ``sink`` here, as it comes.

    A stop here (``stop``) is passed on; the child finishes its batch in flight. Raises what
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
            if message[0] == "batch":
                sink.add_batch(message[1], message[2], message[3])
            elif message[0] == "result":
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


# -- one batch ------------------------------------------------------------------------------------

#: How a batch's measured energy and runtime are shared among its requests (see :func:`share_by_tokens`).
SHARE_RULE = "tokens processed"

#: Errors that fail a batch alone (the run goes on): out of memory (``RuntimeError`` covers torch's),
#: refused by the backend's checks before it ran (memory, context: ``InputError``), the library's
#: failure (``InferenceError``), other counts than asked (``TokenCountMismatchError``).
BATCH_ERRORS = (MemoryError, InputError, InferenceError, TokenCountMismatchError, RuntimeError)

#: Backends whose batch is a rectangle: prompts padded on the left to the longest, and every row
#: computing every step until the longest answer is done (engine.backends.hf).
PADDED_BACKENDS = frozenset({"transformers"})


def share_by_tokens(total: float | None, tokens: Sequence[int]) -> list[float | None]:
    """Each request's share of a batch's ``total`` (energy or runtime), by tokens processed.

    The rule: request *i* is charged ``total × (τin_i + τout_i) / Σ_j (τin_j + τout_j)``,
    where τin and τout are the prompt tokens it ran and the tokens it generated, as read back
    from the library (``tokens[i] = τin_i + τout_i``). The last request takes what the others
    leave, so the shares add up to the batch's total (to the last bit of a double). ``None``
    (unknown) shares ``None``: an unknown energy is never split into zeros.

    Why this rule: it uses measured counts only, never the fits being judged, so a request's
    measured share can be compared with its predicted one (a rule proportional to the
    prediction would give every member its batch's error); for a batch of one shape (the
    planner sorts lengths so that most batches are) it is an equal split; the batch's waste
    (padding, steps run for requests already done) is paid by its members in proportion, since
    they chose to run together. Its limit: a prompt token costs less than a generated one
    (prefill runs in parallel, decode one step at a time), so in a batch mixing long prompts
    with long answers a long prompt is charged somewhat more than it caused; the batch's own
    figures, stored beside the shares, are exact.
    """
    weights = [int(t) for t in tokens]
    if total is None or (isinstance(total, float) and np.isnan(total)):
        return [None] * len(weights)
    whole = sum(weights)
    shares = [float(total) * w / whole for w in weights[:-1]]
    return shares + [float(total) - sum(shares)]


def refit_shape(backend_name: str, ran: BatchResult) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """The (τin, τout) a batch ran for each of its requests, for a measurement of batch size b;
    with its kind (``exact`` / ``padded``) and a note, or ``(None, None, note)`` when it has none.

    A batch whose requests all ran one (τin, τout) is a measurement of that shape. On a backend
    that pads and keeps finished rows computing (transformers), a batch of mixed lengths ran b
    rows of the longest prompt (padding included) for as many steps as its longest answer:
    the shape (max τin, decode steps), exactly what profiling that shape at b runs. llama.cpp
    runs each sequence at its own length and drops finished ones, so a mixed batch is no shape
    of the (τin, τout, B) surface and is kept out of refits.
    """
    shapes = {(r.input_tokens, r.output_tokens) for r in ran.requests}
    if len(shapes) == 1:
        return next(iter(shapes)), "exact", None
    if backend_name in PADDED_BACKENDS:
        shape = (max(r.input_tokens for r in ran.requests), int(ran.decode_steps))
        return shape, "padded", (f"members of {len(shapes)} lengths ran padded to {shape[0]} prompt tokens for "
                                 f"{shape[1]} steps each ({backend_name} pads on the left and keeps finished rows "
                                 "computing), so the batch is the measurement of that shape")
    return None, None, (f"members of {len(shapes)} lengths, each run at its own length ({backend_name} neither pads "
                        "nor keeps finished sequences): no single shape, kept out of refits")


def _request(row) -> ExactRequest | PromptRequest:
    """A planned query as a backend request: its prompt capped at the planned output, or its exact counts."""
    prompt = row.prompt if isinstance(row.prompt, str) and row.prompt.strip() else None
    if prompt is not None:
        return PromptRequest(prompt, int(row.output_tokens))
    return ExactRequest(int(row.input_tokens), int(row.output_tokens))


def _run_alone(backend: Backend, request: ExactRequest | PromptRequest) -> BatchResult:
    """One request through the single-request calls (as executions always ran a query), as a batch of one."""
    if isinstance(request, PromptRequest):
        answer = backend.generate_text(request.prompt, request.max_output_tokens)
        one = RequestResult(answer.input_tokens, answer.output_tokens, answer.stopped, answer.text)
        return BatchResult((one,), answer.runtime_s, None, answer.output_tokens)
    result = backend.generate(request.input_tokens, request.output_tokens)
    one = RequestResult(result.input_tokens, result.output_tokens, STOPPED_CAP)
    return BatchResult((one,), result.runtime_s, result.time_to_first_token_s, result.output_tokens)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _measure_batch(execution_id: int, device: str, backend_name: str, backend: Backend, meter: EnergyMeter,
                   idle: IdleBaseline, versions: dict[str, Any], members: pd.DataFrame,
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """Run one batch in one energy window: its row, its members' rows, and its measurement (or None)."""
    rows = list(members.itertuples())
    requests = [_request(row) for row in rows]
    error, ran = None, None
    with meter.window() as window:
        try:
            ran = _run_alone(backend, requests[0]) if len(requests) == 1 else backend.generate_batch(requests)
        except BATCH_ERRORS as exc:
            error = _error_text(exc)
    columns = window.result.measurement_columns(idle)
    batch_id, planned_size = int(rows[0].batch_id), int(rows[0].batch_size)
    batch = {
        "execution_id": execution_id, "batch_id": batch_id, "model": rows[0].model, "device": device,
        "position": int(members["position"].min()), "batch_size": planned_size, "members": len(rows),
        "query_ids": json.dumps([str(row.query_id) for row in rows]),
        "predicted_energy_j": _sum_known(members["predicted_energy_j"]),
        "predicted_runtime_s": _sum_known(members["predicted_runtime_s"]),
        "share_rule": SHARE_RULE, "started_at": window.result.started_at, "finished_at": window.result.finished_at,
    }
    results = [{
        "execution_id": execution_id, "query_id": row.query_id, "model": row.model, "position": int(row.position),
        "prompt_kind": "text" if isinstance(request, PromptRequest) else "tokens",
        "planned_input_tokens": int(row.input_tokens), "planned_output_tokens": int(row.output_tokens),
        "predicted_energy_j": row.predicted_energy_j, "predicted_runtime_s": row.predicted_runtime_s,
        "predicted_energy_uncertainty_j": row.uncertainty_j, "category": row.category, "batch_id": batch_id,
        "batch_size": planned_size, "started_at": window.result.started_at, "finished_at": window.result.finished_at,
    } for row, request in zip(rows, requests, strict=True)]
    if error is not None:
        batch["error"] = error
        for result, row in zip(results, rows, strict=True):
            result.update(input_tokens=int(row.input_tokens), output_tokens=0, error=error)
        return batch, results, None

    tokens = [r.input_tokens + r.output_tokens for r in ran.requests]
    energies, runtimes = share_by_tokens(columns["energy_j"], tokens), share_by_tokens(ran.runtime_s, tokens)
    method = columns["energy_method"]
    if len(rows) > 1 and method:
        method += f"; this request's share of batch {batch_id} by {SHARE_RULE}"
    for result, got, energy_j, runtime_s, weight in zip(results, ran.requests, energies, runtimes, tokens,
                                                       strict=True):
        result.update(input_tokens=got.input_tokens, output_tokens=got.output_tokens, stopped=got.stopped,
                      generated_text=got.text, runtime_s=runtime_s, energy_j=energy_j,
                      energy_share=weight / sum(tokens),
                      energy_source=columns["energy_source"], energy_method=method,
                      idle_power_w=columns["idle_power_w"], wasted_decode_tokens=got.wasted_decode_tokens,
                      padding_tokens=got.padding_tokens)
    shape, kind, note = refit_shape(backend_name, ran)
    batch.update(runtime_s=ran.runtime_s, energy_j=columns["energy_j"], energy_source=columns["energy_source"],
                 energy_method=columns["energy_method"], idle_power_w=columns["idle_power_w"],
                 input_tokens=ran.input_tokens, output_tokens=ran.output_tokens,
                 max_input_tokens=max(r.input_tokens for r in ran.requests), decode_steps=int(ran.decode_steps),
                 wasted_decode_tokens=ran.wasted_decode_tokens, padding_tokens=ran.padding_tokens,
                 refit_shape=kind, refit_note=note)
    if shape is None or min(shape) < 1:  # a measurement needs at least one token in and one out
        if shape is not None:
            batch.update(refit_shape=None, refit_note="no token generated: kept out of refits")
        return batch, results, None
    provenance = {**versions, "batch": {"batch_id": batch_id, "members": len(rows), "shape": kind,
                                        **({"note": note} if note else {})}}
    measurement = {
        "origin": "executed", "model": rows[0].model, "device": device, "host": runs.host_name(),
        "input_tokens": shape[0], "output_tokens": shape[1], "batch_size": len(rows), "trial": 1,
        "runtime_s": ran.runtime_s, "library_versions": json.dumps(provenance),
        "started_at": window.result.started_at, "finished_at": window.result.finished_at, **columns,
    }
    return batch, results, measurement


def _sum_known(values: pd.Series) -> float | None:
    """The sum when every value is known, else None (a batch's prediction is its members' together)."""
    return None if values.isna().any() else float(values.sum())


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
