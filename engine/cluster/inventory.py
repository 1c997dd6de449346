"""The cluster's nodes, their devices and sensors, alive or gone: what Home lists.

Two sources, merged:
- Ray's node table (``ray.nodes()``): every node that joined, alive or not, with the
  labels and resources our node agent started it with (a node that left stays there,
  dead; one that rejoins appears again under a new id and the same name);
- a probe of each live node, run on it (:func:`engine.cluster.remote.probe_node`): the
  facts too rich for labels (the GPU's full name, memory, which sensors exist and why not).

:func:`nodes_from_records` is pure (tests feed it records); :func:`read_inventory` joins
the cluster and asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.cluster.facts import NodeFacts
from engine.cluster.naming import NODE_LABEL, device_from_label, device_from_resource, format_qualified, label_value
from engine.energy.discovery import SensorStatus
from engine.errors import DeviceUnavailableError

LABEL_PREFIX = "joule/"


@dataclass(frozen=True)
class ClusterDevice:
    """A device of a node: ``name`` host-qualified (``nodeA/cuda:0``), ``device`` as the node names it, its
    ``model`` (the CPU's or GPU's name; from the label, with '-' for spaces, when the node did not answer) and memory."""

    name: str
    device: str
    kind: str
    model: str
    memory_bytes: int | None = None


@dataclass(frozen=True)
class ClusterNode:
    """A node as the cluster knows it.

    ``alive`` is false for a node that left (its devices are those it had); ``joule`` is
    false for a node not started by our agent (it offers no devices); ``note`` says why
    something is missing (left, not probed, not ours).
    """

    name: str
    alive: bool
    address: str | None
    joule: bool
    devices: tuple[ClusterDevice, ...] = ()
    sensors: tuple[SensorStatus, ...] = ()
    note: str | None = None

    @property
    def status(self) -> str:
        return "alive" if self.alive else "left"


@dataclass(frozen=True)
class ClusterInventory:
    """Every node of the cluster at ``head``, live ones first, by name."""

    head: str
    nodes: tuple[ClusterNode, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterInventory":
        """The inverse of ``dataclasses.asdict`` (what ``--json`` prints)."""
        nodes = tuple(ClusterNode(**{**n, "devices": tuple(ClusterDevice(**d) for d in n.get("devices", ())),
                                     "sensors": tuple(SensorStatus(**x) for x in n.get("sensors", ()))})
                      for n in data.get("nodes", ()))
        return cls(str(data["head"]), nodes)

    def live_devices(self) -> list[ClusterDevice]:
        """The devices of the nodes alive now, node by node."""
        return [d for n in self.nodes if n.alive for d in n.devices]

    def node(self, name: str) -> ClusterNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def device(self, name: str) -> ClusterDevice | None:
        return next((d for n in self.nodes for d in n.devices if d.name == name), None)

    def same_type(self, planned: str, candidate: str) -> str | None:
        """Why ``candidate`` cannot stand in for ``planned`` (another model, gone, not live), or None when it can."""
        a, b = self.device(planned), self.device(candidate)
        node = self.node(candidate.partition("/")[0])
        if b is None or node is None:
            return f"the cluster has no device {candidate}"
        if not node.alive:
            return f"node {node.name} has left the cluster"
        if a is None:
            return f"the cluster does not know {planned}'s type"
        if a.kind != b.kind or label_value(a.model) != label_value(b.model):  # labels hold models in label spelling
            return f"{planned} is a {a.model}, {candidate} a {b.model}"
        return None


def nodes_from_records(records: list[dict], facts: dict[str, NodeFacts | str] | None = None) -> list[ClusterNode]:
    """The nodes of Ray's node table (one per name: its live record, else its latest), with each node's facts.

    ``facts`` maps a node's name to what its probe returned, or to why it did not answer.
    """
    facts = facts or {}
    by_name: dict[str, list[dict]] = {}
    for record in records:
        labels = record.get("Labels") or {}
        name = labels.get(NODE_LABEL) or record.get("NodeName") or record.get("NodeManagerAddress") or "?"
        by_name.setdefault(name, []).append(record)
    nodes = []
    for name, group in by_name.items():
        live = [r for r in group if r.get("Alive")]
        record = live[0] if live else group[-1]
        labels = record.get("Labels") or {}
        joule = NODE_LABEL in labels
        devices = _devices(name, record) if joule else ()
        note = None if joule else "not started by the node agent: it offers no devices"
        sensors: tuple[SensorStatus, ...] = ()
        found = facts.get(name)
        if isinstance(found, NodeFacts):
            seen = {d.device: d for d in found.devices}  # the node's own words, where it still sees the device
            devices = tuple(replace(d, model=seen[d.device].model, memory_bytes=seen[d.device].memory_bytes)
                            if d.device in seen else d for d in devices)
            sensors = found.sensors
        elif isinstance(found, str):
            note = found
        if not live:
            note = "left the cluster" + (f" ({_death(record)})" if _death(record) else "")
        nodes.append(ClusterNode(name, bool(live), record.get("NodeManagerAddress"), joule, devices, sensors, note))
    return sorted(nodes, key=lambda n: (not n.alive, n.name))


def _devices(node: str, record: dict) -> tuple[ClusterDevice, ...]:
    """The node's devices from its resources (live) or its labels (also when it left), models from the labels."""
    labels = record.get("Labels") or {}
    names: dict[str, str] = {}
    for key, value in labels.items():
        if key.startswith(LABEL_PREFIX) and key != NODE_LABEL:
            try:
                names[device_from_label(key[len(LABEL_PREFIX):])] = value
            except DeviceUnavailableError:
                continue
    for resource in (record.get("Resources") or {}):
        device = device_from_resource(node, resource)
        if device is not None:
            names.setdefault(device, "unknown")
    return tuple(ClusterDevice(format_qualified(node, device), device, "cpu" if device == "cpu" else "gpu", model)
                 for device, model in sorted(names.items(), key=lambda item: (item[0] != "cpu", item[0])))


def _death(record: dict) -> str | None:
    for key in ("DeathReasonMessage", "StateMessage"):
        if record.get(key):
            return str(record[key]).splitlines()[0]
    return None


def read_inventory(address: str | None = None, *, probe: bool = True) -> ClusterInventory:
    """Join the cluster (if this process has not) and list its nodes; with ``probe``, ask each live node for its facts."""
    from engine.cluster.connection import connect

    head = connect(address)
    import ray

    from engine.cluster.remote import probe_nodes

    records = ray.nodes()
    facts: dict[str, NodeFacts | str] = {}
    if probe:
        live = sorted({(r.get("Labels") or {}).get(NODE_LABEL) for r in records if r.get("Alive")} - {None})
        for name, answer in probe_nodes(live).items():
            facts[name] = NodeFacts.from_dict(answer) if isinstance(answer, dict) else answer
    return ClusterInventory(str(head), tuple(nodes_from_records(records, facts)))


#: Seconds the inventory's process may take (joining, and each live node's probe: 20 s at most).
SUBPROCESS_TIMEOUT_S = 60.0


def read_inventory_in_subprocess(address: str, *, probe: bool = True,
                                 timeout_s: float = SUBPROCESS_TIMEOUT_S) -> ClusterInventory:
    """:func:`read_inventory` run in a process of its own (``python -m engine.cluster.inventory --json``).

    For the app and the CLI: Ray's driver, its signal handlers and any hang stay out of
    the caller's process, and the answer comes within ``timeout_s`` or as an error in
    words (ClusterUnreachableError); the process and its children are then killed.
    """
    import json
    import os
    import signal
    import subprocess
    import sys

    from engine.cluster.errors import ClusterError, ClusterUnreachableError
    from engine.paths import PROJECT_ROOT

    command = [sys.executable, "-m", "engine.cluster.inventory", "--address", address, "--json"]
    process = subprocess.Popen(command + ([] if probe else ["--no-probe"]), cwd=PROJECT_ROOT, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
        raise ClusterUnreachableError(f"the cluster at {address} did not list its nodes within {timeout_s:g} s") from None
    if process.returncode != 0:
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        said = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")), None)
        raise ClusterError(said or f"listing the cluster's nodes failed (exit {process.returncode}): "
                                   f"{lines[-1] if lines else 'no message'}")
    try:
        return ClusterInventory.from_dict(json.loads(out))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"the cluster's node list could not be read ({type(exc).__name__}: {exc})") from None


def inventory_tables(inventory: ClusterInventory):
    """The inventory as three tables for a page: nodes (``node, status, devices, note``), devices (``device, node,
    status, model, memory_gib``) and sensors (``node, source, device, status, detail``). pandas DataFrames."""
    import pandas as pd

    nodes = pd.DataFrame([{"node": n.name, "status": n.status, "devices": len(n.devices),
                           "note": n.note or ("" if n.devices else "offers no devices")}
                          for n in inventory.nodes], columns=["node", "status", "devices", "note"])
    devices = pd.DataFrame([{"device": d.name, "node": n.name, "status": n.status, "model": d.model,
                             "memory_gib": None if d.memory_bytes is None else round(d.memory_bytes / 2**30, 1)}
                            for n in inventory.nodes for d in n.devices],
                           columns=["device", "node", "status", "model", "memory_gib"])
    sensors = pd.DataFrame([{"node": n.name, "source": x.source, "device": x.device, "status": x.status,
                             "detail": x.detail} for n in inventory.nodes for x in n.sensors],
                           columns=["node", "source", "device", "status", "detail"])
    return nodes, devices, sensors


def describe(inventory: ClusterInventory) -> list[str]:
    """The inventory in lines of text: each node, its state, its devices and its sensors."""
    lines = [f"cluster at {inventory.head}: {sum(n.alive for n in inventory.nodes)} of {len(inventory.nodes)} "
             "nodes alive"]
    for node in inventory.nodes:
        lines.append(f"{node.name} ({node.status}{', ' + node.note if node.note else ''})")
        for device in node.devices:
            memory = f", {device.memory_bytes / 2**30:.0f} GiB" if device.memory_bytes else ""
            lines.append(f"    {device.name}: {device.model}{memory}")
        for sensor in node.sensors:
            lines.append(f"    sensor {sensor.source} ({sensor.device}): {sensor.status}: {sensor.detail}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.cluster.inventory [--address HOST:PORT] [--json]``: list the cluster's nodes."""
    import argparse
    import json
    import sys
    from dataclasses import asdict

    from engine.errors import PlannerError

    parser = argparse.ArgumentParser(prog="python -m engine.cluster.inventory",
                                     description="The cluster's nodes, their devices and sensors, alive or gone.")
    parser.add_argument("--address", help="the head's HOST:PORT (default: $PLANNER_RAY_ADDRESS)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-probe", action="store_true",
                        help="only Ray's node table (faster): devices' models from their labels, no sensors")
    args = parser.parse_args(argv)
    try:
        inventory = read_inventory(args.address, probe=not args.no_probe)
    except PlannerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(inventory), indent=2) if args.json else "\n".join(describe(inventory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
