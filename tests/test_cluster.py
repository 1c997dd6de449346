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


# -- qualified names through schedules, plans and executions; the migration ---------------------------

def write_schedule(path: Path, rows: list[str]) -> Path:
    path.write_text("id,model,device,input_tokens,output_tokens,predicted_energy_j,predicted_runtime_s,device_start_s\n"
                    + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_a_schedule_names_cluster_devices_only_while_a_cluster_address_is_set(demo_store: Store, tmp_path, monkeypatch):
    from engine.execution import import_schedule, plan_queries

    schedule = write_schedule(tmp_path / "s.csv", ["a1,demo-large,nodeA/cpu,8,4,1,0.1,0", "b1,demo-large,nodeB/CUDA,8,4,1,0.1,0",
                                                   "h1,demo-large,cpu,8,4,1,0.1,0"])
    plan_id = import_schedule(demo_store, schedule)
    assert sorted(plan_queries(demo_store, plan_id)["device"]) == ["cpu", "nodeA/cpu", "nodeB/cuda:0"]
    monkeypatch.delenv(ADDRESS_ENV)
    with pytest.raises(InputError) as refused:
        import_schedule(demo_store, schedule)
    problems = [str(p) for p in refused.value.problems]
    assert len(problems) == 2 and f"{schedule}:2" in problems[0] and f"{schedule}:3" in problems[1]
    assert "nodeA/cpu is a device of a cluster node; set PLANNER_RAY_ADDRESS" in problems[0]
    assert demo_store.query_one("SELECT count(*) FROM plans")[0] == 1  # the refused file stored nothing


def test_model_files_are_checked_on_this_host_for_its_devices_and_left_to_the_node_for_a_nodes(demo_store: Store):
    demo_store.execute("UPDATE models SET path = '/only/on/the/nodes/demo-large.gguf' WHERE name = 'demo-large'")
    node_plan, here_plan = make_plan(demo_store, {"nodeA/cpu": 2}), make_plan(demo_store, {"cpu": 2})
    assert create_execution(demo_store, node_plan).status == "queued"
    with pytest.raises(InputError, match="the files of 'demo-large' are no longer at /only/on/the/nodes"):
        create_execution(demo_store, here_plan)
    job = jobs.create_job(demo_store, "demo-large", "nodeB/cpu", "custom", inputs=[8], outputs=[4], settings=SETTINGS)
    assert job.device == "nodeB/cpu"
    with pytest.raises(InputError, match="demo-large's files are gone"):
        jobs.prepare_job(demo_store, "demo-large", "cpu", "custom", inputs=[8], outputs=[4], settings=SETTINGS)


def test_a_plan_over_two_nodes_devices_keeps_their_names_and_a_deadline_each_and_runs_there(demo_store: Store,
                                                                                            tmp_path):
    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements
    from engine.planning import PlanSettings, plan_workload, read_workload
    from tests.conftest import write_grid_csv

    grid = write_grid_csv(tmp_path / "grid.csv", "estimated").read_text().splitlines()
    slower = [",".join(f"{float(v) * 2:g}" if i in (4, 5) else v for i, v in enumerate(line.split(",")))
              for line in grid[1:]]
    text = "\n".join([grid[0], *[line.replace("sim,gpu0,", "demo-large,nodeA/cpu,") for line in grid[1:]],
                      *[line.replace("sim,gpu0,", "demo-large,nodeB/cpu,") for line in slower]])
    (tmp_path / "m.csv").write_text(text + "\n")
    import_measurements(demo_store, tmp_path / "m.csv")
    fits = save_fits(demo_store, fit_all(demo_store, model="demo-large"))
    assert {f.device for f in fits} == {"nodeA/cpu", "nodeB/cpu"}
    workload = tmp_path / "w.csv"
    workload.write_text("id,input_tokens,output_tokens\n" + "".join(f"q{i},32,8\n" for i in range(20)))
    alone = plan_workload(demo_store, read_workload(workload), PlanSettings())
    assert alone.assignments == {"demo-large@nodeA/cpu": 20}  # the faster node's device takes everything
    needed_s = alone.per_device_runtime_s["nodeA/cpu"]
    split = plan_workload(demo_store, read_workload(workload),
                          PlanSettings(deadlines_s={"nodeA/cpu": needed_s / 2, "nodeB/cpu": 10 * needed_s}))
    assert set(split.assignments) == {"demo-large@nodeA/cpu", "demo-large@nodeB/cpu"}  # a deadline per device
    assert split.per_device_runtime_s["nodeA/cpu"] <= needed_s / 2 * 1.001
    execution = create_execution(demo_store, split.plan_id)
    drive_execution(demo_store, execution.id, FakeCluster(), measuring=EXECUTION_FAKES, poll_s=0.01)
    frame = results(demo_store, execution.id)
    assert len(frame) == 20 and set(frame["device"]) == {"nodeA/cpu", "nodeB/cpu"}
    assert (frame["host"] == frame["device"].str.split("/").str[0]).all()


def test_the_migration_records_each_measurements_host_and_an_old_database_plans_as_before(tmp_path):
    import duckdb

    from engine.fitting import fit_all, save_fits
    from engine.measurements_io import import_measurements
    from engine.planning import PlanSettings, plan_workload, read_workload
    from engine.store import MIGRATIONS, migrate
    from tests.conftest import write_grid_csv

    hosts = next(m for m in MIGRATIONS if m.description.startswith("device names:"))
    before = tuple(m for m in MIGRATIONS if m.version < hosts.version)
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        migrate(con, before)
    old = Store(path, migrations=before)
    catalog.add_model(old, name="sim", accuracy=0.6, accuracy_source="test", backend="external", path=None)
    import_measurements(old, write_grid_csv(tmp_path / "grid.csv"))
    save_fits(old, fit_all(old))
    workload = tmp_path / "w.csv"
    workload.write_text("id,input_tokens,output_tokens\n" + "".join(f"q{i},{8 * (i + 1)},16\n" for i in range(10)))
    planned_before = plan_workload(old, read_workload(workload), PlanSettings(deadline_s=100.0))
    rows = [  # (id, job, origin, device, host) as versions before the migration left them
        (1001, 1, "profiled", "cpu", None), (1002, 1, "profiled", "cpu", "elsewhere"),
        (1003, 2, "profiled", "nodeA/cpu", "apphost"), (1004, None, "imported", "cpu", None),
        (1005, None, "executed", "cpu", None), (1006, None, "executed", "nodeB/cuda:0", None)]
    with old.transaction() as con:
        con.execute("INSERT INTO profiling_jobs (id, model, device, host, design, status) VALUES "
                    "(1, 'sim', 'cpu', 'apphost', '{}', 'done'), (2, 'sim', 'nodeA/cpu', 'apphost', '{}', 'done')")
        con.execute("INSERT INTO executions (id, plan_id, host, status) VALUES (1, 1, 'apphost', 'done')")
        for id_, job, origin, device, host in rows:
            con.execute("INSERT INTO measurements (id, job_id, origin, model, device, host, input_tokens, "
                        "output_tokens, runtime_s) VALUES (?, ?, ?, 'sim', ?, ?, 8, 8, 0.1)",
                        [id_, job, origin, device, host])
        con.execute("INSERT INTO execution_results (execution_id, query_id, model, device, input_tokens, "
                    "output_tokens, measurement_id) VALUES (1, 'x', 'sim', 'cpu', 8, 8, 1005), "
                    "(1, 'y', 'sim', 'nodeB/cuda:0', 8, 8, 1006)")

    new = Store(path)
    assert new.schema_version() == MIGRATIONS[-1].version
    stored = dict(new.query_df("SELECT id, coalesce(host, 'none') FROM measurements WHERE id > 1000").itertuples(
        index=False))
    assert stored == {1001: "apphost", 1002: "elsewhere", 1003: "nodeA", 1004: "none", 1005: "apphost",
                      1006: "nodeB"}
    assert new.query_one("SELECT count(*) FROM measurements WHERE id < 1000 AND host IS NULL")[0] == 36  # imported
    planned_after = plan_workload(new, read_workload(workload), PlanSettings(deadline_s=100.0))
    assert planned_after.assignments == planned_before.assignments == {"sim@gpu0": 10}
    assert planned_after.energy_j == pytest.approx(planned_before.energy_j)
    assert planned_after.per_device_runtime_s == pytest.approx(planned_before.per_device_runtime_s)


# -- the cluster setting, the inventory in a process of its own, the CLI ------------------------------

def two_nodes_one_left() -> ClusterInventory:
    return ClusterInventory("10.0.0.5:6379", tuple(nodes_from_records(
        [record("nodeA", True), record("nodeC", True), record("nodeB", False, DeathReasonMessage="killed")],
        {"nodeA": NodeFacts("nodeA", "hostA", (CPU,), (SensorStatus("estimate", "cpu", "estimated", "no RAPL"),))})))


def test_the_saved_address_is_checked_and_the_environment_wins(store: Store, monkeypatch):
    from engine.runs.cluster import configured_address, save_address, saved_address

    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    assert configured_address(store) == (None, None)
    assert save_address(store, " head.lab ") == "head.lab:6379"
    assert saved_address(store) == "head.lab:6379"
    assert configured_address(store) == ("head.lab:6379", "the saved setting")
    with pytest.raises(ClusterConfigError, match="not a cluster address"):
        save_address(store, "head:port")
    assert saved_address(store) == "head.lab:6379"
    monkeypatch.setenv(ADDRESS_ENV, "10.0.0.5:6379")
    assert configured_address(store) == ("10.0.0.5:6379", ADDRESS_ENV)
    assert save_address(store, "") is None and saved_address(store) is None


def test_the_inventory_round_trips_through_json_and_a_failing_process_says_why_in_words(monkeypatch):
    from dataclasses import asdict

    from engine.cluster.errors import ClusterError
    from engine.cluster.inventory import read_inventory_in_subprocess

    inventory = two_nodes_one_left()
    again = ClusterInventory.from_dict(json.loads(json.dumps(asdict(inventory))))
    assert again == inventory
    assert [d.name for d in again.live_devices()] == ["nodeA/cpu", "nodeC/cpu"]
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="^connecting to a cluster needs token authentication"):
        read_inventory_in_subprocess("127.0.0.1:9", timeout_s=60)
    assert time.monotonic() - started < 60


def test_an_executions_parts_by_node_and_where_a_failed_device_may_move(demo_store: Store):
    from engine.cluster.runstate import apply_moves, move_candidates, parts_table
    from engine.execution import execution_progress

    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 3, "nodeB/cpu": 4}))
    with pytest.raises(PlannerError):
        drive_execution(demo_store, execution.id, FakeCluster({"nodeB/cpu": {"lose_after": 1}}),
                        measuring=EXECUTION_FAKES, poll_s=0.01)
    table = parts_table(execution_progress(demo_store, execution.id).devices, part_states(demo_store, execution.id))
    assert table[["node", "device", "done", "total", "status"]].values.tolist() == [
        ["nodeA", "nodeA/cpu", 3, 3, "done"], ["nodeB", "nodeB/cpu", 1, 4, "failed"]]
    assert "node nodeB was lost" in table.reason.iloc[1]
    inventory = two_nodes_one_left()
    live = [d.name for d in inventory.live_devices()]
    assert move_candidates("nodeB/cpu", ["nodeA/cpu", "nodeB/cpu"], live, inventory.same_type) == ["nodeC/cpu"]
    runs.set_status(demo_store, runs.EXECUTION, execution.id, "failed", "nodeB lost")
    with pytest.raises(InputError, match="nodeB/cpu cannot stand in for nodeA/cpu: node nodeB has left"):
        apply_moves(demo_store, execution.id, {"nodeA/cpu": "nodeB/cpu"}, same_type=inventory.same_type)
    assert placement(demo_store, execution.id) == {}  # nothing kept when one move is refused
    assert apply_moves(demo_store, execution.id, {"nodeB/cpu": "nodeC/cpu"},
                       same_type=inventory.same_type) == {"nodeB/cpu": "nodeC/cpu"}


def cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    from engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    use_cluster(None)  # the CLI sets this process's cluster; tests run in one process
    return code, out.getvalue(), err.getvalue()


def test_the_cluster_commands_without_a_cluster_say_so_in_one_sentence(store: Store, demo_models, monkeypatch):
    monkeypatch.delenv(ADDRESS_ENV, raising=False)
    catalog.register_demo_models(store, list(demo_models.values()))
    db = str(store.path)
    code, out, err = cli("nodes", "--db", db)
    assert code == 2 and out == ""
    assert err.strip() == ("--ray-address: no cluster address is set; expected the head's HOST:PORT, given here or "
                           "in PLANNER_RAY_ADDRESS (or saved on the Home page)")
    code, _, err = cli("execute", "--resume", "1", "--move", "nodeB/cpu=nodeC/cpu", "--db", db)
    assert code == 2 and "no cluster address is set" in err
    code, _, err = cli("--ray-address", "head:port", "status", "--db", db)
    assert code == 2 and err.startswith("--ray-address: 'head:port' is not a cluster address")
    code, out, _ = cli("status", "--db", db)
    assert code == 0 and "cluster: none, everything runs on this host" in out
    code, _, err = cli("profile", "--model", "demo-large", "--device", "nodeA/cpu", "--db", db)
    assert code == 2 and "nodeA/cpu is a device of a cluster node; set PLANNER_RAY_ADDRESS" in err


def test_the_cluster_commands_list_nodes_start_one_and_move_a_device_before_resume(demo_store: Store, monkeypatch):
    from engine.cluster import inventory as inventory_module
    from engine.runs.cluster import save_address

    monkeypatch.delenv(ADDRESS_ENV)
    asked = []
    monkeypatch.setattr(inventory_module, "read_inventory_in_subprocess",
                        lambda address, probe=True: asked.append((address, probe)) or two_nodes_one_left())
    db = str(demo_store.path)
    save_address(demo_store, "10.0.0.5:6379")  # the Home page's setting counts for the CLI too
    code, out, _ = cli("nodes", "--db", db)
    assert code == 0 and asked == [("10.0.0.5:6379", True)]
    assert out.splitlines()[0] == "cluster at 10.0.0.5:6379: 2 of 3 nodes alive"
    assert "nodeB (left, left the cluster (killed))" in out
    code, out, _ = cli("--ray-address", "10.0.0.6:6379", "nodes", "--json", "--no-probe", "--db", db)
    assert code == 0 and asked[-1] == ("10.0.0.6:6379", False)
    assert [n["name"] for n in json.loads(out)["nodes"]] == ["nodeA", "nodeC", "nodeB"]

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    code, out, _ = cli("--ray-address", "10.0.0.5:6379", "node", "start", "--name", "nodeA", "--dry-run")
    assert code == 0 and "ray start --address 10.0.0.5:6379 --node-name nodeA" in out
    code, _, err = cli("node", "start", "--name", "nodeA", "--dry-run")  # no cluster in this process now
    assert code == 2 and "give the head's address (--address HOST:PORT, or a cluster address) or --head" in err

    use_cluster("10.0.0.5:6379")
    execution = create_execution(demo_store, make_plan(demo_store, {"nodeA/cpu": 2, "nodeB/cpu": 3}))
    with pytest.raises(PlannerError):
        drive_execution(demo_store, execution.id, FakeCluster({"nodeB/cpu": {"lose_after": 1}}),
                        measuring=EXECUTION_FAKES, poll_s=0.01)
    runs.set_status(demo_store, runs.EXECUTION, execution.id, "failed", "nodeB lost")
    code, _, err = cli("execute", "--resume", str(execution.id), "--move", "nodeB/cpu=nodeA/cpu", "--db", db)
    assert code == 2 and "nodeA/cpu runs queries of its own" in err
    monkeypatch.delenv("RAY_AUTH_MODE")  # the resumed run's driver fails at once, in words (no token)
    code, _, err = cli("execute", "--resume", str(execution.id), "--move", "nodeB/cpu=nodeC/cpu", "--db", db)
    assert "nodeB/cpu: what is left runs on nodeC/cpu" in err
    assert placement(demo_store, execution.id) == {"nodeB/cpu": "nodeC/cpu"}
    assert code == 1 and "needs token authentication" in get_execution(demo_store, execution.id).reason


def test_a_node_devices_default_batch_axis_stays_one_request_at_a_time_and_says_why(demo_store: Store):
    # Its free memory is read on the node, before each point, where a batch that does not fit fails the job.
    _, device, design, settings = jobs.prepare_job(demo_store, "demo-large", "nodeB/cpu", "custom", inputs=[8],
                                                   outputs=[4], default_batch_axis=True)
    assert device == "nodeB/cpu" and design.batch_sizes == (1,) and settings.batch_sizes == (1,)
    assert any("batch sizes 2, 4, 8, 16, 32 (left out of the default batch axis: nodeB/cpu's memory is judged on "
               "its node" in note for note in design.dropped)
    named = jobs.prepare_job(demo_store, "demo-large", "nodeB/cpu", "custom", inputs=[8], outputs=[4],
                             settings=jobs.ProfileSettings(batch_sizes=(1, 4)), default_batch_axis=False)[2]
    assert named.batch_sizes == (1, 4)  # sizes the user names are measured (the node checks them)
    here = jobs.prepare_job(demo_store, "demo-large", "cpu", "custom", inputs=[8], outputs=[4],
                            default_batch_axis=True)[2]
    assert here.batch_sizes == (1, 2, 4, 8, 16, 32)  # this host's device: its memory is read here
