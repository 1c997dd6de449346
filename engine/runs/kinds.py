"""The kinds of long run, described as data: which table holds them, which worker runs them.

The lifecycle (:mod:`engine.runs.lifecycle`) is written once against this description.
Both kinds are listed here, beside the lifecycle, because the rule "one run per device"
spans every kind: a profiling job and an execution on one device would measure each
other. The worker modules are named, never imported, so this layer stays below them.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVE = ("queued", "running", "cancelling")
FINISHED = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class RunKind:
    """What the lifecycle needs to know of one kind of long run.

    Attributes:
        noun: what one run is called in messages ("profiling job 3 is running on cpu").
        table: the table of the runs (columns id, host, status, reason, pid, created_at,
            started_at, finished_at and the two ``progress_columns``).
        worker_module: the module run as ``python -m worker_module --db PATH id_flag ID``.
        id_flag: the worker's option that takes the run's id (always its last argument).
        log_prefix: the worker's log is ``<db folder>/logs/<log_prefix>-<id>.log``.
        progress_columns: the columns counting what is done and how much there is.
        progress_noun: what those columns count ("points", "queries").
        stored_noun: what one stored result is ("trials", "queries").
        stored_count_sql: counts a run's stored results; one parameter, the run's id.
        devices_sql: an expression over a row of ``table``: the list of devices the run uses.
    """

    noun: str
    table: str
    worker_module: str
    id_flag: str
    log_prefix: str
    progress_columns: tuple[str, str]
    progress_noun: str
    stored_noun: str
    stored_count_sql: str
    devices_sql: str

    def label(self, run_id: int) -> str:
        """``profiling job 3``, ``execution 5``."""
        return f"{self.noun} {run_id}"


PROFILING = RunKind(
    noun="profiling job", table="profiling_jobs", worker_module="engine.profiling.worker", id_flag="--job",
    log_prefix="profiling-job", progress_columns=("points_done", "points_total"), progress_noun="points",
    stored_noun="trials", stored_count_sql="SELECT count(*) FROM measurements WHERE job_id = ?",
    devices_sql="[device]")

EXECUTION = RunKind(
    noun="execution", table="executions", worker_module="engine.execution.worker", id_flag="--execution",
    log_prefix="execution", progress_columns=("queries_done", "queries_total"), progress_noun="queries",
    stored_noun="queries", stored_count_sql="SELECT count(*) FROM execution_results WHERE execution_id = ?",
    devices_sql="coalesce(from_json(settings -> '$.devices', '[\"VARCHAR\"]'), [])")

RUN_KINDS: tuple[RunKind, ...] = (PROFILING, EXECUTION)
