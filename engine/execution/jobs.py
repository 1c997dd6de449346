"""Executions of a schedule: their state in the database, and what they measured.

An execution runs a stored plan (or a schedule CSV, stored as a plan first) on this host:
every query on its assigned model and device in its planned batch (a query without one runs
alone), devices in parallel, each device's batches in the schedule's order, each model
loaded once per device. Like profiling, inference runs in a worker process
(``python -m engine.execution.worker``) that stores every batch, all its members at once,
the moment it is measured, so a crash or kill loses at most the batch in flight, the app
stays up, and :func:`resume_execution` runs only the batches left. Starting, watching,
cancelling and resuming it is the lifecycle every long run shares (:mod:`engine.runs`). A
device that a profiling job or another execution holds is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from engine import catalog, runs
from engine.backends.base import parse_device
from engine.backends.batch import MAX_BATCH_SIZE, check_batch_size
from engine.cluster.naming import is_qualified
from engine.csvio import read_csv_rows
from engine.errors import DeviceUnavailableError, InputError, Problem
from engine.planning.workload import MAX_TOKENS_PER_QUERY
from engine.runs import ACTIVE, EXECUTION, FINISHED
from engine.store import Store, append_frame

SCHEDULE_REQUIRED = ("id", "model", "device", "input_tokens", "output_tokens")
SCHEDULE_KNOWN = SCHEDULE_REQUIRED + ("predicted_energy_j", "predicted_runtime_s", "accuracy", "device_start_s",
                                      "batch_id", "batch_size", "in_domain")
#: A reason that stops many rows of a schedule from running is listed for this many, then counted.
MAX_ROWS_PER_REFUSAL = 20


@dataclass(frozen=True)
class Execution:
    """One execution's row."""

    id: int
    plan_id: int
    host: str
    status: str
    reason: str | None
    pid: int | None
    queries_total: int
    queries_done: int
    created_at: object
    started_at: object
    finished_at: object


def get_execution(store: Store, execution_id: int) -> Execution:
    row = store.query_df("SELECT id, plan_id, host, status, reason, pid, coalesce(queries_total, 0) AS queries_total, "
                         "coalesce(queries_done, 0) AS queries_done, created_at, started_at, finished_at "
                         "FROM executions WHERE id = ?", [int(execution_id)])
    if row.empty:
        raise InputError(Problem("execution", f"no execution with id {execution_id}", None, "an execution id"))
    data = row.iloc[0].to_dict()
    data["pid"] = None if pd.isna(data["pid"]) else int(data["pid"])
    return Execution(**{k: (int(v) if k in ("id", "plan_id", "queries_total", "queries_done") else v)
                        for k, v in data.items()})


def list_executions(store: Store, limit: int = 50) -> pd.DataFrame:
    return store.query_df("SELECT id, plan_id, status, queries_done, queries_total, reason, created_at, started_at, "
                          "finished_at FROM executions ORDER BY id DESC LIMIT ?", [int(limit)])


# -- what to run ------------------------------------------------------------------------------

def plan_queries(store: Store, plan_id: int) -> pd.DataFrame:
    """A plan's queries in run order (device, start, batch), with their batch, and their prompt
    and category when the plan's workload is stored.

    ``batch_id`` and ``batch_size`` are the plan's; a query without them (a plan stored before
    batching, a schedule without those columns) is a batch of its own (:func:`with_batches`).
    """
    queries = store.query_df(
        """SELECT a.query_id, a.model, a.device, a.input_tokens, a.output_tokens, a.predicted_energy_j,
                  a.predicted_runtime_s, a.device_start_s, a.batch_id, a.batch_size, q.prompt, q.category,
                  q.output_tokens AS given_output_tokens
           FROM plan_assignments a
           JOIN plans p ON p.id = a.plan_id
           LEFT JOIN workload_queries q ON q.workload_id = p.workload_id AND q.query_id = a.query_id
           WHERE a.plan_id = ? ORDER BY a.device, a.device_start_s, a.batch_id, a.rowid""", [int(plan_id)])
    return with_batches(queries)


def with_batches(queries: pd.DataFrame) -> pd.DataFrame:
    """``queries`` with every row in a batch: a row without ``batch_id`` (or a frame without the
    column) becomes a batch of one of its own, numbered after the plan's batches in row order."""
    queries = queries.copy()
    if "batch_id" not in queries.columns:
        queries["batch_id"] = pd.NA
    if "batch_size" not in queries.columns:
        queries["batch_size"] = pd.NA
    batch_id = pd.to_numeric(queries["batch_id"]).astype("Int64")
    alone = batch_id.isna()
    first_free = int(batch_id.max()) + 1 if (~alone).any() else 1
    batch_id[alone] = np.arange(first_free, first_free + int(alone.sum()))
    queries["batch_id"] = batch_id.astype("int64")
    batch_size = pd.to_numeric(queries["batch_size"]).astype("Int64")
    batch_size[alone] = 1
    members = queries.groupby("batch_id")["batch_id"].transform("size")
    queries["batch_size"] = batch_size.fillna(members).astype("int64")  # a size left out: the members'
    return queries


def import_schedule(store: Store, path: str | Path, *, runnable_here: bool = True) -> int:
    """Store a schedule CSV (as written by ``plan``) as a plan of its own; returns its id.

    Every column is checked as the workload reader checks its own, and every problem is
    reported at once by ``file:line``: a unique id; a model of the catalog; a device name
    (``cpu``, ``cuda:N``; a cluster node's ``NODE/DEVICE`` only while a cluster address is set);
    token counts (whole, 1 to :data:`MAX_TOKENS_PER_QUERY`); predicted energy (J) and
    runtime (s) finite and ≥ 0; accuracy a fraction in [0, 1] (``64.5%`` is 0.645);
    device_start_s finite and ≥ 0; in_domain true or false; batch_id (a whole number ≥ 1)
    and batch_size (1 to the backends' maximum) given together or not at all. An empty cell
    is unknown (a missing start is the row's place on its device; a row without a batch runs
    on its own). The rows of one batch must agree (:func:`_batch_problems`): one device, one
    model, one batch size, one start, and no more rows than the batch size. With
    ``runnable_here`` (the
    default), the schedule must also be able to run on this host now, row by row (the
    checks of :func:`check_runnable`). A refused schedule stores nothing; an accepted one
    is stored, plan and assignments, in one transaction.
    """
    path = Path(path)
    rows, _warnings = read_csv_rows(path, SCHEDULE_REQUIRED, SCHEDULE_KNOWN)
    names = set(catalog.list_models(store)["name"])
    problems, records, lines, seen = [], [], [], {}
    for line, row in rows:
        where = f"{path}:{line}"
        record, row_problems = _schedule_row(row, where, names)
        if record["query_id"] in seen:
            row_problems.insert(0, Problem(where, f"id {record['query_id']!r} also on line {seen[record['query_id']]}",
                                           "id", "each query once"))
        elif record["query_id"]:
            seen[record["query_id"]] = line
        problems.extend(row_problems)
        records.append(record)
        lines.append(line)
    if not records and not problems:
        problems.append(Problem(str(path), "has no queries", None, "one row per query"))
    problems.extend(_batch_problems(records, [f"{path}:{line}" for line in lines], lines))
    if problems:
        raise InputError(problems)
    frame = pd.DataFrame(records)
    if runnable_here:
        refusals, _ = _refusals(store, frame)
        if refusals:
            raise InputError(_row_problems(refusals, [f"{path}:{line}" for line in lines], str(path)))
    frame["device_start_s"] = frame["device_start_s"].fillna(frame.groupby("device").cumcount().astype(float))
    for column in ("batch_id", "batch_size"):
        frame[column] = frame[column].astype("Int64")
    batched = frame["batch_id"].notna()
    if batched.any():  # a batch starts once: members without a start take the batch's
        frame.loc[batched, "device_start_s"] = frame[batched].groupby("batch_id")["device_start_s"].transform("min")
    frame["in_domain"] = frame["in_domain"].astype("boolean")
    with store.transaction() as con:
        plan_id = int(con.execute(
            "INSERT INTO plans (objective, energy_scope, status, energy_j, params) VALUES (?, ?, ?, ?, ?) RETURNING id",
            ["schedule file", "total", "imported", float(frame["predicted_energy_j"].sum(min_count=1))
             if frame["predicted_energy_j"].notna().any() else None,
             json.dumps({"source_file": str(path)})]).fetchone()[0])
        frame.insert(0, "plan_id", plan_id)
        append_frame(con, "plan_assignments", frame)
    return plan_id


_NON_NEGATIVE = {"predicted_energy_j": "joules", "predicted_runtime_s": "seconds", "device_start_s": "seconds"}
_BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _schedule_row(row: dict[str, str], where: str, models: set[str]) -> tuple[dict, list[Problem]]:
    """One schedule row's values (NaN / None where a cell is empty or bad), and every problem of it."""
    problems = []
    record = {"query_id": row["id"].strip(), "model": row["model"].strip(), "device": row["device"].strip()}
    if not record["query_id"]:
        problems.append(Problem(where, "the id is empty", "id", "a query id"))
    if record["model"] not in models:
        problems.append(Problem(where, f"model {record['model']!r} is not in the catalog", "model",
                                "a model of the catalog (Models page)"))
    try:
        record["device"] = _device_name(record["device"])
    except DeviceUnavailableError as exc:
        problems.append(Problem(where, str(exc).rstrip("."), "device",
                                "cpu, cuda or cuda:N (this host), or NODE/DEVICE (a cluster node's)"))
    for column in ("input_tokens", "output_tokens"):
        text = row.get(column, "").strip()
        try:
            value = float(text)
            ok = value.is_integer() and 1 <= value <= MAX_TOKENS_PER_QUERY
        except ValueError:
            ok = False
        if not ok:
            problems.append(Problem(where, f"{text!r} is not a token count", column,
                                    f"a whole number from 1 to {MAX_TOKENS_PER_QUERY:,}"))
        record[column] = int(value) if ok else 0
    for column, unit in _NON_NEGATIVE.items():
        text = (row.get(column) or "").strip()
        record[column] = np.nan
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0:
            problems.append(Problem(where, f"{text!r} is not a number ≥ 0", column,
                                    f"{unit}: a finite number ≥ 0, or an empty cell (unknown)"))
        else:
            record[column] = value
    text = (row.get("accuracy") or "").strip()
    record["accuracy"] = np.nan
    if text:
        try:
            record["accuracy"] = catalog.parse_accuracy(text, where, "accuracy")
        except InputError as exc:
            problems.extend(exc.problems)
    problems.extend(_batch_cells(row, where, record))
    text = (row.get("in_domain") or "").strip()
    record["in_domain"] = _BOOLEANS.get(text.lower()) if text else None
    if text and record["in_domain"] is None:
        problems.append(Problem(where, f"{text!r} is not true or false", "in_domain",
                                "true or false, or an empty cell (unknown)"))
    return record, problems


def _device_name(text: str) -> str:
    """A schedule's device in its one spelling: ``cpu``, ``cuda:N`` (this host's), or ``node/device`` (a cluster
    node's, accepted only while a cluster address is set); DeviceUnavailableError in words otherwise."""
    if is_qualified(text):
        return runs.check_device(text)  # its spelling and a cluster address; the node is asked when the run starts
    spec = parse_device(text)
    return "cpu" if spec.kind == "cpu" else f"cuda:{spec.index or 0}"


def _batch_cells(row: dict[str, str], where: str, record: dict) -> list[Problem]:
    """A row's batch_id and batch_size (None where empty or bad), and what is wrong with them."""
    problems = []
    texts = {column: (row.get(column) or "").strip() for column in ("batch_id", "batch_size")}
    record["batch_id"] = record["batch_size"] = None
    if texts["batch_id"]:
        try:
            value = float(texts["batch_id"])
            ok = value.is_integer() and value >= 1
        except ValueError:
            ok = False
        if ok:
            record["batch_id"] = int(value)
        else:
            problems.append(Problem(where, f"{texts['batch_id']!r} is not a batch id", "batch_id",
                                    "a whole number ≥ 1 shared by the rows of one batch, or an empty cell"))
    if texts["batch_size"]:
        try:
            value = float(texts["batch_size"])
            size = int(value) if value.is_integer() else texts["batch_size"]
        except ValueError:
            size = texts["batch_size"]
        try:
            record["batch_size"] = check_batch_size(size, MAX_BATCH_SIZE, where)
        except InputError as exc:
            problems.extend(replace(p, column="batch_size") for p in exc.problems)
    if bool(texts["batch_id"]) != bool(texts["batch_size"]):
        given, missing = ("batch_id", "batch_size") if texts["batch_id"] else ("batch_size", "batch_id")
        problems.append(Problem(where, f"has a {given} but no {missing}", missing,
                                "batch_id and batch_size together, or neither (the query runs on its own)"))
    return problems


def _batch_problems(records: list[dict], wheres: list[str], lines: list[int]) -> list[Problem]:
    """Rows of one batch that disagree: another device, model or batch size than the batch's
    first row, another start, or more rows than the batch size. One problem per row, by file:line."""
    problems = []
    first: dict[int, int] = {}
    members: dict[int, int] = {}
    expected = "the rows of one batch on one device and model, with one batch size and one start"
    for position, record in enumerate(records):
        batch = record.get("batch_id")
        if batch is None or record.get("batch_size") is None:
            continue
        if batch not in first:
            first[batch], members[batch] = position, 1
            continue
        members[batch] += 1
        head = records[first[batch]]
        line = lines[first[batch]]
        for column, unit in (("device", ""), ("model", ""), ("batch_size", ""), ("device_start_s", " s")):
            mine, theirs = record[column], head[column]
            if column == "device_start_s" and (pd.isna(mine) or pd.isna(theirs)):
                continue
            if mine != theirs:
                problems.append(Problem(wheres[position], f"batch {batch} has {column} {mine}{unit} here but "
                                        f"{theirs}{unit} on line {line}", column, expected))
        if members[batch] == head["batch_size"] + 1:
            problems.append(Problem(wheres[position], f"batch {batch} has more rows than its batch size "
                                    f"{head['batch_size']} (from line {line})", "batch_id",
                                    "at most batch_size rows with one batch_id"))
    return problems


@dataclass(frozen=True)
class _Refusal:
    """Why one row of a schedule cannot run here (one sentence, shared by every row it applies to)."""

    column: str
    message: str
    expected: str


def _refusals(store: Store, queries: pd.DataFrame, *, busy: bool = True) -> tuple[list[tuple[int, _Refusal]], list[str]]:
    """(row position, why) for every row that cannot run on this host now: its model is not in
    the catalog or has no local files, its τin + τout exceeds the model's context, its device
    is not on this host or (with ``busy``) another run holds it now. Also the devices, as stored,
    that are here.

    A row on a cluster node's device (``node/device``) is not refused for model files missing
    on this host: the node checks its own files before it runs anything, and fails that
    device's part naming the node and the path (:func:`engine.cluster.work.missing_model_files`).
    Its context is checked where this host has the files (the same model at the same path)."""
    by_model: dict[str, _Refusal | None] = {}
    by_model_on_node: dict[str, _Refusal | None] = {}
    contexts: dict[str, int | None] = {}
    for model in queries["model"].unique():
        entry = catalog.get_model(store, model)
        by_model[model], contexts[model] = _model_refusal(model, entry), None
        by_model_on_node[model] = _model_refusal(model, entry, files_here=False)
        if entry is not None and by_model_on_node[model] is None:
            contexts[model] = catalog.runtime_context_length(entry)
    by_device: dict[str, _Refusal | None] = {}
    here = []
    for device in queries["device"].unique():
        try:
            stored = runs.check_device(device)
        except DeviceUnavailableError as exc:
            by_device[device] = _Refusal("device", str(exc).rstrip("."), "a device of this host")
            continue
        here.append(stored)
        holder = runs.run_on_device(store, stored) if busy else None
        by_device[device] = None if holder is None else _Refusal("device", f"{holder} is running on {stored}",
                                                                    "wait for it to finish, or cancel it")
    refusals = []
    for position, row in enumerate(queries[["model", "device", "input_tokens", "output_tokens"]].itertuples(index=False)):
        context = contexts[row.model]
        refusal = (by_model_on_node if is_qualified(row.device) else by_model)[row.model]
        if refusal is not None:
            refusals.append((position, refusal))
        elif context is not None and row.input_tokens + row.output_tokens > context:
            refusals.append((position, _Refusal(
                "input_tokens", f"{row.input_tokens:,} + {row.output_tokens:,} tokens exceed the {context:,}-token "
                f"context {row.model} runs with here", f"at most {context:,} input and output tokens together")))
        if by_device[row.device] is not None:
            refusals.append((position, by_device[row.device]))
    return refusals, here


def _model_refusal(model: str, entry: catalog.CatalogEntry | None, *, files_here: bool = True) -> _Refusal | None:
    """Why a model cannot run (not in the catalog, no local weights, with ``files_here`` its files gone), or None."""
    if entry is None:
        return _Refusal("model", f"model {model!r} is no longer in the catalog", "add it again on the Models page")
    if entry.backend == "external" or not entry.path or entry.path.startswith(catalog.HUB_PREFIX):
        return _Refusal("model", f"model {model!r} has no local weights here ({entry.backend}); it can be planned "
                        "with its measurements but not run", "a local model")
    if files_here and not catalog.resolve_model_path(entry.path).exists():
        return _Refusal("model", f"the files of {model!r} are no longer at {entry.path}",
                        "move them back, or give the new path on the Models page")
    return None


def _row_problems(refusals: list[tuple[int, _Refusal]], wheres: list[str], label: str) -> list[Problem]:
    """One problem per refused row (``wheres[row]``), at most :data:`MAX_ROWS_PER_REFUSAL` for each
    reason, then one line counting the rest of that reason's rows."""
    by_reason: dict[_Refusal, list[int]] = {}
    for position, refusal in refusals:
        by_reason.setdefault(refusal, []).append(position)
    problems, summaries = [], []
    for refusal, positions in by_reason.items():
        problems += [(position, Problem(wheres[position], refusal.message, refusal.column, refusal.expected))
                     for position in positions[:MAX_ROWS_PER_REFUSAL]]
        rest = positions[MAX_ROWS_PER_REFUSAL:]
        if rest:
            summaries.append(Problem(label, f"{len(rest):,} more rows ({wheres[rest[0]]} to {wheres[rest[-1]]}): "
                                     f"{refusal.message}", refusal.column, refusal.expected))
    return [problem for _, problem in sorted(problems, key=lambda item: item[0])] + summaries


def check_runnable(store: Store, plan_id: int, queries: pd.DataFrame, *, busy: bool = True) -> list[str]:
    """Problems that stop a plan from running here: models not in the catalog or not local,
    model files that moved, queries longer than their model's context, devices this host
    lacks or (with ``busy``) that a run holds now. Returns the devices."""
    if queries.empty:
        raise InputError(Problem("plan", f"plan {plan_id} has no schedule to run", None,
                                 "a plan whose status is optimal or feasible"))
    refusals, devices = _refusals(store, queries, busy=busy)
    if refusals:
        ids = queries["query_id"].astype(str).tolist()
        by_reason: dict[_Refusal, list[str]] = {}
        for position, refusal in refusals:
            by_reason.setdefault(refusal, []).append(ids[position])
        raise InputError([Problem(f"plan {plan_id}, {_queries_named(named)}", refusal.message, refusal.column,
                                  refusal.expected) for refusal, named in by_reason.items()])
    return devices


def _queries_named(ids: list[str]) -> str:
    """``query q1``, ``queries q1, q2``, ``queries q1, q2, q3 and 12 more``."""
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3:,} more" if len(ids) > 3 else "")
    return f"quer{'y' if len(ids) == 1 else 'ies'} {shown}"


def why_plan_cannot_run_here(store: Store, plan_id: int) -> list[Problem]:
    """What stops a stored plan from ever running on this host (a model without local files, a
    device this host lacks); empty when it can. A device busy right now does not count."""
    try:
        check_runnable(store, plan_id, plan_queries(store, plan_id), busy=False)
    except InputError as exc:
        return list(exc.problems)
    return []


def create_execution(store: Store, plan_id: int) -> Execution:
    """Check that the plan can run here and queue its execution."""
    queries = plan_queries(store, plan_id)
    if store.query_one("SELECT id FROM plans WHERE id = ?", [int(plan_id)]) is None:
        raise InputError(Problem("plan", f"no plan with id {plan_id}", None, "a plan id (Plan page or plan --json)"))
    devices = check_runnable(store, plan_id, queries)
    with store.connect() as con:
        execution_id = int(con.execute(
            "INSERT INTO executions (plan_id, host, status, queries_total, queries_done, settings) "
            "VALUES (?, ?, 'queued', ?, 0, ?) RETURNING id",
            [int(plan_id), runs.host_name(), len(queries), json.dumps({"devices": devices})]).fetchone()[0])
    return get_execution(store, execution_id)


# -- the lifecycle, for executions (see engine.runs) ------------------------------------------

def worker_log_path(store: Store, execution_id: int) -> Path:
    """Where an execution's worker writes its own output (library messages, a crash's last words)."""
    return runs.worker_log_path(store, EXECUTION, execution_id)


def start_worker(store: Store, execution_id: int, *, watch: bool = True) -> runs.RunHandle:
    """Start the worker of a queued execution; with ``watch``, a thread records how it ended."""
    return runs.start(store, EXECUTION, execution_id, watch=watch)


def reconcile_executions(store: Store) -> None:
    """Close the active executions of this host whose worker is gone."""
    runs.reconcile(store, (EXECUTION,))


def cancel_execution(store: Store, execution_id: int, *, grace_s: float = 10.0) -> Execution:
    """Stop an execution within seconds (after the batch in flight, or killing it after ``grace_s``: it then
    runs again whole on resume); what ran is kept."""
    get_execution(store, execution_id)
    runs.cancel(store, EXECUTION, execution_id, grace_s=grace_s)
    return get_execution(store, execution_id)


def resume_execution(store: Store, execution_id: int) -> Execution:
    """Queue a failed or cancelled execution again; its worker runs only the batches left."""
    execution = get_execution(store, execution_id)
    runs.check_resumable(store, EXECUTION, execution_id)
    check_runnable(store, execution.plan_id, plan_queries(store, execution.plan_id))
    runs.requeue(store, EXECUTION, execution_id)
    return get_execution(store, execution_id)


# -- progress and results -----------------------------------------------------------------------

@dataclass(frozen=True)
class ExecutionProgress:
    """Where an execution stands, overall and per device.

    ``devices`` has per device: done, total (queries), batches_done, batches_total,
    measured_energy_j (NaN while none is known), predicted_done_j (the predictions of the
    queries done), predicted_total_j, elapsed_s, remaining_s (from the measured pace against
    the predicted runtimes). A batch's queries are stored together, so ``done`` grows by a
    batch at a time; a query outside any batch counts as a batch of its own.
    ``elapsed_s`` is the running time of the whole execution across its runs: the current
    (or last) run's wall-clock time plus the time the queries of earlier runs took (on the
    busiest device, as devices run in parallel; the pauses between runs do not count).
    """

    execution: Execution
    devices: pd.DataFrame
    done: int
    total: int
    measured_energy_j: float | None
    predicted_done_j: float | None
    predicted_total_j: float | None
    energy_estimated: bool
    elapsed_s: float | None
    remaining_s: float | None
    batches_done: int = 0
    batches_total: int = 0


def execution_progress(store: Store, execution_id: int) -> ExecutionProgress:
    execution = get_execution(store, execution_id)
    started = None if execution.started_at is None or pd.isna(execution.started_at) \
        else pd.Timestamp(execution.started_at)
    per_device = store.query_df(
        """SELECT a.device, count(*) AS total, count(r.query_id) AS done,
                  count(DISTINCT coalesce(CAST(a.batch_id AS VARCHAR), 'query ' || a.query_id)) AS batches_total,
                  count(DISTINCT CASE WHEN r.query_id IS NOT NULL
                                      THEN coalesce(CAST(a.batch_id AS VARCHAR), 'query ' || a.query_id) END)
                      AS batches_done,
                  sum(r.energy_j) AS measured_energy_j,
                  sum(CASE WHEN r.query_id IS NOT NULL THEN a.predicted_energy_j END) AS predicted_done_j,
                  sum(a.predicted_energy_j) AS predicted_total_j,
                  sum(CASE WHEN r.query_id IS NOT NULL THEN a.predicted_runtime_s END) AS predicted_done_s,
                  sum(a.predicted_runtime_s) AS predicted_total_s, sum(r.runtime_s) AS runtime_s,
                  coalesce(sum(r.runtime_s) FILTER (WHERE ? IS NULL OR r.started_at < ?), 0) AS earlier_runtime_s,
                  bool_or(r.energy_source = 'estimated') AS estimated
           FROM plan_assignments a
           LEFT JOIN execution_results r ON r.execution_id = ? AND r.query_id = a.query_id
           WHERE a.plan_id = ? GROUP BY a.device ORDER BY a.device""",
        [started, started, execution.id, execution.plan_id])
    earlier_s = float(per_device.earlier_runtime_s.max()) if len(per_device) else 0.0
    per_device = per_device.drop(columns=["earlier_runtime_s"])
    elapsed = remaining = None
    if started is not None:
        end = pd.Timestamp(execution.finished_at) if execution.status in FINISHED and \
            not pd.isna(execution.finished_at) else pd.Timestamp.now(tz=started.tz)
        elapsed = max(0.0, (end - started).total_seconds()) + earlier_s
    elif earlier_s:
        elapsed = earlier_s  # queued again after a pause: the runs so far
    if execution.status in ACTIVE and len(per_device):
        left = []
        for row in per_device.itertuples():
            done_s, total_s, ran_s = _zero(row.predicted_done_s), _zero(row.predicted_total_s), _zero(row.runtime_s)
            pace = ran_s / done_s if row.done and done_s > 0 else 1.0  # measured against predicted so far
            left.append(max(total_s - done_s, 0.0) * pace)
        remaining = max(left)  # devices run in parallel
    done, total = int(per_device.done.sum()), int(per_device.total.sum())
    measured = per_device.measured_energy_j.sum(min_count=1)
    return ExecutionProgress(
        execution, per_device, done, total,
        None if pd.isna(measured) else float(measured),
        _maybe(per_device.predicted_done_j.sum(min_count=1)), _maybe(per_device.predicted_total_j.sum(min_count=1)),
        bool(per_device.estimated.fillna(False).any()), elapsed, remaining,
        int(per_device.batches_done.sum()), int(per_device.batches_total.sum()))


def _zero(value) -> float:
    """A summed column's value, 0 where the sum had nothing (NULL, NA or NaN)."""
    return 0.0 if value is None or pd.isna(value) else float(value)


def _maybe(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def execution_results(store: Store, execution_id: int) -> pd.DataFrame:
    """Per query: what ran and what it cost next to what was predicted, in schedule order.

    A member of a batch has its share of the batch's energy and runtime (``energy_share``, the
    rule of :data:`engine.execution.worker.SHARE_RULE`), its batch (``batch_id``, the planned
    ``batch_size``) and the waste the batch ran for it (``wasted_decode_tokens``,
    ``padding_tokens``); the batch's own figures are :func:`engine.execution.execution_batches`.
    """
    return store.query_df(
        """SELECT query_id AS id, model, device, prompt_kind, planned_input_tokens, input_tokens, planned_output_tokens,
                  output_tokens, stopped, runtime_s, predicted_runtime_s, energy_j, predicted_energy_j,
                  predicted_energy_uncertainty_j, energy_source, energy_method, idle_power_w, category, error,
                  generated_text, batch_id, batch_size, energy_share, wasted_decode_tokens, padding_tokens,
                  started_at, finished_at
           FROM execution_results WHERE execution_id = ? ORDER BY device, position""", [int(execution_id)])


def execution_energy_scope(store: Store, execution_id: int) -> str:
    """The energy scope (total or dynamic) of the plan an execution runs; its comparison uses the same."""
    row = store.query_one("SELECT p.energy_scope FROM plans p JOIN executions e ON e.plan_id = p.id WHERE e.id = ?",
                          [int(execution_id)])
    if row is None:
        raise InputError(Problem("execution", f"no execution with id {execution_id}", None, "an execution id"))
    return row[0] or "total"
