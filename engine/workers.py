"""Worker processes, as profiling jobs and executions both start them: recognising one by
its command line, and stopping one (SIGTERM, then SIGKILL after a grace period)."""

from __future__ import annotations

import os
import signal
import time

import psutil


def is_worker(pid: int | None, module: str, flag: str, ident: int) -> bool:
    """True while ``pid`` is a live ``python -m module ... flag ident`` process.

    The id must be the last argument exactly, so a worker of job 12 is never taken for job 1
    (and a reused pid of some other program never for a worker).
    """
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        arguments = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return module in " ".join(arguments) and arguments[-2:] == [flag, str(ident)]


def stop_worker(pid: int | None, module: str, flag: str, ident: int, grace_s: float) -> None:
    """Ask the worker to stop (SIGTERM) and kill it if it is still there after ``grace_s``."""
    if not is_worker(pid, module, flag, ident):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and is_worker(pid, module, flag, ident):
        time.sleep(0.1)
    if is_worker(pid, module, flag, ident):
        os.kill(pid, signal.SIGKILL)
