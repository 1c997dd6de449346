"""Where a run's worker executes, behind one interface.

The lifecycle starts, checks and stops workers only through a :class:`RunLauncher`.
Today's one is :class:`engine.runs.local.LocalProcessLauncher` (a process on this host);
another (a cluster) implements the same three methods, and profiling and execution do not
change. Whatever the launcher, only the app's host writes the database: a worker that runs
elsewhere hands its records back through the sink of its kind.
"""

from __future__ import annotations

import abc
import signal
from typing import Protocol

from engine.runs.kinds import RunKind
from engine.store import Store


class RunHandle(Protocol):
    """A started worker, as the starter follows it (``subprocess.Popen`` is one)."""

    pid: int  # the number stored in the run's row, by which the launcher finds the worker again

    def poll(self) -> int | None:
        """The exit code once the worker ended, else None."""

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to end; its exit code (negative: killed by that signal)."""

    def kill(self) -> None:
        """End the worker at once."""


class RunLauncher(abc.ABC):
    """Starts the worker of a run, tells whether it still runs, and stops it."""

    @abc.abstractmethod
    def start(self, kind: RunKind, store: Store, run_id: int) -> RunHandle:
        """Start the worker of a queued run; returns at once."""

    @abc.abstractmethod
    def is_alive(self, kind: RunKind, run_id: int, pid: int | None) -> bool:
        """Whether ``pid`` is the live worker of this run (never some other process that got its number)."""

    @abc.abstractmethod
    def stop(self, kind: RunKind, run_id: int, pid: int | None, grace_s: float) -> None:
        """Ask the run's worker to stop; end it if it has not after ``grace_s``. Nothing else is touched."""


def exit_reason(returncode: int) -> str:
    """How a worker ended, in words, from its exit code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the worker process was killed ({name})"
    return f"the worker process exited with code {returncode} without finishing"
