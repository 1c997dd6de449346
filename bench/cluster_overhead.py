"""What the cluster path costs next to the local one, and how fast a lost node is reported.

    .venv/bin/python bench/cluster_overhead.py [--runs 3] [--queries 50]

On a loopback cluster of this machine (:class:`engine.cluster.localcluster.LocalCluster`:
a head and nodes A and B, token auth, isolated), each run measures:

1. **one-device plan, local vs cluster**: the same ``--queries`` short requests (8 tokens
   in, 4 out, demo-large through llama.cpp) executed through ``runs.start`` on ``cpu``
   (the local worker process) and on ``nodeA/cpu`` (the driver process and an actor on
   node A). Both share this machine's CPU, so the backend's own time is comparable.
   Reported: wall time from start to the worker's exit; the time to the first stored
   result (process start, model load, idle baseline); and the steady time per query
   (first to last stored result, per query) next to the backend's own runtime. Both
   wait passively (``OMP_WAIT_POLICY=PASSIVE``), see :func:`main`.
2. **the stream alone**: records handed from an actor on node A to this process through
   :class:`engine.cluster.remote.RayCluster` and the driver's loop, with no model and no
   database, one record per batch and in the default batches: the dispatch cost per record
   (first to last record, so the actor's start is left out).
3. **node loss**: an execution on node B, node B killed (all its processes) after its
   first stored result; the seconds until the driver reports its part failed, read
   from the driver's log (its lines are time-stamped) and measured here.

The machine is shared: the load average is printed before each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from engine import catalog, runs  # noqa: E402
from engine.cluster.localcluster import LocalCluster  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.execution import create_execution, get_execution  # noqa: E402
from engine.execution.worker import ResultSink  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR  # noqa: E402
from engine.store import Store, append_frame  # noqa: E402


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_plan(store: Store, device: str, n: int, output_tokens: int = 4) -> int:
    rows = [dict(query_id=f"q{i}", model="demo-large", device=device, input_tokens=8, output_tokens=output_tokens,
                 predicted_energy_j=1.0, predicted_runtime_s=0.05, accuracy=0.5, device_start_s=0.05 * i)
            for i in range(n)]
    with store.transaction() as con:
        plan_id = con.execute("INSERT INTO plans (objective, energy_scope, status) VALUES ('energy', 'total', "
                              "'optimal') RETURNING id").fetchone()[0]
        frame = pd.DataFrame(rows)
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def execute(store: Store, device: str, n: int) -> dict:
    """Run an n-query plan on ``device`` through the app's lifecycle; its timings."""
    execution = create_execution(store, make_plan(store, device, n))
    started = time.time()
    worker = runs.start(store, runs.EXECUTION, execution.id, watch=False)
    code = worker.wait(600)
    wall_s = time.time() - started
    if code != 0 or get_execution(store, execution.id).status != "done":
        raise SystemExit(f"execution on {device} did not finish: {get_execution(store, execution.id).reason}")
    frame = store.query_df("SELECT epoch(finished_at) AS finished_s, runtime_s FROM execution_results "
                           "WHERE execution_id = ? ORDER BY finished_at", [execution.id])
    first, last = frame["finished_s"].iloc[0], frame["finished_s"].iloc[-1]
    return {"wall_s": wall_s, "first_s": first - started, "per_query_s": (last - first) / (n - 1),
            "runtime_s": frame["runtime_s"].mean()}


class EmitWork:
    """A device's work that hands ``n`` small records to its sink as fast as it can."""

    sink_interface = ResultSink
    device = "cpu"

    def __init__(self, n: int):
        self.n = n

    def model_files(self):
        return []

    def run(self, sink, progress):
        for i in range(self.n):
            sink.add_result({"query_id": f"q{i}", "device": "cpu", "energy_j": 1.5, "runtime_s": 0.01,
                             "input_tokens": 128, "output_tokens": 32}, None)


def stream_alone(n: int, max_calls: int) -> float:
    """Seconds per record from an actor on node A to this process, through the driver's loop, no database."""
    from engine.cluster.remote import RayCluster
    from engine.cluster.scheduler import Part, drive

    arrived: list[float] = []  # when each record reached the driver's loop (the actor's start left out)
    outcome = drive(RayCluster(max_calls=max_calls), [Part("nodeA/cpu", EmitWork(n))],
                    lambda part, call: arrived.append(time.monotonic()), poll_s=0.5)
    assert outcome["nodeA/cpu"].status == "done" and len(arrived) == n, outcome
    return (arrived[-1] - arrived[0]) / (n - 1)


def node_loss(cluster: LocalCluster, store: Store) -> tuple[float, float]:
    """Kill node B mid-execution; seconds until the driver's log says its part failed, here and by the log's clock."""
    execution = create_execution(store, make_plan(store, "nodeB/cpu", 40, output_tokens=32))
    log = runs.worker_log_path(store, runs.EXECUTION, execution.id)
    worker = runs.start(store, runs.EXECUTION, execution.id, watch=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (log.exists() and " q0 done" in log.read_text()):
            time.sleep(0.05)
        cluster.remove_node("nodeB")
        killed_wall, killed = time.time(), time.monotonic()
        while time.monotonic() < killed + 60 and "nodeB/cpu: failed" not in log.read_text():
            time.sleep(0.05)
        seen_s = time.monotonic() - killed
        worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
    line = next(l for l in log.read_text().splitlines() if "nodeB/cpu: failed" in l)
    stamp = time.strptime(time.strftime("%Y-%m-%d ") + line[:8], "%Y-%m-%d %H:%M:%S")
    logged_s = time.mktime(stamp) - killed_wall  # the log's clock has whole seconds
    cluster.add_node("nodeB")
    return seen_s, logged_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    # Local workers wait passively, as the cluster's actors do (engine.cluster.remote) and as every worker will
    # (OMP_WAIT_POLICY=PASSIVE, engine/energy/waiting.py on its way): spinning OpenMP threads on a busy 2-core
    # machine made the local llama.cpp requests ~30x slower here, which would say nothing about the cluster path.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    folder = Path(tempfile.mkdtemp(prefix="jb", dir="/tmp"))
    store = Store(folder / "bench.duckdb", busy_timeout_s=60)
    catalog.register_demo_models(store, ensure_demo_models(DEFAULT_MODELS_DIR))
    print(f"before the cluster starts: {load()}", flush=True)
    started = time.monotonic()
    cluster = LocalCluster(["nodeA", "nodeB"]).start()
    print(f"cluster (head + 2 nodes) up in {time.monotonic() - started:.1f} s", flush=True)
    from engine.cluster.connection import connect

    connect()
    rows = []
    try:
        for number in range(1, args.runs + 1):
            print(f"\nrun {number}: {load()}", flush=True)
            local = execute(store, "cpu", args.queries)
            remote = execute(store, "nodeA/cpu", args.queries)
            per_record_1 = stream_alone(5000, 1)
            per_record_batched = stream_alone(5000, 32)
            seen_s, logged_s = node_loss(cluster, store)
            row = {"run": number, **{f"local_{k}": v for k, v in local.items()},
                   **{f"cluster_{k}": v for k, v in remote.items()}, "stream_ms_1": per_record_1 * 1e3,
                   "stream_ms_32": per_record_batched * 1e3, "loss_seen_s": seen_s, "loss_logged_s": logged_s}
            rows.append(row)
            print(f"  {args.queries} queries, local:   wall {local['wall_s']:.1f} s, first result after "
                  f"{local['first_s']:.1f} s, then {local['per_query_s'] * 1e3:.0f} ms a query "
                  f"(backend {local['runtime_s'] * 1e3:.0f} ms)")
            print(f"  {args.queries} queries, cluster: wall {remote['wall_s']:.1f} s, first result after "
                  f"{remote['first_s']:.1f} s, then {remote['per_query_s'] * 1e3:.0f} ms a query "
                  f"(backend {remote['runtime_s'] * 1e3:.0f} ms)")
            print(f"  stream alone: {per_record_1:.2e} s a record one per batch, {per_record_batched:.2e} s in "
                  "batches of up to 32")
            print(f"  node loss reported after {seen_s:.1f} s (seen here; the driver's log says {logged_s:.0f} s)")
    finally:
        killed = cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    frame = pd.DataFrame(rows)
    print(f"\nafter: {load()}; processes of the cluster left to kill after its shutdown: {killed or 'none'}")
    print(frame.round(3).to_string(index=False))
    for column in ("cluster_wall_s", "local_wall_s", "cluster_per_query_s", "local_per_query_s", "loss_seen_s"):
        print(f"{column}: median {statistics.median(frame[column]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
