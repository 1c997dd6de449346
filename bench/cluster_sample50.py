"""The 50-query sample executed on two nodes, on one node and on this host, and a node lost mid-run.

    .venv/bin/python bench/cluster_sample50.py [--runs 3] [--note TEXT] [--timeout-s 900]

On a loopback cluster of this machine (:class:`engine.cluster.localcluster.LocalCluster`:
a head without devices and nodes A and B, each offering its ``cpu``; every node bound to
127.0.0.1, token authentication with a fresh token, HOME and Ray's temp folder isolated,
usage reports off; the head started with the README's health-check settings for frozen
hosts). Nothing talks to any address but 127.0.0.1 (the script refuses a cluster address
that is not on it). Both nodes share this machine's cores, so two nodes cannot be faster
here than the cores allow: the figures show the cluster's overheads, not its speed-up.

Setup, once: each demo model is profiled **through the cluster** on ``nodeA/cpu`` and on
``nodeB/cpu`` (the quick design, 2 to 3 trials a point; a job on each node at once),
fitted, and ``data/workloads/sample_50.csv`` planned over the four options with an
accuracy target between the two models' and a deadline per device of 60% (or, when that has
no plan, 70, 80 or 90%) of what one device alone would take, so the plan uses both nodes.
From that plan, two more with the same queries on the same models and the same predictions:
all on ``nodeA/cpu`` (one node), all on ``cpu`` (this host's local worker).

Each run, through the app's lifecycle (``runs.start``: the driver process for cluster
devices, the local worker for ``cpu``), with ``uptime`` before it:
1. the two-node plan, the one-node plan and the local plan: wall time from start to the
   worker's exit, and the energy each measured (estimated from CPU time on a host without
   sensors); every query stored once; the results' columns and provenance compared
   with the local run's (same columns filled, same energy source and method, same keys
   in the measurement's library versions; the host is the node). A query's 90% band
   (``predicted_energy_uncertainty_j``) is left out of that comparison: it comes from a
   fit of the query's model on its device, and this host's ``cpu`` is not profiled here;
2. the two-node plan again, node B killed (every process of it) after its first result:
   seconds until B's part is failed in the database (what the Execute page shows); what
   was stored kept; node B started again, the run resumed: only what was left runs, and
   every query is stored exactly once.

Every wait has a timeout (``--timeout-s`` per run; a run past it is cancelled and the
benchmark stops); the cluster is always stopped (``finally``), and any of its processes
still alive after the shutdown are killed and listed. Every run is printed, then a table
and a summary (min / median / max); the report is appended, dated, to
``bench/results/cluster_sample50.txt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from _common import RESULTS, ROOT, Report, machine, spread, uptime

from engine import catalog, runs  # noqa: E402
from engine.cluster.localcluster import LOOPBACK, LocalCluster  # noqa: E402
from engine.cluster.runstate import part_states  # noqa: E402
from engine.demo_models import ensure_demo_models  # noqa: E402
from engine.errors import PlannerError  # noqa: E402
from engine.execution import create_execution, get_execution, resume_execution  # noqa: E402
from engine.fitting import fit_all, save_fits  # noqa: E402
from engine.paths import DEFAULT_MODELS_DIR  # noqa: E402
from engine.planning import PlanSettings, plan_workload, read_workload  # noqa: E402
from engine.profiling import jobs  # noqa: E402
from engine.store import Store, append_frame  # noqa: E402

SAMPLE = ROOT / "data" / "workloads" / "sample_50.csv"
RESULTS_FILE = RESULTS / "cluster_sample50.txt"
PROFILE = jobs.ProfileSettings(min_trials=2, max_trials=3, warmup_runs=1, idle_s=1.0)
NODES = ("nodeA", "nodeB")
#: The README's setting for frozen hosts: the head gives up on a silent node after about 10 s (a killed
#: node is noticed sooner, when its actors' connections close).
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "5"}
#: How long after killing node B its part may take to be reported failed before the benchmark says so.
LOSS_REPORT_LIMIT_S = 60.0
#: Columns that come from the plan and the fits, not from what was measured (see the module docstring).
PLAN_SIDE = ("predicted_energy_uncertainty_j",)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def wait_run(store: Store, kind, run_id: int, worker, timeout_s: float) -> float:
    """Wait for a started run's worker for at most ``timeout_s``; its wall time. Cancels it past the timeout."""
    started = time.monotonic()
    while worker.poll() is None:
        if time.monotonic() - started > timeout_s:
            runs.cancel(store, kind, run_id, grace_s=10)
            raise BenchError(f"{kind.label(run_id)} did not end within {timeout_s:.0f} s; cancelled")
        time.sleep(0.2)
    row = store.query_one(f"SELECT status, reason FROM {kind.table} WHERE id = ?", [run_id])
    if row[0] != "done":
        raise BenchError(f"{kind.label(run_id)} ended {row[0]}: {row[1]}")
    return time.monotonic() - started


def start_and_wait(store: Store, kind, run_id: int, timeout_s: float) -> float:
    """Start a run through the lifecycle and wait for its worker (see :func:`wait_run`)."""
    started = time.monotonic()
    worker = runs.start(store, kind, run_id, watch=False)
    wait_run(store, kind, run_id, worker, timeout_s)
    return time.monotonic() - started


def profile_on_nodes(store: Store, timeout_s: float, say) -> None:
    """Each demo model on each node's cpu, through the cluster: two jobs at once, one per node."""
    for pairs in ((("demo-small", "nodeA/cpu"), ("demo-large", "nodeB/cpu")),
                  (("demo-large", "nodeA/cpu"), ("demo-small", "nodeB/cpu"))):
        started = time.monotonic()
        created = [jobs.create_job(store, model, device, "quick", settings=PROFILE) for model, device in pairs]
        workers = [runs.start(store, runs.PROFILING, job.id, watch=False) for job in created]
        for job, worker in zip(created, workers):
            wait_run(store, runs.PROFILING, job.id, worker, timeout_s - (time.monotonic() - started))
        counts = {f"{j.model}@{j.device}": jobs.job_progress(store, j.id).trials for j in created}
        say(f"  profiled through the cluster in {time.monotonic() - started:.0f} s (trials: {counts})")


def two_node_plan(store: Store, say) -> tuple[int, pd.DataFrame]:
    """The sample planned over both nodes' options, with the tightest deadline that still has a plan on both."""
    models = catalog.list_models(store).set_index("name")
    target = float(models.loc[["demo-small", "demo-large"], "accuracy"].mean())
    workload = read_workload(SAMPLE)
    alone = plan_workload(store, workload, PlanSettings(accuracy_target=target), save=False)
    if not alone.has_schedule:
        raise BenchError(f"the sample has no plan even without a deadline: {alone.diagnosis}")
    total_s = sum(alone.per_device_runtime_s.values())
    for share in (0.6, 0.7, 0.8, 0.9):
        deadline_s = share * total_s
        trial = plan_workload(store, workload, PlanSettings(accuracy_target=target, deadline_s=deadline_s), save=False)
        if trial.has_schedule and len(trial.per_device_runtime_s) == 2:
            break
    else:
        raise BenchError("no deadline between 60% and 90% of one device's time gives a plan on both nodes")
    plan = plan_workload(store, workload, PlanSettings(accuracy_target=target, deadline_s=deadline_s))
    say(f"plan #{plan.plan_id}: {plan.status}, {plan.assignments}, predicted per device "
        f"{ {d: round(s, 1) for d, s in plan.per_device_runtime_s.items()} } s (accuracy target {target:.2f}, deadline "
        f"{deadline_s:.1f} s a device, {deadline_s / total_s:.0%} of what one device alone would take)")
    if not plan.has_schedule or len(plan.per_device_runtime_s) != 2:
        raise BenchError(f"the stored plan is {plan.status} on {list(plan.per_device_runtime_s)}, not on both nodes")
    return int(plan.plan_id), plan.schedule


def store_plan(store: Store, schedule: pd.DataFrame, device: str, like: int) -> int:
    """A plan of ``schedule``'s queries on their models and with their predictions, every one on ``device``, of
    the workload of plan ``like`` (so prompts are answered as they are there); batches kept, in plan order."""
    columns = ["query_id", "model", "device", "input_tokens", "output_tokens", "predicted_energy_j",
               "predicted_runtime_s", "accuracy", "device_start_s", "batch_id", "batch_size"]
    frame = schedule.rename(columns={"id": "query_id"})
    frame = frame[[c for c in columns if c in frame.columns]].copy()
    order = [c for c in ("device_start_s", "device", "batch_id", "query_id") if c in frame.columns]
    frame = frame.sort_values(order)
    frame["device"] = device
    frame["device_start_s"] = range(len(frame))  # the order on the one device: each batch's members together
    with store.transaction() as con:
        plan_id = con.execute("INSERT INTO plans (workload_id, objective, energy_scope, status, params) SELECT "
                              "workload_id, objective, energy_scope, 'optimal', ? FROM plans WHERE id = ? RETURNING id",
                              [json.dumps({"from": "bench/cluster_sample50.py", "like": like}), like]).fetchone()[0]
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return int(plan_id)


def results(store: Store, execution_id: int) -> pd.DataFrame:
    return store.query_df("SELECT r.*, m.host, m.library_versions FROM execution_results r LEFT JOIN measurements m "
                          "ON m.id = r.measurement_id WHERE r.execution_id = ? ORDER BY r.query_id", [execution_id])


def kind_of(frame: pd.DataFrame) -> dict[str, list[str]]:
    """What a run's results are made of: the columns filled, energy sources and methods, provenance keys."""
    method = frame["energy_method"].dropna().str.replace(r"\d+(\.\d+)? W", "N W", regex=True)
    keys = sorted({key for text in frame["library_versions"].dropna() for key in json.loads(text)})
    filled = sorted(c for c in frame.columns
                    if frame[c].notna().any() and c not in ("host", "library_versions", *PLAN_SIDE))
    return {"columns filled": filled, "energy sources": sorted(frame["energy_source"].dropna().unique()),
            "energy methods": sorted(method.unique()), "provenance keys": keys}


def differences(name: str, frame: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """In words, what ``frame``'s results have or lack against the local run's."""
    ours, theirs = kind_of(frame), kind_of(reference)
    lines = []
    for what in ours:
        extra, missing = sorted(set(ours[what]) - set(theirs[what])), sorted(set(theirs[what]) - set(ours[what]))
        if extra or missing:
            lines.append(f"{name}: {what}: " + "; ".join(part for part in (
                f"has {extra} that the local run lacks" if extra else "",
                f"lacks {missing} that the local run has" if missing else "") if part))
    return lines


def execute(store: Store, plan_id: int, timeout_s: float) -> tuple[float, pd.DataFrame]:
    """Execute a plan through the lifecycle; its wall time and its results (checked: done, every query once)."""
    execution = create_execution(store, plan_id)
    wall_s = start_and_wait(store, runs.EXECUTION, execution.id, timeout_s)
    frame = results(store, execution.id)
    if get_execution(store, execution.id).status != "done" or len(frame) != 50 or not frame["query_id"].is_unique:
        raise BenchError(f"execution {execution.id}: {get_execution(store, execution.id).status}, {len(frame)} "
                         f"results, each query once: {frame['query_id'].is_unique}")
    return wall_s, frame


def node_loss(cluster: LocalCluster, store: Store, plan_id: int, timeout_s: float) -> dict:
    """The two-node plan with node B killed after its first result, then resumed with B back."""
    execution = create_execution(store, plan_id)
    worker = runs.start(store, runs.EXECUTION, execution.id, watch=True)
    deadline = time.monotonic() + timeout_s
    while not store.query_one("SELECT count(*) FROM execution_results WHERE execution_id = ? AND device = 'nodeB/cpu'",
                              [execution.id])[0]:
        if time.monotonic() > deadline or worker.poll() is not None:
            if worker.poll() is None:
                runs.cancel(store, runs.EXECUTION, execution.id, grace_s=10)
            raise BenchError(f"node B stored no result within {timeout_s:.0f} s (worker exit {worker.poll()})")
        time.sleep(0.05)
    cluster.remove_node("nodeB")
    killed = time.monotonic()
    reported_s = None
    while time.monotonic() < killed + LOSS_REPORT_LIMIT_S:
        part = part_states(store, execution.id).get("nodeB/cpu")
        if part is not None and part.status == "failed":
            reported_s = time.monotonic() - killed
            break
        time.sleep(0.05)
    try:
        worker.wait(timeout_s)
    except subprocess.TimeoutExpired:  # a driver that does not end after the loss: stop it
        runs.cancel(store, runs.EXECUTION, execution.id, grace_s=10)
    failed = get_execution(store, execution.id)
    before = results(store, execution.id)[["query_id", "device", "started_at"]]
    part = part_states(store, execution.id).get("nodeB/cpu")
    cluster.add_node("nodeB")
    resume_execution(store, execution.id)
    resumed_s = start_and_wait(store, runs.EXECUTION, execution.id, timeout_s)
    after = results(store, execution.id)
    kept = before.merge(after[["query_id", "started_at"]], on="query_id", suffixes=("", "_after"))
    return {"reported_s": reported_s, "status": failed.status, "reason": part.reason if part else None,
            "stored_before": len(before), "b_before": int((before.device == "nodeB/cpu").sum()),
            "final": len(after), "unique": bool(after.query_id.is_unique),
            "kept": bool((kept.started_at == kept.started_at_after).all() and len(kept) == len(before)),
            "resumed_s": resumed_s, "done": get_execution(store, execution.id).status}


def one_run(number: int, cluster: LocalCluster, store: Store, plans: dict[str, int], timeout_s: float, say) -> dict:
    say(f"\nrun {number}: {uptime()}")
    walls, frames = {}, {}
    for name, plan_id in plans.items():
        walls[name], frames[name] = execute(store, plan_id, timeout_s)
    two, here = frames["two nodes"], frames["local"]
    say(f"  wall time: two nodes {walls['two nodes']:.1f} s ({two.device.value_counts().sort_index().to_dict()} "
        f"queries), one node {walls['one node']:.1f} s, this host's local worker {walls['local']:.1f} s")
    label = "estimated (CPU time)" if set(here["energy_source"].dropna()) == {"estimated"} else "measured"
    say(f"  energy, {label}: " + ", ".join(f"{name} {frame['energy_j'].sum():.1f} J" for name, frame in frames.items()))
    diffs = [line for name in ("two nodes", "one node") for line in differences(name, frames[name], here)]
    hosts = {d: sorted(two.loc[two.device == d, "host"].dropna().unique()) for d in sorted(two.device.unique())}
    say(f"  50 results each, every query once; columns, energy source and method, provenance keys the same as "
        f"the local run's: {'yes' if not diffs else 'NO'}; measurement hosts {hosts}, one node "
        f"{sorted(frames['one node'].host.dropna().unique())}, local {sorted(here.host.dropna().unique())}")
    for line in diffs:
        say(f"    {line}")
    loss = node_loss(cluster, store, plans["two nodes"], timeout_s)
    reported = (f"{loss['reported_s']:.1f} s" if loss["reported_s"] is not None
                else f"NOT within {LOSS_REPORT_LIMIT_S:.0f} s")
    say(f"  node B killed after its first result: its part failed in the database after {reported} "
        f"({loss['reason']}); execution {loss['status']} with {loss['stored_before']} results "
        f"({loss['b_before']} from B), all kept: {loss['kept']}; resumed with B back in {loss['resumed_s']:.1f} s: "
        f"{loss['final']} results, each once: {loss['unique']}, {loss['done']}")
    return {"run": number, "two nodes s": walls["two nodes"], "one node s": walls["one node"],
            "local s": walls["local"], "same results": not diffs, "loss reported s": loss["reported_s"],
            "resumed s": loss["resumed_s"], "after resume": loss["final"], "each once": loss["unique"],
            "kept": loss["kept"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="the longest any one run (profiling job, "
                                                                        "execution) may take before it is cancelled")
    parser.add_argument("--note", help="a line for the report's header (what else ran on the machine, say)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help="the file the report is appended to")
    parser.add_argument("--no-save", action="store_true", help="print only; append nothing")
    args = parser.parse_args(argv)
    report = Report()
    say = report.say
    title = f"bench/cluster_sample50.py --runs {args.runs}"
    say(f"{title}; {machine()}")
    if args.note:
        say(f"Note: {args.note}")
    say(f"before the cluster: {uptime()}")
    folder = Path(tempfile.mkdtemp(prefix="js", dir="/tmp"))
    store = Store(folder / "bench.duckdb", busy_timeout_s=60)
    catalog.register_demo_models(store, ensure_demo_models(DEFAULT_MODELS_DIR))
    rows, failure, killed = [], None, []
    started = time.monotonic()
    cluster = LocalCluster(list(NODES), health_check=HEALTH_CHECK).start()  # stops itself if it cannot start
    try:
        if not cluster.address.startswith(LOOPBACK + ":"):
            raise BenchError(f"the cluster is at {cluster.address}, not on {LOOPBACK}: refusing to run")
        say(f"cluster at {cluster.address} (head without devices, {', '.join(NODES)} with a cpu each) up in "
            f"{time.monotonic() - started:.1f} s")
        profile_on_nodes(store, args.timeout_s, say)
        save_fits(store, fit_all(store))
        two_nodes, schedule = two_node_plan(store, say)
        plans = {"two nodes": two_nodes, "one node": store_plan(store, schedule, "nodeA/cpu", two_nodes),
                 "local": store_plan(store, schedule, "cpu", two_nodes)}
        for number in range(1, args.runs + 1):
            rows.append(one_run(number, cluster, store, plans, args.timeout_s, say))
    except (BenchError, PlannerError) as exc:
        failure = str(exc)
        say(f"FAILED: {exc}")
    finally:
        killed = cluster.stop()
        left = cluster.leftovers(wait_s=5)
        shutil.rmtree(folder, ignore_errors=True)
    say(f"\nafter: {uptime()}; processes of the cluster killed after its shutdown: {killed or 'none'}; still alive: "
        f"{[p.pid for p in left] or 'none'}")
    if rows:
        frame = pd.DataFrame(rows)
        say(frame.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        seconds = lambda v: f"{v:.1f} s"  # noqa: E731
        say(f"summary over {len(rows)} runs (min / median / max): two nodes {spread(frame['two nodes s'], seconds)}, "
            f"one node {spread(frame['one node s'], seconds)}, local {spread(frame['local s'], seconds)}; node loss "
            f"reported after {spread(list(frame['loss reported s']), seconds)}; results the same as local in "
            f"{int(frame['same results'].sum())} of {len(rows)} runs; every query once after resume in "
            f"{int(frame['each once'].sum())} of {len(rows)}")
    if not args.no_save:
        print(f"appended to {report.append_to(args.out, title)}")
    return 0 if failure is None and rows else 1


if __name__ == "__main__":
    sys.exit(main())
