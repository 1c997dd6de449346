"""Long work off the script thread: a plan, the trade-off curves, the fits.

A page hands the work to :func:`start`; it runs on a small thread pool shared by every
session (kept in ``st.cache_resource``), so the page stays live while it runs. The worker
thread never calls ``st.*``: it only reports through a :class:`TaskProgress`, a small
thread-safe object the page reads. The page then

1. takes the outcome of a finished task, once, at the top of its run
   (:func:`take_outcome`): the result, or the error the work raised;
2. draws everything else;
3. calls :func:`show_progress`: while the task runs, a fragment polls it
   (``@st.fragment(run_every=...)``), shows its progress, and reruns the whole page when
   it ends, so step 1 picks the outcome up.

One task per slot and session: a new request in a slot supersedes the one before. A
superseded task is asked to stop (:attr:`TaskProgress.cancelled`, checked by work that
has steps) and its outcome is never shown. Work already inside a single call (one solve)
finishes in its thread and is dropped.

Under AppTest, fragments do not rerun on their own: a test calls ``at.run()`` again until
the outcome shows (tests/test_ui_background.py has the helper), which is the same path
a browser takes, only polled by the test.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import streamlit as st

from engine.formatting import format_duration

#: Threads for every session's long work together; more requests wait their turn (the
#: solver and the fits are CPU-bound, so more threads would not finish sooner).
MAX_WORKERS = 2


class TaskCancelled(Exception):
    """Raised inside work that noticed its task was superseded or stopped."""


class TaskProgress:
    """What a task has done so far: written by its worker thread, read by the page.

    ``report`` and ``snapshot`` hold a lock, so a reader never sees a message from one
    step with the count of another.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._message = ""
        self._done = 0
        self._total: int | None = None
        self._cancelled = threading.Event()

    def report(self, message: str | None = None, *, done: int | None = None, total: int | None = None) -> None:
        """Record a step: its words, and how many of how many steps are done (when countable)."""
        with self._lock:
            if message is not None:
                self._message = message
            if done is not None:
                self._done = done
            if total is not None:
                self._total = total

    def snapshot(self) -> tuple[str, int, int | None]:
        """(message, done, total) as last reported; total is None when the work is not countable."""
        with self._lock:
            return self._message, self._done, self._total

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """Whether the page no longer wants the result (a newer request, or Stop)."""
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`TaskCancelled` when the task was superseded: call it between steps."""
        if self.cancelled:
            raise TaskCancelled()


@dataclass
class Task:
    """One piece of long work of one session."""

    slot: str
    label: str
    request: Hashable
    future: Future
    progress: TaskProgress
    started: float  # time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True)
class Outcome:
    """How a task ended: its ``value``, or the ``error`` its work raised; ``request`` is what was asked."""

    request: Hashable
    value: Any = None
    error: BaseException | None = None
    elapsed_s: float = 0.0


@st.cache_resource
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="joule-work")


def _key(slot: str) -> str:
    return f"_task_{slot}"


def start(slot: str, label: str, work: Callable[[TaskProgress], Any], *, request: Hashable = None) -> Task:
    """Run ``work(progress)`` on the pool as this session's task in ``slot``; a task there is superseded."""
    cancel(slot)
    progress = TaskProgress()
    task = Task(slot=slot, label=label, request=request, future=_executor().submit(work, progress),
                progress=progress, started=time.monotonic())
    st.session_state[_key(slot)] = task
    return task


def current(slot: str) -> Task | None:
    """This session's task in ``slot``, running or finished but not yet taken."""
    return st.session_state.get(_key(slot))


def cancel(slot: str) -> None:
    """Drop the task in ``slot``: it is asked to stop and its outcome is never shown."""
    task = st.session_state.pop(_key(slot), None)
    if task is not None:
        task.progress.cancel()
        task.future.cancel()  # only stops work that has not started


def take_outcome(slot: str) -> Outcome | None:
    """The outcome of the task in ``slot`` if it has finished (once: the slot is emptied), else None."""
    task = current(slot)
    if task is None or not task.future.done():
        return None
    del st.session_state[_key(slot)]
    if task.future.cancelled():
        return None
    error = task.future.exception()
    if isinstance(error, TaskCancelled):
        return None
    return Outcome(request=task.request, value=None if error else task.future.result(), error=error,
                   elapsed_s=task.elapsed_s)


def wait_text(task: Task) -> str:
    """``Planning 200 queries: solving… (12 s so far)``, or that it waits for a free worker."""
    message, done, total = task.progress.snapshot()
    if not task.future.running() and not task.future.done():
        return f"{task.label}: waiting for another session's work to finish ({format_duration(task.elapsed_s)} so far)"
    step = f" {done} of {total}." if total else ""
    return f"{task.label}: {message or 'working'}…{step} ({format_duration(task.elapsed_s)} so far)"


def show_progress(slot: str, *, poll_s: float = 0.5, stop_label: str = "Stop") -> None:
    """While the task in ``slot`` runs: its progress, refreshed every ``poll_s``, and a button that drops it.

    When it ends, the whole page reruns (so :func:`take_outcome` at the top picks it up).
    """
    task = current(slot)
    if task is None:
        return

    @st.fragment(run_every=poll_s)
    def watch() -> None:
        if current(slot) is not task or task.future.done():
            st.rerun(scope="app")
        _message, done, total = task.progress.snapshot()
        if total:
            st.progress(min(done / total, 1.0), text=wait_text(task))
        else:
            st.info(wait_text(task), icon=":material/hourglass_top:")
        if st.button(stop_label, key=f"_task_stop_{slot}",
                     help="Stop waiting for this result. Work already inside one solve finishes in the background "
                          "and is dropped."):
            cancel(slot)
            st.rerun(scope="app")

    watch()
