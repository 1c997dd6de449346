"""Long runs (profiling jobs, executions): one lifecycle, one rule per device, one place they execute.

- ``kinds``: each kind of run described as data (:class:`RunKind`), and the run states;
- ``devices``: this host's name, which devices it has, and a device's lock file;
- ``lifecycle``: start, watch, reconcile, cancel and resume a run; which run holds a device;
- ``launcher``: where a run's worker executes, behind :class:`RunLauncher`;
- ``local``: the launcher of today, a worker process on this host;
- ``cluster``: with a cluster address, the launcher that drives runs on cluster devices;
- ``worker``: what every worker process does around its own work.

Profiling and execution use these with their own kind and their own measuring; this
package imports neither.
"""

from engine.runs.devices import check_device, device_lock, host_name
from engine.runs.kinds import ACTIVE, EXECUTION, FINISHED, PROFILING, RUN_KINDS, RunKind
from engine.runs.launcher import RunHandle, RunLauncher, exit_reason
from engine.runs.lifecycle import (
    BusyRun,
    cancel,
    check_resumable,
    close_orphan,
    current_launcher,
    mark_done,
    mark_running,
    reconcile,
    requeue,
    run_on_device,
    set_status,
    start,
    stored_count,
    watch_until_done,
)
from engine.runs.local import LocalProcessLauncher, worker_log_path
from engine.runs.worker import RunCancelled, worker_main

__all__ = [
    "ACTIVE", "BusyRun", "EXECUTION", "FINISHED", "LocalProcessLauncher", "PROFILING", "RUN_KINDS", "RunCancelled",
    "RunHandle", "RunKind", "RunLauncher", "cancel", "check_device", "check_resumable", "close_orphan",
    "current_launcher", "device_lock", "exit_reason", "host_name", "mark_done", "mark_running", "reconcile",
    "requeue", "run_on_device", "set_status", "start", "stored_count", "watch_until_done", "worker_log_path", "worker_main",
]
