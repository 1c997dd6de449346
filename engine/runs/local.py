"""Runs as worker processes on this host: ``python -m MODULE --db PATH --flag ID``.

A worker runs in a session of its own, so a Ctrl-C in the terminal or a restart of the
app does not reach it, and writes its output to a log file beside the database. Its
inference threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, see
:mod:`engine.energy.waiting`), so that waiting is not counted, or burnt, as work. It is
recognised by its command line, with the run's id as the exact last argument: the worker of
job 12 is never taken for job 1, and a number the system gave to some other program since
is never taken for a worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from engine.energy.waiting import worker_environment
from engine.paths import PROJECT_ROOT
from engine.runs.kinds import RunKind
from engine.runs.launcher import RunLauncher
from engine.store import Store


def log_path(store: Store, name: str) -> Path:
    """``<db folder>/logs/<name>.log``: where a process's own output goes (library messages, a crash's last words)."""
    folder = store.path.resolve().parent / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.log"


def worker_log_path(store: Store, kind: RunKind, run_id: int) -> Path:
    """The log of a run's worker: ``<db folder>/logs/<log prefix>-<id>.log``."""
    return log_path(store, f"{kind.log_prefix}-{run_id}")


def spawn(module: str, arguments: Sequence[str], log: Path) -> subprocess.Popen:
    """Start ``python -m module arguments...`` in its own session, its output appended to ``log``.

    Its environment is this one with passive waiting for OpenMP threads (set before the
    worker imports torch or llama_cpp, which read it once).
    """
    with log.open("ab") as output:
        return subprocess.Popen([sys.executable, "-m", module, *arguments], cwd=PROJECT_ROOT,
                                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True, env=worker_environment())


def is_process_of(pid: int | None, module: str, last_arguments: Sequence[str]) -> bool:
    """True while ``pid`` is a live process of ``module`` whose command line ends with ``last_arguments`` exactly."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        arguments = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    tail = list(last_arguments)
    return module in " ".join(arguments) and (not tail or arguments[-len(tail):] == tail)


class LocalProcessLauncher(RunLauncher):
    """Each run is a worker process on this host."""

    def start(self, kind: RunKind, store: Store, run_id: int) -> subprocess.Popen:
        arguments = ["--db", str(store.path.resolve()), kind.id_flag, str(run_id)]
        return spawn(kind.worker_module, arguments, worker_log_path(store, kind, run_id))

    def is_alive(self, kind: RunKind, run_id: int, pid: int | None) -> bool:
        return is_process_of(pid, kind.worker_module, [kind.id_flag, str(run_id)])

    def stop(self, kind: RunKind, run_id: int, pid: int | None, grace_s: float) -> None:
        """SIGTERM (the worker stops at its next safe point), then SIGKILL if it is still there after ``grace_s``."""
        if not self.is_alive(kind, run_id, pid):
            return
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.is_alive(kind, run_id, pid):
            time.sleep(0.1)
        if self.is_alive(kind, run_id, pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, number: signal.Signals) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass  # it ended between the check and the signal
