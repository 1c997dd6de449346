"""The Ray side: the actor that works on one device of a node, the node probe, and :class:`RayCluster`.

Importing this module imports Ray; only the cluster path does (the driver process, the
inventory). Choices, each from a measured reason (the spike report):
- an actor per device, pinned by ``label_selector={"joule/node": node}`` plus the
  device's own resource of capacity 1 (exclusive), never by node id (a node that
  rejoins has a new one);
- ``max_restarts=0, max_task_retries=0``: Ray would re-run a stream from its start and
  silently drop the items whose *index* it has, whatever their content; the driver
  resumes by id instead;
- ``num_cpus=0``: the device resource is what the actor holds; Ray then sets
  ``OMP_NUM_THREADS=1`` in the actor, so the actor sets the threads the local worker
  gets (half the node's logical CPUs, :func:`engine.backends.base.thread_counts`) and
  passive waiting before any library loads;
- cancel kills the actor (a generate call in flight would run to its end otherwise).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from engine.cluster.errors import NodeLostError, NodeUnavailableError
from engine.cluster.facts import node_facts
from engine.cluster.naming import NODE_LABEL, QualifiedDevice
from engine.cluster.protocol import FLUSH_S, HEARTBEAT_S, MAX_CALLS, Batch, End, RemoteWork, stream_work
from engine.cluster.scheduler import ClusterInterface, Part

#: Seconds to wait for one batch once Ray said it is there, and for a probe's answer.
GET_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 20.0


def worker_threads() -> int:
    """The inference threads a local worker gets by default: half this host's logical CPUs (at least 1)."""
    from engine.backends.base import thread_counts

    return thread_counts({})[0]


def prepare_process() -> None:
    """In a fresh actor process, before torch or llama_cpp load: the local worker's threads, waiting passively."""
    os.environ["OMP_NUM_THREADS"] = str(worker_threads())
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:  # loaded already (it read the variables then): set what can still be set
        sys.modules["torch"].set_num_threads(worker_threads())


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class DeviceActor:
    """Works on one device of one node: checks the model files are there, then streams the work's records."""

    def __init__(self, node: str, device: str) -> None:
        prepare_process()
        self.node, self.device = node, device

    def run(self, work: RemoteWork, max_calls: int = MAX_CALLS, flush_s: float = FLUSH_S,
            heartbeat_s: float = HEARTBEAT_S) -> Iterator[Batch]:
        from engine.cluster.work import missing_model_files  # the measuring code: loaded with the work, not the probe

        missing = missing_model_files(work, self.node)
        if missing is not None:
            yield Batch(end=End("failed", reason=missing))
            return
        yield from stream_work(work, max_calls=max_calls, flush_s=flush_s, heartbeat_s=heartbeat_s)

    def threads(self) -> dict[str, Any]:
        """What the inference libraries will see (for tests and the log)."""
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "pid": os.getpid()}


@ray.remote(num_cpus=0, max_retries=0)
def probe_node(node: str) -> dict:
    """The node's devices and sensors, read on the node (facts too rich for labels)."""
    return node_facts(node).to_dict()


@dataclass
class _Stream:
    part: Part
    actor: Any
    generator: Any
    node_ids: frozenset[str]  # Ray's ids of the live nodes of its name when it started (a rejoin gets a new one)


def alive_nodes(records: list[dict] | None = None) -> dict[str, dict]:
    """The live Joule nodes by name (from Ray's node records, read now when not given)."""
    records = ray.nodes() if records is None else records
    return {n["Labels"][NODE_LABEL]: n for n in records if n.get("Alive") and NODE_LABEL in (n.get("Labels") or {})}


def check_device_there(where: QualifiedDevice, nodes: dict[str, dict] | None = None) -> None:
    """NodeUnavailableError unless the node is in the cluster now and has the device."""
    nodes = alive_nodes() if nodes is None else nodes
    node = nodes.get(where.node)
    if node is None:
        known = ", ".join(sorted(nodes)) or "none"
        raise NodeUnavailableError(f"node {where.node} is not in the cluster now (live nodes: {known}); start it "
                                   "again with the node agent, or resume on another node")
    if where.resource not in node.get("Resources", {}):
        raise NodeUnavailableError(f"node {where.node} has no device {where.device}")


class RayCluster(ClusterInterface):
    """The cluster the driver joined (:func:`engine.cluster.connection.connect` first)."""

    def __init__(self, *, max_calls: int = MAX_CALLS, flush_s: float = FLUSH_S,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.batching = {"max_calls": max_calls, "flush_s": flush_s, "heartbeat_s": heartbeat_s}

    def start(self, part: Part) -> _Stream:
        where = part.where
        records = ray.nodes()
        check_device_there(where, alive_nodes(records))
        actor = DeviceActor.options(label_selector=where.label_selector,
                                    resources={where.resource: 1}).remote(where.node, where.device)
        ids = frozenset(n["NodeID"] for n in records if n.get("Alive") and
                        (n.get("Labels") or {}).get(NODE_LABEL) == where.node)
        return _Stream(part, actor, actor.run.remote(part.work, **self.batching), ids)

    def lost(self, handles: list[_Stream]) -> dict[int, str]:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return {id(h): f"node {h.part.where.node} was declared dead by the cluster (it missed its health checks)"
                for h in handles if not h.node_ids & alive}

    def wait(self, handles: list[_Stream], timeout_s: float) -> list[_Stream]:
        by_generator = {id(h.generator): h for h in handles}
        generators = [h.generator for h in handles]
        ready, _ = ray.wait(generators, num_returns=1, timeout=timeout_s)
        if ready and len(generators) > 1:  # and whatever else is ready now
            ready, _ = ray.wait(generators, num_returns=len(generators), timeout=0)
        return [by_generator[id(g)] for g in ready]

    def take(self, handle: _Stream) -> Batch | None:
        node = handle.part.where.node
        try:
            reference = next(handle.generator)
            return ray.get(reference, timeout=GET_TIMEOUT_S)
        except StopIteration:
            return None
        except RayActorError as exc:
            raise NodeLostError(f"node {node} was lost ({type(exc).__name__}: {_first_line(exc)})") from None
        except GetTimeoutError:
            raise NodeLostError(f"node {node} did not hand over its results within {GET_TIMEOUT_S:g} s") from None
        except RayError as exc:
            raise NodeLostError(f"node {node} failed ({type(exc).__name__}: {_first_line(exc)})") from None

    def stop(self, handle: _Stream) -> None:
        try:
            ray.kill(handle.actor, no_restart=True)
        except Exception:  # noqa: BLE001 (already gone is fine)
            pass


def probe_nodes(names: list[str], timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, dict | str]:
    """Each live node's facts (a dict), or why it did not answer (a sentence); all probed at once."""
    references = {name: probe_node.options(label_selector={NODE_LABEL: name}).remote(name) for name in names}
    deadline = time.monotonic() + timeout_s
    out: dict[str, dict | str] = {}
    for name, reference in references.items():
        try:
            out[name] = ray.get(reference, timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            ray.cancel(reference, force=True)
            out[name] = f"node {name} did not answer within {timeout_s:g} s"
        except RayError as exc:
            out[name] = f"node {name} could not be probed ({type(exc).__name__}: {_first_line(exc)})"
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
