"""What a device's remote work streams back to the driver, and how it is batched. No Ray here.

The measuring code of profiling and execution hands each record to a sink (a
:class:`~engine.profiling.worker.TrialSink`, a :class:`~engine.execution.worker.ResultSink`).
On a node, that sink is a :func:`forwarding_sink`: each call becomes a :class:`SinkCall`,
and :func:`stream_work` runs the work in a thread and yields the calls in
:class:`Batch` es (every ``max_calls`` calls or ``flush_s`` seconds, whichever comes
first, so a short request does not pay one round trip of its own), with an empty batch
every ``heartbeat_s`` while there is nothing to send (so the driver can tell a quiet
node from a frozen one) and a last batch that says how the work ended (:class:`End`).
The driver replays the calls on the kind's own sink that writes the database.
"""

from __future__ import annotations

import abc
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.errors import PlannerError

#: Defaults of the batching: calls per batch, seconds a call may wait, seconds between heartbeats.
MAX_CALLS = 32
FLUSH_S = 0.5
HEARTBEAT_S = 2.0


@dataclass(frozen=True)
class SinkCall:
    """One call the measuring code made on its sink: ``sink.<method>(*args, **kwargs)``."""

    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class End:
    """How a device's work ended: ``status`` done, failed or cancelled; ``value`` what it returned;
    ``reason`` why it failed, in words."""

    status: str
    value: Any = None
    reason: str | None = None


@dataclass(frozen=True)
class Batch:
    """What a stream delivers at once: sink calls in the order made, progress lines, and at the last one its end."""

    calls: tuple[SinkCall, ...] = ()
    progress: tuple[str, ...] = ()
    end: End | None = None


class RemoteWork(abc.ABC):
    """The part of a run one device does, as sent to its node (it must pickle).

    ``sink_interface`` is the sink ABC its measuring code writes to; :meth:`run` does the
    work on the node, every record into ``sink``, and returns what the measuring returns.
    """

    sink_interface: type

    @abc.abstractmethod
    def model_files(self) -> list[tuple[str, str]]:
        """``(model, stored path)`` of each model the work loads: checked on the node before anything runs."""

    @abc.abstractmethod
    def run(self, sink: Any, progress: Callable[[str], None]) -> Any:
        """Do the work on this node, handing every record to ``sink``. Raises on failure."""


def forwarding_sink(interface: type, emit: Callable[[SinkCall], None]) -> Any:
    """An instance of the sink ABC ``interface`` whose every abstract method hands its call to ``emit``.

    Built from the interface itself, so a sink method added to profiling or execution is
    forwarded without a change here.
    """
    def forward(name: str) -> Callable:
        def method(self, *args, **kwargs) -> None:  # noqa: ARG001 (the sink's own signature)
            emit(SinkCall(name, args, kwargs))

        method.__name__ = name
        return method

    methods = {name: forward(name) for name in getattr(interface, "__abstractmethods__", ())}
    return type(f"Forwarding{interface.__name__}", (interface,), methods)()


class _Outbox:
    """Calls and progress lines waiting to be sent; the work thread puts, the stream takes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.calls: list[SinkCall] = []
        self.progress: list[str] = []
        self.end: End | None = None
        self.first_waiting_s: float | None = None
        self.changed = threading.Condition()

    def put_call(self, call: SinkCall) -> None:
        with self.changed:
            self.calls.append(call)
            if self.first_waiting_s is None:
                self.first_waiting_s = self.clock()
            self.changed.notify()

    def put_progress(self, line: str) -> None:
        with self.changed:
            self.progress.append(str(line))
            if self.first_waiting_s is None:
                self.first_waiting_s = self.clock()
            self.changed.notify()

    def finish(self, end: End) -> None:
        with self.changed:
            self.end = end
            self.changed.notify()

    def take(self, max_calls: int, flush_s: float, heartbeat_s: float) -> Batch:
        """The next batch: when ``max_calls`` wait, the oldest waited ``flush_s``, the work ended, or a heartbeat is due."""
        started = self.clock()
        with self.changed:
            while True:
                now = self.clock()
                full = len(self.calls) >= max_calls
                due = self.first_waiting_s is not None and now - self.first_waiting_s >= flush_s
                if full or due or self.end is not None or now - started >= heartbeat_s:
                    calls, self.calls = self.calls[:max_calls], self.calls[max_calls:]
                    progress, self.progress = self.progress, []
                    self.first_waiting_s = now if self.calls else None
                    end = self.end if not self.calls else None  # the end goes with the last calls
                    return Batch(tuple(calls), tuple(progress), end)
                waits = [heartbeat_s - (now - started)]
                if self.first_waiting_s is not None:
                    waits.append(flush_s - (now - self.first_waiting_s))
                self.changed.wait(max(0.001, min(waits)))


def stream_work(work: RemoteWork, *, max_calls: int = MAX_CALLS, flush_s: float = FLUSH_S,
                heartbeat_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.monotonic) -> Iterator[Batch]:
    """Run ``work`` in a thread and yield what it hands its sink, in batches, until a batch with its end.

    A failure of the work ends the stream with ``End("failed", reason=...)`` (a
    PlannerError's sentence as it is, another exception as ``Type: message``); a
    :class:`engine.runs.RunCancelled` with ``End("cancelled")``.
    """
    outbox = _Outbox(clock)
    sink = forwarding_sink(work.sink_interface, outbox.put_call)

    def run() -> None:
        from engine.runs import RunCancelled

        try:
            value = work.run(sink, outbox.put_progress)
        except RunCancelled:
            outbox.finish(End("cancelled"))
        except BaseException as exc:  # noqa: BLE001 (sent to the driver, which records it)
            if not isinstance(exc, PlannerError):
                traceback.print_exc()  # into the node's worker log
            outbox.finish(End("failed", reason=failure_text(exc)))
        else:
            outbox.finish(End("done", value=value))

    threading.Thread(target=run, daemon=True, name="device-work").start()
    while True:
        batch = outbox.take(max_calls, flush_s, heartbeat_s)
        yield batch
        if batch.end is not None:
            return


def failure_text(exc: BaseException) -> str:
    """An exception in words: a PlannerError's sentence, else ``Type: first line``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, PlannerError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
