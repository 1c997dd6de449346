"""The 50-query sample executed on two nodes, on one node and on this host, and a node lost mid-run.

    .venv/bin/python bench/cluster_sample50.py [--runs 3] [--out bench/results/cluster_sample50.txt]

On a loopback cluster of this machine (:class:`engine.cluster.localcluster.LocalCluster`:
a head without devices and nodes A and B, each offering its ``cpu``; token auth,
isolated). Both nodes share this machine's two cores, so two nodes cannot be faster here.

Setup, once: each demo model is profiled **through the cluster** on ``nodeA/cpu`` and on
``nodeB/cpu`` (the quick design, 2 to 3 trials a point; a job on each node at once),
fitted, and ``data/workloads/sample_50.csv`` planned over the four options with an
accuracy target between the two models' and a deadline per device of 60% (or, when that has
no plan, 70, 80 or 90%) of what one device alone would take, so the plan uses both nodes. From that plan, two more with the
same queries on the same models: all on ``nodeA/cpu`` (one node), all on ``cpu`` (this
host's local worker).

Each run, through the app's lifecycle (``runs.start``: the driver process for cluster
devices, the local worker for ``cpu``), with ``uptime`` before it:
1. the two-node plan, the one-node plan and the local plan: wall time from start to the
   worker's exit; every query stored once; the results' columns and provenance compared
   with the local run's (same columns filled, same energy source and method, same keys
   in the measurement's library versions; the host is the node);
2. the two-node plan again, node B killed (every process of it) after its first result:
   seconds until B's part is failed in the database (what the Execute page shows); what
   was stored kept; node B started again, the run resumed: only what was left runs, and
   every query is stored exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from engine import catalog, runs  # noqa: E402
from engine.cluster.localcluster import LocalCluster  # noqa: E402
from engine.cluster.runstate import part_states  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.execution import create_execution, get_execution, resume_execution  # noqa: E402
from engine.fitting import fit_all, save_fits  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR, PROJECT_ROOT  # noqa: E402
from engine.planning import PlanSettings, plan_workload, read_workload  # noqa: E402
from engine.profiling import jobs  # noqa: E402
from engine.store import Store, append_frame  # noqa: E402

SAMPLE = PROJECT_ROOT / "data" / "workloads" / "sample_50.csv"
PROFILE = jobs.ProfileSettings(min_trials=2, max_trials=3, warmup_runs=1, idle_s=1.0)
NODES = ("nodeA", "nodeB")


def say(line: str = "", out=None) -> None:
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def wait_run(store: Store, kind, run_id: int, timeout_s: float = 900) -> float:
    """Start a run through the lifecycle and wait for its worker; its wall time."""
    started = time.monotonic()
    worker = runs.start(store, kind, run_id, watch=False)
    code = worker.wait(timeout_s)
    if code != 0:
        row = store.query_one(f"SELECT status, reason FROM {kind.table} WHERE id = ?", [run_id])
        raise SystemExit(f"{kind.label(run_id)} ended {row}")
    return time.monotonic() - started


def profile_on_nodes(store: Store, out) -> None:
    """Each demo model on each node's cpu, through the cluster: two jobs at once, one per node."""
    for pairs in ((("demo-small", "nodeA/cpu"), ("demo-large", "nodeB/cpu")),
                  (("demo-large", "nodeA/cpu"), ("demo-small", "nodeB/cpu"))):
        started = time.monotonic()
        created = [jobs.create_job(store, model, device, "quick", settings=PROFILE) for model, device in pairs]
        workers = [runs.start(store, runs.PROFILING, job.id, watch=False) for job in created]
        for job, worker in zip(created, workers):
            if worker.wait(900) != 0:
                raise SystemExit(f"profiling job {job.id} ended {jobs.get_job(store, job.id).reason}")
        counts = {f"{j.model}@{j.device}": jobs.job_progress(store, j.id).trials for j in created}
        say(f"  profiled through the cluster in {time.monotonic() - started:.0f} s: {counts}", out)


def store_plan(store: Store, schedule: pd.DataFrame, device: str | None, like: int) -> int:
    """A plan of ``schedule``'s queries on their models, every one on ``device`` (or where planned), of the
    workload of plan ``like`` (so prompts are answered as they are there)."""
    frame = schedule.rename(columns={"id": "query_id"})[
        ["query_id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j", "predicted_runtime_s",
         "accuracy", "device_start_s"]].copy()
    if device is not None:
        frame["device"] = device
        frame = frame.sort_values(["device_start_s", "query_id"])
        frame["device_start_s"] = range(len(frame))  # the order on the one device
    with store.transaction() as con:
        plan_id = con.execute("INSERT INTO plans (workload_id, objective, energy_scope, status, params) SELECT "
                              "workload_id, objective, energy_scope, 'optimal', ? FROM plans WHERE id = ? RETURNING id",
                              [json.dumps({"from": "bench", "like": like}), like]).fetchone()[0]
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def results(store: Store, execution_id: int) -> pd.DataFrame:
    return store.query_df("SELECT r.*, m.host, m.library_versions FROM execution_results r LEFT JOIN measurements m "
                          "ON m.id = r.measurement_id WHERE r.execution_id = ? ORDER BY r.query_id", [execution_id])


def kind_of(frame: pd.DataFrame) -> dict:
    """What a run's results are made of: the columns filled, energy sources and methods, provenance keys."""
    method = frame["energy_method"].dropna().str.replace(r"\d+(\.\d+)? W", "N W", regex=True)
    keys = sorted({key for text in frame["library_versions"].dropna() for key in json.loads(text)})
    filled = sorted(c for c in frame.columns if frame[c].notna().any() and c not in ("host", "library_versions"))
    return {"filled": filled, "sources": sorted(frame["energy_source"].dropna().unique()),
            "methods": sorted(method.unique()), "provenance_keys": keys}


def execute(store: Store, plan_id: int) -> tuple[int, float, pd.DataFrame]:
    execution = create_execution(store, plan_id)
    wall_s = wait_run(store, runs.EXECUTION, execution.id)
    frame = results(store, execution.id)
    assert get_execution(store, execution.id).status == "done"
    assert len(frame) == 50 and frame["query_id"].is_unique, f"{len(frame)} results, unique {frame.query_id.is_unique}"
    return execution.id, wall_s, frame


def node_loss(cluster: LocalCluster, store: Store, plan_id: int) -> dict:
    """The two-node plan with node B killed after its first result, then resumed with B back."""
    execution = create_execution(store, plan_id)
    worker = runs.start(store, runs.EXECUTION, execution.id, watch=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not store.query_one(
            "SELECT count(*) FROM execution_results WHERE execution_id = ? AND device = 'nodeB/cpu'",
            [execution.id])[0]:
        time.sleep(0.05)
    cluster.remove_node("nodeB")
    killed = time.monotonic()
    reported_s = None
    while time.monotonic() < killed + 60:
        part = part_states(store, execution.id).get("nodeB/cpu")
        if part is not None and part.status == "failed":
            reported_s = time.monotonic() - killed
            break
        time.sleep(0.05)
    worker.wait(300)
    failed = get_execution(store, execution.id)
    before = results(store, execution.id)[["query_id", "device", "started_at"]]
    reason = part_states(store, execution.id)["nodeB/cpu"].reason
    cluster.add_node("nodeB")
    resume_execution(store, execution.id)
    resumed_s = wait_run(store, runs.EXECUTION, execution.id)
    after = results(store, execution.id)
    kept = before.merge(after[["query_id", "started_at"]], on="query_id", suffixes=("", "_after"))
    return {"reported_s": reported_s, "status": failed.status, "reason": reason, "stored_before": len(before),
            "b_before": int((before.device == "nodeB/cpu").sum()), "final": len(after),
            "unique": bool(after.query_id.is_unique), "kept": bool((kept.started_at == kept.started_at_after).all()
                                                                  and len(kept) == len(before)),
            "resumed_s": resumed_s, "done": get_execution(store, execution.id).status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()
    out = open(args.out, "w") if args.out else None
    folder = Path(tempfile.mkdtemp(prefix="js", dir="/tmp"))
    store = Store(folder / "bench.duckdb", busy_timeout_s=60)
    catalog.register_demo_models(store, ensure_demo_models(DEFAULT_MODELS_DIR))
    say(f"bench/cluster_sample50.py, {time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} logical CPUs", out)
    say(f"before the cluster: {uptime()}", out)
    started = time.monotonic()
    cluster = LocalCluster(list(NODES)).start()
    say(f"cluster (head without devices, {', '.join(NODES)} with a cpu each) up in "
        f"{time.monotonic() - started:.1f} s", out)
    rows = []
    try:
        profile_on_nodes(store, out)
        save_fits(store, fit_all(store))
        models = catalog.list_models(store).set_index("name")
        target = float(models.loc[["demo-small", "demo-large"], "accuracy"].mean())
        workload = read_workload(SAMPLE)
        alone = plan_workload(store, workload, PlanSettings(accuracy_target=target), save=False)
        total_s = sum(alone.per_device_runtime_s.values())
        for share in (0.6, 0.7, 0.8, 0.9):  # the tightest deadline that still has a plan: both nodes needed
            deadline_s = share * total_s
            plan = plan_workload(store, workload, PlanSettings(accuracy_target=target, deadline_s=deadline_s),
                                 save=False)
            if plan.has_schedule and len(plan.per_device_runtime_s) == 2:
                break
        plan = plan_workload(store, workload, PlanSettings(accuracy_target=target, deadline_s=deadline_s))
        say(f"plan {plan.plan_id}: {plan.status}, {plan.assignments}, per device "
            f"{ {d: round(s, 1) for d, s in plan.per_device_runtime_s.items()} } s predicted "
            f"(accuracy target {target:.2f}, deadline {deadline_s:.1f} s a device, {deadline_s / total_s:.0%} of what "
            f"one device alone would take)", out)
        if not plan.has_schedule:
            raise SystemExit(f"no plan: {plan.diagnosis}")
        two_nodes = int(plan.plan_id)
        one_node = store_plan(store, plan.schedule, "nodeA/cpu", two_nodes)
        local = store_plan(store, plan.schedule, "cpu", two_nodes)
        for number in range(1, args.runs + 1):
            say(f"\nrun {number}: {uptime()}", out)
            two_id, two_s, two = execute(store, two_nodes)
            one_id, one_s, one = execute(store, one_node)
            local_id, local_s, here = execute(store, local)
            same_kind = kind_of(two) == kind_of(one) == kind_of(here)
            hosts = {d: sorted(two.loc[two.device == d, "host"].unique()) for d in sorted(two.device.unique())}
            say(f"  two nodes: {two_s:.1f} s ({two.device.value_counts().to_dict()}); one node: {one_s:.1f} s; "
                f"this host's local worker: {local_s:.1f} s", out)
            say(f"  50 results each, every query once; same columns and provenance as the local run: {same_kind}; "
                f"hosts {hosts}, local {sorted(here.host.unique())}", out)
            if not same_kind:
                say(f"  differences: two nodes {kind_of(two)}; local {kind_of(here)}", out)
            loss = node_loss(cluster, store, two_nodes)
            say(f"  node B killed after its first result: part failed in the database after "
                f"{loss['reported_s']:.1f} s ({loss['reason']}); execution {loss['status']} with "
                f"{loss['stored_before']} results ({loss['b_before']} from B), all kept: {loss['kept']}; resumed "
                f"with B back in {loss['resumed_s']:.1f} s: {loss['final']} results, each once: {loss['unique']}, "
                f"{loss['done']}", out)
            rows.append({"run": number, "two_nodes_s": two_s, "one_node_s": one_s, "local_s": local_s,
                         "same_kind": same_kind, "loss_reported_s": loss["reported_s"],
                         "results_after_resume": loss["final"], "each_once": loss["unique"],
                         "kept": loss["kept"]})
    finally:
        killed = cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    say(f"\nafter: {uptime()}; processes of the cluster that had to be killed after its shutdown: "
        f"{killed or 'none'}", out)
    say(pd.DataFrame(rows).round(2).to_string(index=False), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
