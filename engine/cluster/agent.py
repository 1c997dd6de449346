"""The node agent: start this host as a node of the cluster, its devices offered as Ray resources.

    python -m engine.cluster.agent start --address HEAD:6379 [--name NAME] [--dry-run] [-- RAY START OPTIONS]
    python -m engine.cluster.agent start --head [--port 6379] [--name NAME] ...

It reads this host's devices (cpu; cuda:N through NVML) and runs ``ray start`` with:
- ``--node-name NAME`` and the label ``joule/node=NAME`` (work is pinned by it; the name
  is stable across restarts, Ray's node id is not);
- one label per device, ``joule/cpu=<CPU model>``, ``joule/cuda-0=<GPU model>`` (a
  node's devices are known even after it left);
- one resource of capacity 1 per device, ``joule_dev_NAME_cuda-0`` (one run per device).
It prints the command first (``--dry-run`` prints only). Token authentication is
required: ``RAY_AUTH_MODE=token`` and the cluster's token (see the README). The node's
workers import the project from this checkout (``PYTHONPATH``), so start it from the
same version of Joule Planner as the app's host.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from engine.cluster.connection import check_token
from engine.cluster.errors import ClusterConfigError, ClusterError
from engine.cluster.facts import DeviceFacts, detect_devices
from engine.cluster.naming import NODE_LABEL, QualifiedDevice, check_node_name, label_value
from engine.errors import PlannerError
from engine.paths import PROJECT_ROOT


def default_node_name() -> str:
    """This host's name, made a valid node name."""
    return label_value(socket.gethostname().split(".")[0], fallback="node")


def node_labels(name: str, devices: tuple[DeviceFacts, ...]) -> dict[str, str]:
    """The node's labels: its name, and each device's model."""
    labels = {NODE_LABEL: name}
    for device in devices:
        labels[f"joule/{QualifiedDevice(name, device.device).device_label}"] = label_value(device.model)
    return labels


def node_resources(name: str, devices: tuple[DeviceFacts, ...]) -> dict[str, float]:
    """One resource of capacity 1 per device."""
    return {QualifiedDevice(name, device.device).resource: 1 for device in devices}


def ray_executable() -> str:
    """The ``ray`` command of this Python environment."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise PlannerError("the `ray` command is not installed in this environment: pip install -r requirements.txt")
    return found


def start_command(name: str, devices: tuple[DeviceFacts, ...], *, address: str | None, head_port: int | None,
                  extra: list[str]) -> list[str]:
    """The ``ray start`` command line for this node."""
    labels = ",".join(f"{key}={value}" for key, value in node_labels(name, devices).items())
    where = ["--head", "--port", str(head_port)] if address is None else ["--address", address]
    return [ray_executable(), "start", *where, "--node-name", name, "--labels", labels,
            "--resources", json.dumps(node_resources(name, devices), separators=(",", ":")), *extra]


def node_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``ray start`` runs with: workers find this checkout; no usage reports."""
    out = dict(os.environ if env is None else env)
    paths = [str(PROJECT_ROOT)] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    out.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return out


def add_start_arguments(start: argparse.ArgumentParser, *, address_required: bool = True) -> None:
    """The options of ``start`` (here and in ``python -m engine node start``)."""
    target = start.add_mutually_exclusive_group(required=address_required)
    target.add_argument("--address", help="the head's HOST:PORT")
    target.add_argument("--head", action="store_true", help="start the cluster's head here")
    start.add_argument("--port", type=int, default=6379, help="the head's port (with --head)")
    start.add_argument("--name", default=None, help="this node's name (default: the host name)")
    start.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    start.add_argument("ray_options", nargs=argparse.REMAINDER,
                       help="after --: more `ray start` options (ports, --node-ip-address, --num-cpus, ...)")


def start(args: argparse.Namespace) -> int:
    """Print the ``ray start`` command for this node's devices and run it (not with ``--dry-run``).

    ``args`` as :func:`add_start_arguments` defines them; exit 2 with a sentence on bad
    input (no token, a bad name, neither an address nor ``--head``).
    """
    extra = [a for a in args.ray_options if a != "--"]
    try:
        if not args.head and not args.address:
            raise ClusterConfigError("give the head's address (--address HOST:PORT, or a cluster address) or --head "
                                     "to start the head here")
        name = check_node_name(args.name or default_node_name())
        check_token()
        devices = detect_devices()
        command = start_command(name, devices, address=None if args.head else args.address,
                                head_port=args.port if args.head else None, extra=extra)
    except (ClusterError, PlannerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for device in devices:
        memory = f", {device.memory_gib:.0f} GiB" if device.memory_gib is not None else ""
        print(f"{name}/{device.device}: {device.model}{memory}")
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(command, env=node_environment(), cwd=PROJECT_ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    """``start``: see :func:`start`."""
    parser = argparse.ArgumentParser(prog="python -m engine.cluster.agent",
                                     description="Start this host as a node of a Joule Planner cluster.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_start_arguments(commands.add_parser("start", help="join a cluster (or start its head) with this host's devices"))
    return start(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
