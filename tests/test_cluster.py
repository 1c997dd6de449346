"""engine/cluster without a cluster: names, the stream protocol, the driver's loop and its storing, against
an in-process fake of the cluster interface (:class:`FakeCluster`).

The fake runs each device's real remote work (:mod:`engine.cluster.work`: the profiling
and execution measuring code, with fake backends and a replay meter) through the real
batching (:func:`engine.cluster.protocol.stream_work`), and can be told to lose a node
after some records, to re-run a stream from its start (what Ray does when it retries),
to fall silent, or to have the cluster declare a node dead. Expectations come from the
plan and the job's design: which ids exist, how many, on which device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from engine import catalog, runs
from engine.backends.base import GenerationResult
from engine.cluster import naming
from engine.cluster.agent import main as agent_main
from engine.cluster.agent import node_labels, node_resources, start_command
from engine.cluster.connection import (HeadAddress, check_reachable, check_token, parse_address, refusal_reason)
from engine.cluster.driver import drive_execution, drive_profiling
from engine.cluster.errors import (ClusterConfigError, ClusterUnreachableError, NodeLostError,
                                   NodeUnavailableError)
from engine.cluster.facts import DeviceFacts, NodeFacts, detect_devices
from engine.cluster.inventory import ClusterInventory, describe, nodes_from_records
from engine.cluster.protocol import Batch, End, SinkCall, forwarding_sink, stream_work
from engine.cluster.runstate import DevicePart, move_device, part_states, placement
from engine.cluster.scheduler import ClusterInterface, Part, StoringSink, drive
from engine.cluster.work import ExecutionWork, ProfileWork, missing_model_files
from engine.energy import EnergyMeter, ReplayMeter
from engine.energy.discovery import SensorStatus
from engine.errors import DeviceUnavailableError, InputError, PlannerError
from engine.execution import create_execution, get_execution, resume_execution
from engine.execution.worker import ResultSink
from engine.profiling import jobs
from engine.profiling.worker import TrialSink
from engine.runs.cluster import ADDRESS_ENV, RayLauncher, cluster_address, use_cluster
from engine.runs.local import LocalProcessLauncher
from engine.store import Store, append_frame

ROOT = Path(__file__).resolve().parent.parent


# -- fakes ---------------------------------------------------------------------------------------

class FakeBackend:
    """Answers every request after a millisecond, with exactly the tokens asked for."""

    name = "fake"

    def __init__(self, backend, path, device="cpu", **options):
        self.device = device

    def load(self):
        pass

    def close(self):
        pass

    def check_request(self, input_tokens, output_tokens):
        pass

    @property
    def settings(self):
        return {"backend": "fake", "device": self.device}

    def generate(self, input_tokens, output_tokens):
        time.sleep(0.001)
        return GenerationResult(input_tokens, output_tokens, 0.001, None)


def replay_meter(device="cpu", **_):
    return EnergyMeter([ReplayMeter("cpu", "cpu", 10.0, source="estimated", method="estimated: replay at 10 W")])


FAKES = {"backend_factory": FakeBackend, "meter_factory": replay_meter}
EXECUTION_FAKES = {**FAKES, "idle_s": 0.01}


class FakeStream:
    def __init__(self, cluster: "FakeCluster", part: Part):
        self.cluster, self.part, self.node = cluster, part, part.where.node
        self.script = cluster.script.get(part.device, {})
        self.delivered = 0  # sink calls handed over so far, across re-runs
        self.reruns = 0
        self.stopped = False
        self.batches = self._stream()

    def _stream(self):
        return stream_work(self.part.work, max_calls=1, flush_s=0.0, heartbeat_s=0.05)


class FakeCluster(ClusterInterface):
    """Each part's work runs in this process, as a node's actor runs it; ``script`` scripts faults per device.

    ``lose_after=N``: after N calls the node is lost (NodeLostError); ``rerun_after=N``:
    after N calls the stream starts again from its start (Ray's retry); ``silent_after=N``:
    after N calls nothing more comes, not even a heartbeat; ``dead_after=N``: after N calls
    the cluster declares the node dead while its stream goes on. ``absent``: devices whose
    node is not in the cluster. ``wait`` hands out one ready stream at a time, in turn,
    so devices interleave.
    """

    def __init__(self, script: dict | None = None, absent: tuple[str, ...] = (),
                 on_take=lambda stream: None):
        self.script, self.absent, self.on_take = script or {}, absent, on_take
        self.streams: list[FakeStream] = []
        self.turn = 0

    def start(self, part: Part) -> FakeStream:
        if part.device in self.absent:
            raise NodeUnavailableError(f"node {part.where.node} is not in the cluster now")
        stream = FakeStream(self, part)
        self.streams.append(stream)
        return stream

    def wait(self, handles, timeout_s):
        ready = [h for h in handles if not h.stopped and h.delivered < h.script.get("silent_after", 10**9)]
        if not ready:
            time.sleep(timeout_s)
            return []
        self.turn += 1
        return [ready[self.turn % len(ready)]]

    def take(self, handle: FakeStream):
        self.on_take(handle)
        script = handle.script
        if handle.delivered >= script.get("lose_after", 10**9):
            raise NodeLostError(f"node {handle.node} was lost (ActorDiedError: its node has died)")
        if handle.delivered == script.get("rerun_after") and handle.reruns == 0:
            handle.reruns += 1
            handle.batches = handle._stream()  # from the start, as Ray re-runs a generator
            handle.delivered = 0
            return Batch()
        batch = next(handle.batches, None)
        if batch is not None:
            handle.delivered += len(batch.calls)
        return batch

    def stop(self, handle: FakeStream) -> None:
        handle.stopped = True

    def lost(self, handles):
        return {id(h): f"node {h.node} was declared dead by the cluster" for h in handles
                if h.delivered >= h.script.get("dead_after", 10**9)}


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture
def with_cluster(monkeypatch):
    """A cluster address is configured (nothing listens there; these tests never connect)."""
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1:9")
    use_cluster(None)
    yield
    use_cluster(None)


@pytest.fixture
def demo_store(store: Store, demo_models, with_cluster) -> Store:
    catalog.register_demo_models(store, list(demo_models.values()))
    return store


def make_plan(store: Store, per_device: dict[str, int], model: str = "demo-large") -> int:
    """A plan of ``n`` token-count queries on each device, ids ``<device>-q<i>``, stored as the planner stores one."""
    rows = [dict(query_id=f"{device}-q{i}", model=model, device=device, input_tokens=8 + i, output_tokens=4,
                 predicted_energy_j=1.0, predicted_runtime_s=0.01, accuracy=0.5, device_start_s=0.01 * i)
            for device, n in per_device.items() for i in range(n)]
    with store.transaction() as con:
        plan_id = con.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', 'total', "
                              "'optimal') RETURNING id").fetchone()[0]
        frame = pd.DataFrame(rows)
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def results(store: Store, execution_id: int) -> pd.DataFrame:
    return store.query_df("SELECT r.query_id, r.device, m.device AS measured_on, m.host FROM execution_results r "
                          "LEFT JOIN measurements m ON m.id = r.measurement_id WHERE r.execution_id = ? "
                          "ORDER BY r.query_id", [execution_id])


def status(store: Store, execution_id: int) -> tuple[str, str | None]:
    execution = get_execution(store, execution_id)
    return execution.status, execution.reason


# -- names ---------------------------------------------------------------------------------------

def test_qualified_names_parse_format_and_map_to_ray_labels_and_resources():
    device = naming.parse_qualified(" nodeA/CUDA ")
    assert device == naming.QualifiedDevice("nodeA", "cuda:0")
    assert str(device) == "nodeA/cuda:0" and device.kind == "cuda"
    assert device.device_label == "cuda-0"
    assert device.resource == "joule_dev_nodeA_cuda-0"
    assert device.label_selector == {"joule/node": "nodeA"}
    assert naming.format_qualified("gpu-host.lab", "gpu:1") == "gpu-host.lab/cuda:1"
    assert naming.device_from_label("cuda-3") == "cuda:3" and naming.device_from_label("cpu") == "cpu"
    assert naming.device_from_resource("nodeA", "joule_dev_nodeA_cuda-1") == "cuda:1"
    assert naming.device_from_resource("nodeA", "joule_dev_nodeB_cpu") is None
    assert naming.device_from_resource("nodeA", "CPU") is None
    assert naming.is_qualified("nodeA/cpu") and not naming.is_qualified("cuda:0")


@pytest.mark.parametrize("text, fragment", [
    ("cpu", "NODE/DEVICE"), ("/cpu", "NODE/DEVICE"), ("nodeA/", "NODE/DEVICE"), ("a/b/cpu", "NODE/DEVICE"),
    ("node A/cpu", "not a usable node name"), ("-node/cpu", "not a usable node name"),
    ("n" * 64 + "/cpu", "not a usable node name"), ("nodeA/tpu", "Unknown device"),
])
def test_bad_qualified_names_are_refused_in_words(text, fragment):
    with pytest.raises(DeviceUnavailableError, match=fragment):
        naming.parse_qualified(text)


def test_free_text_becomes_a_valid_label_value():
    assert naming.label_value("NVIDIA A100-SXM4-80GB") == "NVIDIA-A100-SXM4-80GB"
    assert naming.label_value("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz") == "Intel-R-Xeon-R-Gold-6338-CPU-2.00GHz"
    assert naming.label_value("  ") == "unknown"
    long = naming.label_value("x" * 80 + " tail")
    assert len(long) == 63 and naming.LABEL_VALUE_RE.match(long)


# -- the stream protocol -----------------------------------------------------------------------------

class ListWork:
    """A work that makes ``n`` add_result calls, ``pause_s`` apart, then returns or raises ``error``."""

    sink_interface = ResultSink
    device = "cpu"

    def __init__(self, n: int, pause_s: float = 0.0, error: BaseException | None = None):
        self.n, self.pause_s, self.error = n, pause_s, error

    def model_files(self):
        return []

    def run(self, sink, progress):
        for i in range(self.n):
            time.sleep(self.pause_s)
            sink.add_result({"query_id": f"q{i}", "device": "cpu", "host": "somehost"}, None)
        progress("all sent")
        if self.error is not None:
            raise self.error
        return "the value"


def test_a_forwarding_sink_is_a_sink_of_its_interface_and_forwards_every_method():
    calls = []
    trial_sink = forwarding_sink(TrialSink, calls.append)
    assert isinstance(trial_sink, TrialSink)
    trial_sink.add_trial({"trial": 1})
    trial_sink.point_done(3)
    result_sink = forwarding_sink(ResultSink, calls.append)
    result_sink.add_result({"query_id": "a"}, measurement=None)
    assert calls == [SinkCall("add_trial", ({"trial": 1},)), SinkCall("point_done", (3,)),
                     SinkCall("add_result", ({"query_id": "a"},), {"measurement": None})]
    assert set(TrialSink.__abstractmethods__) <= set(type(trial_sink).__dict__)


def test_stream_work_batches_by_count_and_ends_with_the_value():
    batches = list(stream_work(ListWork(10), max_calls=4, flush_s=60, heartbeat_s=60))
    assert [len(b.calls) for b in batches] == [4, 4, 2]
    assert [c.args[0]["query_id"] for b in batches for c in b.calls] == [f"q{i}" for i in range(10)]
    assert batches[-1].end == End("done", value="the value")
    assert all(b.end is None for b in batches[:-1])
    assert "all sent" in [line for b in batches for line in b.progress]


def test_stream_work_flushes_after_flush_s_and_beats_while_quiet():
    started = time.monotonic()
    batches = list(stream_work(ListWork(3, pause_s=0.3), max_calls=100, flush_s=0.05, heartbeat_s=0.1))
    assert time.monotonic() - started < 5
    with_calls = [b for b in batches if b.calls]
    assert len(with_calls) == 3  # each call sent alone: 0.05 s after it came, not held for a full batch
    assert any(not b.calls and b.end is None for b in batches)  # heartbeats while the work was quiet


def test_stream_work_reports_a_failure_in_words_and_a_cancel():
    failed = list(stream_work(ListWork(2, error=PlannerError("the model could not load")), flush_s=0))
    assert failed[-1].end == End("failed", reason="the model could not load")
    assert sum(len(b.calls) for b in failed) == 2  # what was measured before the failure still comes
    crashed = list(stream_work(ListWork(0, error=RuntimeError("CUDA error: out of memory\nmore")), flush_s=0))
    assert crashed[-1].end.reason == "RuntimeError: CUDA error: out of memory"
    cancelled = list(stream_work(ListWork(1, error=runs.RunCancelled()), flush_s=0))
    assert cancelled[-1].end.status == "cancelled"


# -- the driver's loop ---------------------------------------------------------------------------

class Collect:
    """A target sink that keeps every record, and a StoringSink around it (a record's id: its device and query)."""

    def __init__(self, stored=()):
        self.rows: list[dict] = []
        self.storing = StoringSink(self, {"add_result": lambda result, *_: (result["device"], result["query_id"])},
                                   stored)

    def add_result(self, result, measurement):
        self.rows.append(result)


def parts(**per_device) -> list[Part]:
    return [Part(device, ListWork(n)) for device, n in per_device.items()]


def test_two_devices_stream_to_the_end_each_record_once_in_cluster_terms():
    collect, ended = Collect(), []
    outcome = drive(FakeCluster(), parts(**{"nodeA/cpu": 5, "nodeB/cpu": 3}), collect.storing.deliver,
                    on_end=ended.append, poll_s=0.01)
    assert {d: r.status for d, r in outcome.items()} == {"nodeA/cpu": "done", "nodeB/cpu": "done"}
    assert outcome["nodeA/cpu"].value == "the value"
    assert sorted((r["device"], r["query_id"]) for r in collect.rows) == sorted(
        [("nodeA/cpu", f"q{i}") for i in range(5)] + [("nodeB/cpu", f"q{i}") for i in range(3)])
    assert {r["host"] for r in collect.rows if r["device"] == "nodeB/cpu"} == {"nodeB"}
    assert [r.device for r in ended] and len(ended) == 2


def test_a_lost_node_fails_its_device_at_once_and_the_other_goes_on():
    collect, ended = Collect(), []
    cluster = FakeCluster({"nodeB/cpu": {"lose_after": 2}})
    outcome = drive(cluster, parts(**{"nodeA/cpu": 8, "nodeB/cpu": 8}), collect.storing.deliver,
                    on_end=ended.append, poll_s=0.01)
    assert outcome["nodeA/cpu"].status == "done"
    assert outcome["nodeB/cpu"].status == "failed"
    assert outcome["nodeB/cpu"].reason == "nodeB/cpu: node nodeB was lost (ActorDiedError: its node has died)"
    assert ended[0].device == "nodeB/cpu"  # reported when it happened, before the other device ended
    kept = [r["query_id"] for r in collect.rows if r["device"] == "nodeB/cpu"]
    assert kept == ["q0", "q1"]  # what came before the loss is kept
    assert len([r for r in collect.rows if r["device"] == "nodeA/cpu"]) == 8
    assert [s.stopped for s in cluster.streams] == [True, True]  # ended parts' actors are stopped too


def test_a_stream_rerun_from_its_start_stores_nothing_twice_and_loses_nothing():
    collect = Collect()
    cluster = FakeCluster({"nodeA/cpu": {"rerun_after": 3}})
    outcome = drive(cluster, parts(**{"nodeA/cpu": 6}), collect.storing.deliver, poll_s=0.01)
    assert outcome["nodeA/cpu"].status == "done" and cluster.streams[0].reruns == 1
    assert [r["query_id"] for r in collect.rows] == [f"q{i}" for i in range(6)]
    assert collect.storing.skipped == 3 and collect.storing.stored_now == 6


def test_records_already_stored_before_the_run_are_skipped():
    collect = Collect(stored={("nodeA/cpu", "q0"), ("nodeA/cpu", "q2")})
    drive(FakeCluster(), parts(**{"nodeA/cpu": 4}), collect.storing.deliver, poll_s=0.01)
    assert [r["query_id"] for r in collect.rows] == ["q1", "q3"]


def test_a_silent_node_a_node_that_never_starts_and_a_node_declared_dead_fail_their_device():
    collect = Collect()
    cluster = FakeCluster({"nodeA/cpu": {"silent_after": 1}, "nodeB/cpu": {"dead_after": 1},
                           "nodeC/cpu": {"silent_after": 0}})
    started = time.monotonic()
    outcome = drive(cluster, [Part("nodeA/cpu", ListWork(5)), Part("nodeB/cpu", ListWork(50, pause_s=0.01)),
                              Part("nodeC/cpu", ListWork(5))],
                    collect.storing.deliver, poll_s=0.01, stall_s=0.3, start_s=0.6, liveness_s=0.05)
    assert time.monotonic() - started < 5
    assert outcome["nodeA/cpu"].reason == ("nodeA/cpu: no word from node nodeA for 0.3 s (frozen, or its network "
                                           "is gone); its work there was stopped")
    assert outcome["nodeB/cpu"].reason == "nodeB/cpu: node nodeB was declared dead by the cluster"
    assert outcome["nodeC/cpu"].reason.startswith("nodeC/cpu: node nodeC did not start the work within 0.6 s")
    assert all(s.stopped for s in cluster.streams)


def test_a_device_whose_node_is_absent_fails_and_a_stop_cancels_the_rest():
    collect = Collect()
    stop = threading.Event()
    cluster = FakeCluster({"nodeA/cpu": {"silent_after": 1}}, absent=("nodeC/cpu",),
                          on_take=lambda stream: stop.set())
    outcome = drive(cluster, [Part("nodeA/cpu", ListWork(5)), Part("nodeC/cpu", ListWork(5))],
                    collect.storing.deliver, stop_requested=stop.is_set, poll_s=0.01)
    assert outcome["nodeC/cpu"].status == "failed" and "nodeC is not in the cluster now" in outcome["nodeC/cpu"].reason
    assert outcome["nodeA/cpu"].status == "cancelled"
    assert cluster.streams[0].stopped


# -- the driver, storing into the database ----------------------------------------------------------

def test_an_execution_on_two_nodes_lands_in_one_database_with_its_nodes(demo_store: Store):
    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 4, "nodeB/cpu": 3}))
    assert json.loads(demo_store.query_one("SELECT settings FROM executions WHERE id = ?", [execution.id])[0]) == {
        "devices": ["nodeA/cpu", "nodeB/cpu"]}
    drive_execution(demo_store, execution.id, FakeCluster(), measuring=EXECUTION_FAKES, poll_s=0.01)
    assert status(demo_store, execution.id) == ("done", None)
    frame = results(demo_store, execution.id)
    assert len(frame) == 7 and frame["query_id"].is_unique
    assert (frame["device"] == frame["query_id"].str.split("-q").str[0]).all()  # each on its planned device
    assert (frame["measured_on"] == frame["device"]).all()
    assert set(frame["host"]) == {"nodeA", "nodeB"}
    assert {d: p.status for d, p in part_states(demo_store, execution.id).items()} == {"nodeA/cpu": "done",
                                                                                       "nodeB/cpu": "done"}
    assert get_execution(demo_store, execution.id).queries_done == 7


def test_a_node_lost_mid_execution_fails_its_part_at_once_keeps_all_and_resume_runs_only_the_rest(demo_store: Store):
    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 6, "nodeB/cpu": 6}))
    seen_while_running = []

    def look(stream):  # what the database says while device A still runs, once B was lost
        if stream.node == "nodeA" and not seen_while_running and any(s.stopped for s in stream.cluster.streams):
            seen_while_running.append((part_states(demo_store, execution.id), status(demo_store, execution.id)))

    cluster = FakeCluster({"nodeB/cpu": {"lose_after": 2}}, on_take=look)
    with pytest.raises(PlannerError, match="nodeB/cpu: node nodeB was lost") as failure:
        drive_execution(demo_store, execution.id, cluster, measuring=EXECUTION_FAKES, poll_s=0.01)
    parts_then, (status_then, reason_then) = seen_while_running[0]
    assert parts_then["nodeB/cpu"].status == "failed" and "node nodeB was lost" in parts_then["nodeB/cpu"].reason
    assert parts_then["nodeA/cpu"].status == "running"
    assert status_then == "running" and reason_then.endswith("; the other devices go on")
    runs.set_status(demo_store, runs.EXECUTION, execution.id, "failed", str(failure.value))  # as worker_main does

    frame = results(demo_store, execution.id)
    assert sorted(frame["query_id"]) == sorted([f"nodeA/cpu-q{i}" for i in range(6)] +
                                               ["nodeB/cpu-q0", "nodeB/cpu-q1"])

    resume_execution(demo_store, execution.id)
    again = FakeCluster()
    drive_execution(demo_store, execution.id, again, measuring=EXECUTION_FAKES, poll_s=0.01)
    assert [s.part.device for s in again.streams] == ["nodeB/cpu"]  # only what was left, on its node
    assert len(again.streams[0].part.work.queries) == 4
    frame = results(demo_store, execution.id)
    assert len(frame) == 12 and frame["query_id"].is_unique
    assert status(demo_store, execution.id) == ("done", None)
    assert part_states(demo_store, execution.id)["nodeB/cpu"].status == "done"


def test_a_rerun_stream_of_an_execution_stores_each_query_and_measurement_once(demo_store: Store):
    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 5}))
    drive_execution(demo_store, execution.id, FakeCluster({"nodeA/cpu": {"rerun_after": 3}}),
                    measuring=EXECUTION_FAKES, poll_s=0.01)
    assert len(results(demo_store, execution.id)) == 5
    assert demo_store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 5


def test_resume_on_another_node_of_the_same_type_when_the_user_moves_the_device(demo_store: Store):
    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 3, "nodeB/cpu": 4}))
    with pytest.raises(PlannerError):
        drive_execution(demo_store, execution.id, FakeCluster({"nodeB/cpu": {"lose_after": 1}}),
                        measuring=EXECUTION_FAKES, poll_s=0.01)
    runs.set_status(demo_store, runs.EXECUTION, execution.id, "failed", "nodeB lost")
    inventory = ClusterInventory("head:6379", tuple(nodes_from_records([
        record("nodeA", True), record("nodeB", False), record("nodeC", True),
        record("nodeD", True, labels={"joule/cpu": "Other-CPU"})])))
    with pytest.raises(InputError, match="nodeC/cuda:0 are different kinds"):
        move_device(demo_store, execution.id, "nodeB/cpu", "nodeC/cuda:0", same_type=inventory.same_type)
    with pytest.raises(InputError, match="nodeA/cpu runs queries of its own"):
        move_device(demo_store, execution.id, "nodeB/cpu", "nodeA/cpu", same_type=inventory.same_type)
    with pytest.raises(InputError, match="nodeB/cpu is a Test-CPU, nodeD/cpu a Other-CPU"):
        move_device(demo_store, execution.id, "nodeB/cpu", "nodeD/cpu", same_type=inventory.same_type)
    move_device(demo_store, execution.id, "nodeB/cpu", "nodeC/cpu", same_type=inventory.same_type)
    assert placement(demo_store, execution.id) == {"nodeB/cpu": "nodeC/cpu"}

    resume_execution(demo_store, execution.id)
    with pytest.raises(InputError, match="is queued"):
        move_device(demo_store, execution.id, "nodeB/cpu", "nodeB/cpu")
    cluster = FakeCluster()
    drive_execution(demo_store, execution.id, cluster, measuring=EXECUTION_FAKES, poll_s=0.01)
    assert [s.part.device for s in cluster.streams] == ["nodeC/cpu"]
    frame = results(demo_store, execution.id)
    moved = frame[frame["query_id"].str.startswith("nodeB/cpu")]
    assert len(frame) == 7 and len(moved) == 4
    assert list(moved["measured_on"]) == ["nodeB/cpu"] + ["nodeC/cpu"] * 3  # each result names its measuring device
    assert part_states(demo_store, execution.id)["nodeB/cpu"] == DevicePart("nodeB/cpu", "nodeC/cpu", "done")
    assert runs.run_on_device(demo_store, "nodeC/cpu") is None  # done: it holds nothing now


def test_a_plan_mixing_this_hosts_devices_with_cluster_devices_is_refused(demo_store: Store):
    plan_id = make_plan(demo_store, {"nodeA/cpu": 1, "cpu": 1})
    execution = create_execution(demo_store, plan_id)
    with pytest.raises(PlannerError, match=r"mixes devices of this host \(cpu\)"):
        drive_execution(demo_store, execution.id, FakeCluster(), measuring=EXECUTION_FAKES)


SETTINGS = jobs.ProfileSettings(min_trials=2, max_trials=2, warmup_runs=0, idle_s=0.5, seed=3)


def profiling_job(store: Store, device: str = "nodeA/cpu") -> jobs.Job:
    return jobs.create_job(store, "demo-large", device, "custom", inputs=[8, 16], outputs=[4], settings=SETTINGS)


def trials(store: Store, job_id: int) -> pd.DataFrame:
    return store.query_df("SELECT device, host, input_tokens, output_tokens, trial FROM measurements WHERE job_id = ? "
                          "ORDER BY input_tokens, trial", [job_id])


def test_a_profiling_job_on_a_node_stores_every_trial_once_even_when_its_stream_is_rerun(demo_store: Store):
    job = profiling_job(demo_store)
    assert job.device == "nodeA/cpu"
    drive_profiling(demo_store, job.id, FakeCluster({"nodeA/cpu": {"rerun_after": 3}}), measuring=FAKES,
                    poll_s=0.01)
    frame = trials(demo_store, job.id)
    assert list(zip(frame.input_tokens, frame.trial)) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert set(frame.device) == {"nodeA/cpu"} and set(frame.host) == {"nodeA"}
    assert jobs.get_job(demo_store, job.id).status == "done"
    assert jobs.get_job(demo_store, job.id).points_done == 2


def test_a_profiling_job_whose_node_is_lost_keeps_its_trials_and_resumes_with_the_rest(demo_store: Store):
    job = profiling_job(demo_store)
    with pytest.raises(PlannerError, match="nodeA/cpu: node nodeA was lost"):
        drive_profiling(demo_store, job.id, FakeCluster({"nodeA/cpu": {"lose_after": 3}}), measuring=FAKES,
                        poll_s=0.01)
    kept = len(trials(demo_store, job.id))
    assert kept == 2  # two trials (the third call was the first point's point_done)
    runs.set_status(demo_store, runs.PROFILING, job.id, "failed", "lost")
    runs.check_resumable(demo_store, runs.PROFILING, job.id)
    runs.requeue(demo_store, runs.PROFILING, job.id)
    cluster = FakeCluster()
    drive_profiling(demo_store, job.id, cluster, measuring=FAKES, poll_s=0.01)
    assert len(cluster.streams[0].part.work.stored) == 2  # the node was told what was stored
    frame = trials(demo_store, job.id)
    assert list(zip(frame.input_tokens, frame.trial)) == [(8, 1), (8, 2), (16, 1), (16, 2)]


def test_a_model_file_missing_on_the_node_is_named_with_its_node_and_path(demo_store: Store, tmp_path):
    entry = catalog.get_model(demo_store, "demo-large")
    work = ExecutionWork(1, "cpu", pd.DataFrame({"model": ["demo-large", "gone"]}),
                         {"demo-large": entry, "gone": catalog.CatalogEntry(
                             **{**entry.__dict__, "name": "gone", "path": str(tmp_path / "gone.gguf")})})
    message = missing_model_files(work, "nodeB")
    assert message == (f"the model file of gone ({tmp_path / 'gone.gguf'}) is not on node nodeB: copy it there at "
                       "that path (relative paths are under the node's checkout of the project)")
    job = profiling_job(demo_store)
    assert missing_model_files(ProfileWork(job, "llama.cpp", entry.path, pd.DataFrame()), "nodeA") is None


# -- connecting ----------------------------------------------------------------------------------

def test_addresses_are_read_in_words():
    assert parse_address("10.0.0.5:6380") == HeadAddress("10.0.0.5", 6380)
    assert parse_address("head.lab") == HeadAddress("head.lab", 6379)
    assert parse_address("[::1]:6379") == HeadAddress("::1", 6379)
    assert parse_address("127.0.0.1:1").is_loopback and not parse_address("10.0.0.5:1").is_loopback
    for bad in ("head:port", "head:0", ":6379"):
        with pytest.raises(ClusterConfigError, match="not a cluster address"):
            parse_address(bad)
    with pytest.raises(ClusterConfigError, match="Ray Client addresses"):
        parse_address("ray://head:10001")


def test_no_connection_without_token_authentication(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(ClusterConfigError, match="needs token authentication: export RAY_AUTH_MODE=token"):
        check_token({}, home)
    with pytest.raises(ClusterConfigError, match="needs token authentication"):
        check_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home)
    with pytest.raises(ClusterConfigError, match="no cluster token found"):
        check_token({"RAY_AUTH_MODE": "token"}, home)
    with pytest.raises(ClusterConfigError, match="which is not a file"):
        check_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}, home)
    assert check_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "abc"}, home) == "RAY_AUTH_TOKEN"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("abc")
    assert check_token({"RAY_AUTH_MODE": "TOKEN"}, home) == str(home / ".ray" / "auth_token")


def test_an_unreachable_head_is_a_sentence_within_the_timeout():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match=rf"cannot reach the Ray cluster's head at 127.0.0.1:{port}"):
        check_reachable(HeadAddress("127.0.0.1", port), timeout_s=2)
    assert time.monotonic() - started < 3


def test_a_refused_token_is_found_in_the_exception_chain():
    try:
        try:
            raise RuntimeError("ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
                               "is missing or incorrect")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1") from cause
    except ConnectionError as exc:
        assert refusal_reason(exc) == "the cluster refused our token"
    assert refusal_reason(ConnectionError("Failed to connect")) is None


# -- nodes ---------------------------------------------------------------------------------------

CPU = DeviceFacts("cpu", "cpu", "Test CPU", 8 * 2**30)
A100 = DeviceFacts("cuda:0", "gpu", "NVIDIA A100-SXM4-80GB", 80 * 2**30)


def record(name: str, alive: bool, node_id: str | None = None, labels: dict | None = None,
           devices=(CPU,), **extra) -> dict:
    """A record of Ray's node table for a node our agent started."""
    return {"NodeID": node_id or f"id-{name}-{alive}", "Alive": alive, "NodeName": name,
            "NodeManagerAddress": "10.0.0.9", "Labels": {**node_labels(name, devices), **(labels or {})},
            "Resources": node_resources(name, devices) if alive else {}, **extra}


def test_the_agent_offers_each_device_as_a_resource_and_labels_it_with_its_model():
    assert node_labels("gpu1", (CPU, A100)) == {"joule/node": "gpu1", "joule/cpu": "Test-CPU",
                                                "joule/cuda-0": "NVIDIA-A100-SXM4-80GB"}
    assert node_resources("gpu1", (CPU, A100)) == {"joule_dev_gpu1_cpu": 1, "joule_dev_gpu1_cuda-0": 1}
    command = start_command("gpu1", (CPU, A100), address="10.0.0.5:6379", head_port=None,
                            extra=["--node-manager-port", "6380"])
    assert command[1:4] == ["start", "--address", "10.0.0.5:6379"]
    assert command[command.index("--labels") + 1] == "joule/node=gpu1,joule/cpu=Test-CPU,joule/cuda-0=NVIDIA-A100-SXM4-80GB"
    assert json.loads(command[command.index("--resources") + 1]) == {"joule_dev_gpu1_cpu": 1, "joule_dev_gpu1_cuda-0": 1}
    assert command[-2:] == ["--node-manager-port", "6380"]
    head = start_command("h", (CPU,), address=None, head_port=6379, extra=[])
    assert head[1:5] == ["start", "--head", "--port", "6379"]


def test_the_agent_prints_its_command_on_dry_run_and_refuses_without_a_token(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert agent_main(["start", "--address", "10.0.0.5:6379", "--name", "nodeA", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nodeA/cpu: " in out
    assert "ray start --address 10.0.0.5:6379 --node-name nodeA --labels joule/node=nodeA,joule/cpu=" in out
    assert "joule_dev_nodeA_cpu" in out
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert agent_main(["start", "--address", "10.0.0.5:6379", "--dry-run"]) == 2
    assert "needs token authentication" in capsys.readouterr().err
    assert agent_main(["start", "--address", "x:1", "--name", "bad name", "--dry-run"]) == 2
    assert "not a usable node name" in capsys.readouterr().err


def test_devices_are_read_through_nvml_and_none_when_it_fails():
    import pynvml

    from tests.test_energy_nvml import FakeNvml, hopper

    class MemoryNvml(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, gpu):
            return type("Memory", (), {"total": 80 * 2**30})()

    devices = detect_devices(MemoryNvml([hopper()]), env={})
    assert [(d.device, d.kind, d.model, d.memory_bytes) for d in devices[1:]] == [
        ("cuda:0", "gpu", "NVIDIA H100 80GB HBM3", 80 * 2**30)]
    assert devices[0].device == "cpu" and devices[0].memory_bytes > 0
    hidden = detect_devices(MemoryNvml([hopper()]), env={"CUDA_VISIBLE_DEVICES": ""})
    assert [d.device for d in hidden] == ["cpu"]
    broken = detect_devices(FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound()), env={})
    assert [d.device for d in broken] == ["cpu"]
    assert [d.device for d in detect_devices(None)] == ["cpu"]


def test_the_inventory_shows_live_nodes_with_their_facts_and_a_node_that_left():
    facts = {"nodeA": NodeFacts("nodeA", "hostA", (CPU, A100),
                                (SensorStatus("nvml-counter", "cuda:0", "measured", "A100: counter"),)),
             "nodeB": "node nodeB did not answer within 20 s"}
    records = [record("nodeA", True, devices=(CPU, A100)), record("nodeB", True),
               record("nodeC", False, devices=(CPU, A100), DeathReasonMessage="health check failed\nmore"),
               record("nodeD", False, node_id="old"), record("nodeD", True, node_id="new"),
               {"NodeID": "x", "Alive": True, "NodeName": "apphost", "Labels": {}, "Resources": {"CPU": 0}}]
    nodes = {n.name: n for n in nodes_from_records(records, facts)}
    assert [n.name for n in nodes_from_records(records, facts)] == ["apphost", "nodeA", "nodeB", "nodeD", "nodeC"]
    a = nodes["nodeA"]
    assert a.alive and a.joule and a.status == "alive" and a.note is None
    assert [(d.name, d.model, d.memory_bytes) for d in a.devices] == [
        ("nodeA/cpu", "Test CPU", 8 * 2**30), ("nodeA/cuda:0", "NVIDIA A100-SXM4-80GB", 80 * 2**30)]
    assert a.sensors[0].source == "nvml-counter"
    assert nodes["nodeB"].note == "node nodeB did not answer within 20 s"
    assert [d.model for d in nodes["nodeB"].devices] == ["Test-CPU"]  # from its label when it did not answer
    c = nodes["nodeC"]
    assert not c.alive and c.status == "left" and c.note == "left the cluster (health check failed)"
    assert [d.name for d in c.devices] == ["nodeC/cpu", "nodeC/cuda:0"]  # what it had, from its labels
    assert nodes["nodeD"].alive  # rejoined: its live record counts
    assert not nodes["apphost"].joule and nodes["apphost"].devices == ()
    assert "not started by the node agent" in nodes["apphost"].note
    inventory = ClusterInventory("h:1", tuple(nodes.values()))
    lines = describe(ClusterInventory("h:1", tuple(nodes_from_records(records, facts))))
    assert lines[0] == "cluster at h:1: 4 of 5 nodes alive"
    assert "nodeC (left, left the cluster (health check failed))" in lines
    assert "    nodeA/cuda:0: NVIDIA A100-SXM4-80GB, 80 GiB" in lines
    assert "    sensor nvml-counter (cuda:0): measured: A100: counter" in lines
    assert inventory.same_type("nodeA/cpu", "nodeB/cpu") is None  # one model, as the node and as its label spell it
    assert inventory.same_type("nodeA/cuda:0", "nodeB/cpu").startswith("nodeA/cuda:0 is a NVIDIA A100")
    assert inventory.same_type("nodeA/cpu", "nodeC/cpu") == "node nodeC has left the cluster"
    assert inventory.same_type("nodeA/cpu", "nodeE/cpu") == "the cluster has no device nodeE/cpu"


# -- where runs start ----------------------------------------------------------------------------

def test_the_launcher_is_the_local_one_without_a_cluster_address(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    use_cluster(None)
    assert type(runs.current_launcher()) is LocalProcessLauncher
    assert cluster_address() is None
    monkeypatch.setenv(ADDRESS_ENV, " 10.0.0.5:6379 ")
    launcher = runs.current_launcher()
    assert isinstance(launcher, RayLauncher) and launcher.address == "10.0.0.5:6379"
    use_cluster("10.0.0.6:6379")
    try:
        assert runs.current_launcher().address == "10.0.0.6:6379"
    finally:
        use_cluster(None)


def test_cluster_devices_need_a_cluster_address(monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    use_cluster(None)
    with pytest.raises(DeviceUnavailableError, match=f"nodeA/cuda:0 is a device of a cluster node; set {ADDRESS_ENV}"):
        runs.check_device("nodeA/cuda")
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.5:6379")
    assert runs.check_device("nodeA/cuda") == "nodeA/cuda:0"
    with pytest.raises(DeviceUnavailableError, match="NODE/DEVICE"):
        runs.check_device("nodeA/")


def test_the_ray_launcher_drives_cluster_runs_and_starts_the_local_worker_for_the_others(demo_store: Store,
                                                                                          monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef")
    cluster_job = profiling_job(demo_store, "nodeA/cpu")
    launcher = RayLauncher("127.0.0.1:9")
    process = launcher.start(runs.PROFILING, demo_store, cluster_job.id)
    try:
        command = psutil_cmdline(process.pid)
        assert command[1:3] == ["-m", "engine.cluster.driver"]
        assert command[-4:] == ["--db", str(demo_store.path.resolve()), "--job", str(cluster_job.id)]
        assert launcher.is_alive(runs.PROFILING, cluster_job.id, process.pid)
        assert not launcher.is_alive(runs.PROFILING, cluster_job.id + 1, process.pid)
        assert process.wait(60) == 1  # nothing listens at 127.0.0.1:9: the run fails in words
    finally:
        if process.poll() is None:
            process.kill()
    status_, reason = demo_store.query_one("SELECT status, reason FROM profiling_jobs WHERE id = ?",
                                           [cluster_job.id])
    assert status_ == "failed" and reason.startswith("cannot reach the Ray cluster's head at 127.0.0.1:9")
    local_job = jobs.create_job(demo_store, "demo-large", "cpu", "custom", inputs=[8], outputs=[4], settings=SETTINGS)
    process = launcher.start(runs.PROFILING, demo_store, local_job.id)
    try:
        assert psutil_cmdline(process.pid)[1:3] == ["-m", "engine.profiling.worker"]
        assert launcher.is_alive(runs.PROFILING, local_job.id, process.pid)
    finally:
        process.kill()
        process.wait()


def psutil_cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(pid).cmdline()


def test_the_single_host_path_never_imports_ray(tmp_path):
    code = ("import sys\n"
            "from engine import cli, runs\n"
            f"assert cli.main(['models', 'list', '--db', {str(tmp_path / 'p.duckdb')!r}]) == 0\n"
            "runs.current_launcher(); runs.check_device('cpu')\n"
            "import engine.cluster, engine.cluster.naming, engine.runs.cluster\n"
            "print('ray' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != ADDRESS_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
