"""The driver of a run on cluster devices: ``python -m engine.cluster.driver [--ray-address A] --db PATH --job ID``
(or ``--execution ID``).

Started by :class:`engine.runs.cluster.RayLauncher` like any worker process (the shared
worker entry records how it ended). It joins the cluster, starts one actor per device on
that device's node, and stores what they stream back through the kind's own store sink,
as it arrives: it is the database's only writer, the nodes never open it. A record
already stored (a stream re-run, a resumed run) is skipped by its id: a trial by its
point, batch size and number, a query by its id, an executed batch by its id. A device whose node is lost is marked
failed at once with the reason while the others go on; the run then ends failed, and
resume runs only what is left (on the same node once it is back, or, for an execution,
on another node's device of the same type: :func:`engine.cluster.runstate.move_device`).
SIGTERM (cancel) kills every actor and ends the run cancelled within a second; if this
process is killed instead, Ray ends its actors itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import replace
from functools import partial

from engine import catalog, runs
from engine.cluster.naming import is_qualified, parse_qualified
from engine.cluster.runstate import DevicePart, placement, planned_devices, record_part
from engine.cluster.scheduler import POLL_S, STALL_S, ClusterInterface, Part, PartResult, StoringSink, drive
from engine.cluster.work import ExecutionWork, ProfileWork
from engine.errors import PlannerError
from engine.execution.jobs import get_execution
from engine.execution.worker import StoreResultSink, queries_left
from engine.profiling.jobs import get_job
from engine.profiling.worker import StoreTrialSink, run_job
from engine.runs import EXECUTION, PROFILING, RunKind
from engine.store import Store


# -- what identifies a record ---------------------------------------------------------------------

def trial_key(row: dict, *_) -> tuple[int, int, int, int]:
    """A profiling trial's id within its job: its point, batch size and number."""
    return int(row["input_tokens"]), int(row["output_tokens"]), int(row.get("batch_size") or 1), int(row["trial"])


def query_key(result: dict, *_, **__) -> str:
    """An executed query's id within its execution."""
    return str(result["query_id"])


def batch_key(batch: dict, *_, **__) -> tuple[str, int]:
    """An executed batch's id within its execution (a query's key is its id, a string: never equal)."""
    return "batch", int(batch["batch_id"])


def stored_trial_keys(store: Store, job_id: int) -> set:
    frame = store.query_df("SELECT input_tokens, output_tokens, batch_size, trial FROM measurements WHERE job_id = ?",
                           [int(job_id)])
    return {trial_key(row) for row in frame.to_dict("records")}


def stored_query_keys(store: Store, execution_id: int) -> set:
    frame = store.query_df("SELECT query_id FROM execution_results WHERE execution_id = ?", [int(execution_id)])
    batches = store.query_df("SELECT batch_id FROM execution_batches WHERE execution_id = ?", [int(execution_id)])
    return set(frame["query_id"].astype(str)) | {batch_key(row) for row in batches.to_dict("records")}


# -- the two kinds --------------------------------------------------------------------------------

def drive_profiling(store: Store, job_id: int, cluster: ClusterInterface, *,
                    stop_requested: Callable[[], bool] = lambda: False,
                    progress: Callable[[str], None] = lambda line: None,
                    measuring: dict | None = None, poll_s: float = POLL_S, stall_s: float = STALL_S) -> None:
    """Run (or continue) a profiling job on its cluster device, storing every trial as it arrives.

    The job runs through :func:`~engine.profiling.worker.run_job`, as on this host, with
    the measuring done on the node: whatever ``run_job`` hands its measuring (the trials
    stored before, an adaptive job's earlier rounds and budget) goes to the node's
    :func:`~engine.profiling.worker.measure_job`, and what that returns comes back.
    Raises PlannerError with the reason when the device's part failed, RunCancelled when
    stopped. ``measuring`` goes to the node's measuring too (tests' fakes; they must pickle).
    """
    job = get_job(store, job_id)
    where = parse_qualified(job.device)
    entry = catalog.get_model(store, job.model)
    if entry is None:
        raise PlannerError(f"model {job.model} is no longer in the catalog")

    def on_node(node_job, backend: str, model_path, stored, sink, **node_measuring):
        # The model's path as the catalog stores it: resolved on the node, under its own checkout.
        work = ProfileWork(replace(node_job, device=where.device), backend, entry.path, stored, node_measuring)
        storing = StoringSink(sink, {"add_trial": trial_key}, stored_trial_keys(store, job.id))
        with runs.device_lock(store, str(where)):
            results = drive(cluster, [Part(str(where), work)], storing.deliver, stop_requested=stop_requested,
                            progress=progress, poll_s=poll_s, stall_s=stall_s)
        progress(_stored_line(storing))
        _raise_unless_done(results.values())
        return results[str(where)].value

    run_job(store, job, sink=StoreTrialSink(store, job.id), measure=on_node, **(measuring or {}))


def drive_execution(store: Store, execution_id: int, cluster: ClusterInterface, *,
                    stop_requested: Callable[[], bool] = lambda: False,
                    progress: Callable[[str], None] = lambda line: None,
                    measuring: dict | None = None, poll_s: float = POLL_S, stall_s: float = STALL_S) -> None:
    """Run (or continue) an execution, each device's queries on its node, devices in parallel.

    A device that fails is marked so at once (:func:`engine.cluster.runstate.part_states`)
    and the others go on; then raises PlannerError naming every failed device, or
    RunCancelled when stopped. ``measuring`` goes to the nodes' :func:`~engine.execution.worker.run_device`.
    """
    execution = get_execution(store, execution_id)
    left = queries_left(store, execution_id, execution.plan_id)
    local = sorted(d for d in left["device"].unique() if not is_qualified(d))
    if local:
        raise PlannerError(f"this plan mixes devices of this host ({', '.join(local)}) with cluster devices; name "
                           "every device by its node (NODE/DEVICE) to run it on the cluster")
    left = left.assign(device=[str(parse_qualified(d)) for d in left["device"]])
    runs.mark_running(store, EXECUTION, execution_id)
    moves = placement(store, execution_id)
    entries = {model: catalog.get_model(store, model) for model in left["model"].unique()}
    parts, planned_of = [], {}
    for device in sorted(planned_devices(store, execution_id) - set(left["device"])):
        record_part(store, execution_id, DevicePart(device, moves.get(device, device), "done"))
    for device, queries in left.groupby("device", sort=False):
        runs_on = moves.get(device, device)
        models = queries["model"].unique()
        work = ExecutionWork(execution_id, parse_qualified(runs_on).device, queries,
                             {m: entries[m] for m in models}, measuring or {})
        parts.append(Part(runs_on, work))
        planned_of[runs_on] = device
        record_part(store, execution_id, DevicePart(device, runs_on, "running"))
    sink = StoringSink(StoreResultSink(store, execution_id), {"add_result": query_key, "add_batch": batch_key},
                       stored_query_keys(store, execution_id))
    ended: list[PartResult] = []

    def on_end(result: PartResult) -> None:
        ended.append(result)
        record_part(store, execution_id, DevicePart(planned_of[result.device], result.device, result.status,
                                                    result.reason))
        if result.status == "failed" and len(ended) < len(parts):
            runs.set_status(store, EXECUTION, execution_id, "running",
                            f"{result.reason}; the other devices go on", only_if=("running",))

    with ExitStack() as held:
        for part in parts:
            held.enter_context(runs.device_lock(store, part.device))
        results = drive(cluster, parts, sink.deliver, stop_requested=stop_requested, on_end=on_end,
                        progress=progress, poll_s=poll_s, stall_s=stall_s)
    progress(_stored_line(sink))
    _raise_unless_done(results.values())
    runs.mark_done(store, EXECUTION, execution_id)


def _raise_unless_done(results: Iterable[PartResult]) -> None:
    results = list(results)
    failed = [r.reason or f"{r.device} failed" for r in results if r.status == "failed"]
    if failed:
        raise PlannerError("; ".join(failed))
    if any(r.status == "cancelled" for r in results):
        raise runs.RunCancelled()


def _stored_line(sink: StoringSink) -> str:
    skipped = f", {sink.skipped} already stored skipped" if sink.skipped else ""
    return f"stored {sink.stored_now} records{skipped}"


# -- the process ----------------------------------------------------------------------------------

DRIVERS: dict[str, Callable[..., None]] = {PROFILING.table: drive_profiling, EXECUTION.table: drive_execution}


def _work(kind: RunKind, address: str | None, store: Store, run_id: int) -> None:
    from engine.cluster.connection import connect, disconnect

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    head = connect(address)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())  # ray.init may have replaced it
    _log(f"joined the cluster at {head}")
    from engine.cluster.remote import RayCluster

    try:
        DRIVERS[kind.table](store, run_id, RayCluster(), stop_requested=stop.is_set, progress=_log,
                            stall_s=_stall_s())
    finally:
        disconnect()


#: Seconds a node may send nothing, not even a heartbeat, before its part fails (a model load that holds
#: Python's lock for longer needs more).
STALL_ENV = "PLANNER_CLUSTER_STALL_S"


def _stall_s() -> float:
    try:
        return max(5.0, float(os.environ.get(STALL_ENV, STALL_S)))
    except ValueError:
        return STALL_S


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the driver process; its exit code tells the watcher how it ended."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ray-address")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    kind = EXECUTION if EXECUTION.id_flag in rest else PROFILING
    return runs.worker_main(kind, partial(_work, kind, known.ray_address), rest)


if __name__ == "__main__":
    sys.exit(main())
