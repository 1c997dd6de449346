"""The driver's loop over every device's stream: one wait over all, each record stored as it arrives.

:func:`drive` is written against :class:`ClusterInterface`, a handful of operations the
real cluster (:class:`engine.cluster.remote.RayCluster`) and a test's in-process fake
both provide. What it guarantees:
- every delivered sink call is handed to ``deliver`` in the order its device made it;
  ``deliver`` (the driver's :class:`StoringSink`) skips a record already stored, so a
  stream re-run from its start stores nothing twice;
- a device whose node is lost (or that sends no word, not even a heartbeat, for
  ``stall_s``) is stopped and reported failed with the reason, at once; the other
  devices go on;
- a stop request (cancel) stops every device within one ``poll_s``.
No Ray and no database here.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine.cluster.errors import ClusterError, NodeLostError
from engine.cluster.naming import QualifiedDevice, parse_qualified
from engine.cluster.protocol import Batch, End, RemoteWork, SinkCall

POLL_S = 0.5
#: Seconds without any batch (heartbeats come every 2 s) after which a node counts as lost.
STALL_S = 30.0
#: Seconds a part may take to send its first batch: an actor starts a process and imports the engine, and waits
#: while another run holds its device.
START_S = 120.0
#: Seconds between two asks whether the cluster has declared a running part's node dead.
LIVENESS_S = 2.0


@dataclass(frozen=True)
class Part:
    """What one device of a run does: ``device`` where it runs (``nodeA/cpu``), ``work`` what it runs there."""

    device: str
    work: RemoteWork

    @property
    def where(self) -> QualifiedDevice:
        return parse_qualified(self.device)


@dataclass(frozen=True)
class PartResult:
    """How a device's part of a run ended: ``status`` done, failed or cancelled; ``value`` what its work returned."""

    device: str
    status: str
    reason: str | None = None
    value: Any = None


class ClusterInterface(abc.ABC):
    """What the driver needs of a cluster: start a device's stream, wait on all, take a batch, stop one."""

    @abc.abstractmethod
    def start(self, part: Part) -> Any:
        """Start the part's work on its device; returns a handle. Raises ClusterError when it cannot start there."""

    @abc.abstractmethod
    def wait(self, handles: list[Any], timeout_s: float) -> list[Any]:
        """The handles with a batch (or their end) to take, waiting at most ``timeout_s`` for one."""

    @abc.abstractmethod
    def take(self, handle: Any) -> Batch | None:
        """The next batch of a ready handle; None when its stream ended. Raises NodeLostError when its node is gone."""

    @abc.abstractmethod
    def stop(self, handle: Any) -> None:
        """End the work of a handle at once (its process is killed); never raises."""

    def lost(self, handles: list[Any]) -> dict[int, str]:
        """The handles (by ``id``) whose node the cluster has declared dead, with why; checked every few seconds.

        A second way to notice a lost node, for a worker that outlives its node's
        death for a while and so keeps its stream open.
        """
        return {}


class StoringSink:
    """The driver's side of the streams: each call replayed on the kind's sink, records deduplicated by id.

    ``record_keys`` maps each record method (``add_trial``, ``add_result``) to the function
    giving a call's id; ``stored`` holds the ids the database has already (read when the
    run starts; this process is the database's only writer, so it stays true as it adds).
    A call's dicts are rewritten from the node's own names to the cluster's (``device``
    to ``nodeA/cpu``, ``host`` to ``nodeA``) first.
    """

    def __init__(self, target: Any, record_keys: dict[str, Callable[..., Any]], stored: Iterable[Any] = ()) -> None:
        self.target = target
        self.record_keys = record_keys
        self.stored = set(stored)
        self.skipped = 0
        self.stored_now = 0

    def deliver(self, part: Part, call: SinkCall) -> bool:
        """Hand one call to the target; False when it was a record already stored (skipped)."""
        call = qualify(call, part.work, part.where)
        key_of = self.record_keys.get(call.method)
        key = key_of(*call.args, **call.kwargs) if key_of else None
        if key is not None and key in self.stored:
            self.skipped += 1
            return False
        getattr(self.target, call.method)(*call.args, **call.kwargs)
        if key is not None:
            self.stored.add(key)
            self.stored_now += 1
        return True


def qualify(call: SinkCall, work: RemoteWork, where: QualifiedDevice) -> SinkCall:
    """The call with every dict argument's ``device`` (the node's own name for it) and ``host`` put in cluster terms."""
    local = getattr(work, "device", where.device)

    def fix(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        fixed = dict(value)
        if fixed.get("device") == local:
            fixed["device"] = str(where)
        if "host" in fixed:
            fixed["host"] = where.node
        return fixed

    return SinkCall(call.method, tuple(fix(a) for a in call.args), {k: fix(v) for k, v in call.kwargs.items()})


def drive(cluster: ClusterInterface, parts: list[Part], deliver: Callable[[Part, SinkCall], Any], *,
          stop_requested: Callable[[], bool] = lambda: False,
          on_end: Callable[[PartResult], None] = lambda result: None,
          progress: Callable[[str], None] = lambda line: None,
          poll_s: float = POLL_S, stall_s: float = STALL_S, start_s: float = START_S,
          liveness_s: float = LIVENESS_S, clock: Callable[[], float] = time.monotonic) -> dict[str, PartResult]:
    """Run every part on its device until each has ended; returns each device's result.

    ``on_end`` hears of each part as it ends (the driver marks a lost device failed at once).
    With ``stop_requested`` true, every running part is stopped and ends cancelled.
    """
    streams = _Streams(cluster, on_end, progress, clock)
    for part in parts:
        streams.start(part)
    checked = clock()
    while streams.running:
        if stop_requested():
            streams.stop_all()
            break
        for handle in cluster.wait(streams.handles(), poll_s):
            streams.take(handle, deliver)
        if streams.running and clock() - checked >= liveness_s:
            checked = clock()
            for key, why in cluster.lost(streams.handles()).items():
                streams.drop(key, why)
        streams.drop_silent(stall_s, start_s)
    return streams.results


class _Streams:
    """The parts of one :func:`drive`: those still running (by their handle's ``id``), when each
    last sent anything, which have sent their first batch, and how the ended ones ended."""

    def __init__(self, cluster: ClusterInterface, on_end: Callable[[PartResult], None],
                 progress: Callable[[str], None], clock: Callable[[], float]) -> None:
        self.cluster, self.on_end, self.progress, self.clock = cluster, on_end, progress, clock
        self.results: dict[str, PartResult] = {}
        self.running: dict[int, tuple[Part, Any]] = {}
        self.heard: dict[int, float] = {}  # when each part last sent anything
        self.started: set[int] = set()  # the parts that sent their first batch

    def handles(self) -> list[Any]:
        return [handle for _, handle in self.running.values()]

    def end(self, part: Part, status: str, reason: str | None = None, value: Any = None) -> None:
        result = PartResult(part.device, status, reason, value)
        self.results[part.device] = result
        self.progress(f"{part.device}: {status}" + (f": {reason}" if reason and status != "cancelled" else ""))
        self.on_end(result)

    def start(self, part: Part) -> None:
        try:
            handle = self.cluster.start(part)
        except ClusterError as exc:
            self.end(part, "failed", f"{part.device}: {exc}")
            return
        self.running[id(handle)] = (part, handle)
        self.heard[id(handle)] = self.clock()

    def stop_all(self) -> None:
        """A stop request: every running part stopped, and ended cancelled."""
        for part, handle in self.running.values():
            self.cluster.stop(handle)
            self.end(part, "cancelled", "cancelled")
        self.running.clear()

    def drop(self, key: int, why: str) -> None:
        """A running part stopped, and ended failed with why."""
        part, handle = self.running.pop(key)
        self.cluster.stop(handle)
        self.end(part, "failed", f"{part.device}: {why}")

    def take(self, handle: Any, deliver: Callable[[Part, SinkCall], Any]) -> None:
        """A ready part's next batch: its calls delivered, its progress passed on, its end recorded."""
        part, _ = self.running[id(handle)]
        self.heard[id(handle)] = self.clock()
        self.started.add(id(handle))
        try:
            batch = self.cluster.take(handle)
        except NodeLostError as exc:
            self.drop(id(handle), str(exc))
            return
        if batch is None:  # the stream ended without saying how
            del self.running[id(handle)]
            self.end(part, "failed", f"{part.device}: its work ended without reporting how")
            return
        for call in batch.calls:
            deliver(part, call)
        local = getattr(part.work, "device", None)
        for line in batch.progress:
            self.progress(f"{part.device}: {line.removeprefix(f'{local}: ') if local else line}")
        if batch.end is not None:
            self.cluster.stop(handle)  # the model's memory on the node is freed now, not when the run ends
            del self.running[id(handle)]
            self.end(part, *_ended(part, batch.end))

    def drop_silent(self, stall_s: float, start_s: float) -> None:
        """Stop the parts that went quiet (``stall_s``) or never started (``start_s``)."""
        clock = self.clock
        for key, (part, _) in list(self.running.items()):
            if key in self.started and clock() - self.heard[key] > stall_s:
                why = f"no word from node {part.where.node} for {stall_s:g} s (frozen, or its network is gone)"
            elif key not in self.started and clock() - self.heard[key] > start_s:
                why = (f"node {part.where.node} did not start the work within {start_s:g} s (another run may hold "
                       "the device, or the node is overloaded)")
            else:
                continue
            self.drop(key, f"{why}; its work there was stopped")


def _ended(part: Part, end: End) -> tuple[str, str | None, Any]:
    if end.status == "failed":
        return "failed", f"{part.device}: {end.reason}", None
    return end.status, end.reason, end.value
