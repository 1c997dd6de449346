"""A real Ray cluster on this machine: a head and two nodes on 127.0.0.1, token authentication on.

One cluster for the module (:class:`engine.cluster.localcluster.LocalCluster`: each node
one CPU, an 80 MiB object store, its own device resource and labels, HOME and Ray's temp
dir isolated, usage reports off and sent to a closed loopback port). Through the app's
own lifecycle (``runs.start``: the cluster launcher, a driver process, actors on the
nodes) it profiles the demo llama.cpp model on the head's device and, at the same time,
executes a two-node plan into the same DuckDB file; it kills node B (every process of
it) mid-run and checks that B's part is failed with a reason within 15 s while A's goes
on, nothing is lost or stored twice, the inventory shows B as left, and resume (B back)
runs only what was left. Every wait has a timeout; the teardown stops the cluster and
checks that no process of it is left.

Skipped when Ray is not installed, except under CI=true, where it must run.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from engine import catalog, runs
from engine.execution import create_execution, get_execution, resume_execution
from engine.profiling import jobs
from engine.store import Store, append_frame

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("ray is not installed, and CI must run the real-cluster tests: pip install -r requirements.txt")
    pytest.skip("ray is not installed (pip install -r requirements.txt); the cluster tests need it",
                allow_module_level=True)

from engine.cluster.localcluster import TEST_CPU, LocalCluster  # noqa: E402 (needs ray)

#: The GCS declares a node dead after 5 missed checks, one a second (the README's setting for frozen hosts).
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "5"}
DETECT_S = 15.0


@pytest.fixture(scope="module")
def cluster():
    local = LocalCluster(["nodeA", "nodeB"], head_devices=(TEST_CPU,), health_check=FAST_HEALTH_CHECK)
    local.start()
    try:
        yield local
    finally:
        killed = local.stop()
        left = local.leftovers(wait_s=5)
    assert killed == [] and left == [], f"processes left behind by the cluster: {killed or left}"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def log_says(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def make_plan(store: Store, queries: dict[str, tuple[int, int]]) -> int:
    """A plan of ``n`` token-count queries of ``out`` tokens on each device (ids ``<device>-q<i>``), stored directly."""
    rows = [dict(query_id=f"{device}-q{i}", model="demo-large", device=device, input_tokens=8, output_tokens=out,
                 predicted_energy_j=1.0, predicted_runtime_s=0.1, accuracy=0.5, device_start_s=0.1 * i)
            for device, (n, out) in queries.items() for i in range(n)]
    with store.transaction() as con:
        plan_id = con.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', 'total', "
                              "'optimal') RETURNING id").fetchone()[0]
        frame = pd.DataFrame(rows)
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def test_profile_on_one_node_and_execute_on_two_through_a_node_loss(cluster: LocalCluster, store: Store,
                                                                     demo_models):
    store = Store(store.path, busy_timeout_s=60)  # the drivers write while the test reads
    catalog.register_demo_models(store, list(demo_models.values()))
    settings = jobs.ProfileSettings(min_trials=2, max_trials=2, warmup_runs=1, idle_s=0.5, seed=1)
    job = jobs.create_job(store, "demo-large", "head/cpu", "custom", inputs=[8, 16], outputs=[4], settings=settings)
    plan = {"nodeA/cpu": (6, 8), "nodeB/cpu": (14, 32)}
    execution = create_execution(store, make_plan(store, plan))
    execution_log = runs.worker_log_path(store, runs.EXECUTION, execution.id)

    profiler = runs.start(store, runs.PROFILING, job.id, watch=False)
    executor = runs.start(store, runs.EXECUTION, execution.id, watch=False)
    try:
        assert wait_for(lambda: log_says(execution_log, "nodeB/cpu: nodeB/cpu-q0 done"), 60), \
            execution_log.read_text(errors="replace")[-3000:]
        cluster.remove_node("nodeB")  # the host is gone: every process of it killed at once
        killed_at = time.monotonic()
        assert wait_for(lambda: log_says(execution_log, "nodeB/cpu: failed: "), DETECT_S + 5)
        detected_s = time.monotonic() - killed_at
        assert detected_s <= DETECT_S, f"the loss of node B was reported after {detected_s:.1f} s"

        # Meanwhile, the inventory, read by this process as the Home page will: node B has left.
        from engine.cluster.inventory import read_inventory

        assert wait_for(lambda: not read_inventory(probe=False).node("nodeB").alive, 30, interval_s=0.5)
        inventory = read_inventory()
        assert [(n.name, n.status) for n in inventory.nodes] == [("head", "alive"), ("nodeA", "alive"),
                                                                 ("nodeB", "left")]
        assert [d.name for d in inventory.node("nodeA").devices] == ["nodeA/cpu"]
        assert [d.name for d in inventory.node("nodeB").devices] == ["nodeB/cpu"]  # what it had, from its labels
        assert {s.source for s in inventory.node("nodeA").sensors} >= {"nvml", "rapl"}  # found or missing, and why
        assert inventory.node("nodeB").note.startswith("left the cluster")

        assert executor.wait(60) == 1  # node A's part ran to its end, then the run failed
        assert profiler.wait(60) == 0
    finally:
        for process in (profiler, executor):
            if process.poll() is None:
                process.kill()

    from engine.cluster.runstate import part_states

    failed = get_execution(store, execution.id)
    assert failed.status == "failed"
    assert failed.reason.startswith("nodeB/cpu: node nodeB was lost (")
    parts = part_states(store, execution.id)
    assert parts["nodeA/cpu"].status == "done" and parts["nodeB/cpu"].status == "failed"
    stored = store.query_df("SELECT query_id, device FROM execution_results WHERE execution_id = ?", [execution.id])
    assert stored["query_id"].is_unique
    on_a = stored[stored["device"] == "nodeA/cpu"]
    on_b = stored[stored["device"] == "nodeB/cpu"]
    assert len(on_a) == 6 and 1 <= len(on_b) < 14  # A's all, B's up to the loss, kept

    profiled = store.query_df("SELECT device, host, input_tokens, trial FROM measurements WHERE job_id = ? "
                              "ORDER BY input_tokens, trial", [job.id])
    assert list(zip(profiled.input_tokens, profiled.trial)) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    assert set(profiled.device) == {"head/cpu"} and set(profiled.host) == {"head"}
    assert jobs.get_job(store, job.id).status == "done"

    cluster.add_node("nodeB")  # back, same name: resume runs only what is left, there
    resume_execution(store, execution.id)
    executor = runs.start(store, runs.EXECUTION, execution.id, watch=False)
    try:
        assert executor.wait(90) == 0, execution_log.read_text(errors="replace")[-3000:]
    finally:
        if executor.poll() is None:
            executor.kill()
    assert get_execution(store, execution.id).status == "done"
    results = store.query_df(
        "SELECT r.query_id, r.device, m.device AS measured_on, m.host, r.energy_source FROM execution_results r "
        "JOIN measurements m ON m.id = r.measurement_id WHERE r.execution_id = ?", [execution.id])
    assert len(results) == 20 and results["query_id"].is_unique  # every query once, none lost
    assert (results["query_id"].str.split("-q").str[0] == results["device"]).all()
    assert (results["measured_on"] == results["device"]).all()
    assert set(results["host"]) == {"nodeA", "nodeB"}
    assert set(results["energy_source"]) == {"estimated"}  # no sensor on this VM: labelled, never 0
    assert store.query_one("SELECT count(*) FROM measurements WHERE origin = 'executed'")[0] == 20
    assert "stored " in execution_log.read_text()
