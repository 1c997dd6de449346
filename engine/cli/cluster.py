"""The cluster's part of the command line: the option every subcommand takes, and its subcommands.

- ``--ray-address HOST:PORT`` (before or after the subcommand): the cluster to use; without
  it, ``$PLANNER_RAY_ADDRESS``, else the address saved on the Home page (for the commands
  that start or follow runs, and ``nodes``); without any, everything runs on this host;
- ``node start ...``: this host joins the cluster (or starts its head) as a node with its
  devices, through the node agent (:mod:`engine.cluster.agent`);
- ``nodes [--json] [--no-probe]``: the cluster's nodes, their devices and sensors, alive or
  gone (:mod:`engine.cluster.inventory`, in a process of its own with a time limit);
- ``execute --resume ID --move NODE/DEVICE=NODE/DEVICE``: a failed device's queries go to
  another node's device of the same type (checked against the inventory) when resumed.

Nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from engine.cluster import inventory as cluster_inventory
from engine.cluster.agent import add_start_arguments
from engine.cluster.agent import start as agent_start
from engine.cluster.errors import ClusterConfigError
from engine.errors import InputError, Problem
from engine.runs.cluster import ADDRESS_ENV, cluster_address, saved_address, use_cluster
from engine.store import Store

#: The subcommands for which the address saved in the database counts (they start or follow runs, or list nodes).
USES_SAVED_ADDRESS = ("profile", "execute", "jobs", "status", "nodes")
NO_ADDRESS = Problem("--ray-address", "no cluster address is set", None,
                     f"the head's HOST:PORT, given here or in {ADDRESS_ENV} (or saved on the Home page)")


def add_address_option(parser: argparse.ArgumentParser) -> None:
    """``--ray-address`` on a parser every subcommand shares (suppressed by default, so it may come anywhere)."""
    parser.add_argument("--ray-address", metavar="HOST:PORT", default=argparse.SUPPRESS,
                        help=f"the Ray cluster's head (default ${ADDRESS_ENV}, else the address saved on the Home "
                             "page); without one, everything runs on this host")


def add_subcommands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``node start`` and ``nodes``."""
    node = sub.add_parser("node", help="make this host a node of the cluster (the node agent)")
    node_sub = node.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = node_sub.add_parser(
        "start", help="join the cluster (--address, default the cluster address) or start its head (--head), "
                      "this host's devices offered as Ray resources")
    add_start_arguments(start, address_required=False)
    start.set_defaults(handler=cmd_node_start)

    nodes = sub.add_parser("nodes", parents=[common], help="the cluster's nodes, their devices and sensors")
    nodes.add_argument("--json", action="store_true", help="print JSON")
    nodes.add_argument("--no-probe", action="store_true",
                       help="Ray's node table only (faster): no sensors, devices' models from their labels")
    nodes.set_defaults(handler=cmd_nodes)


def add_move_option(execute: argparse.ArgumentParser) -> None:
    execute.add_argument("--move", action="append", default=[], metavar="NODE/DEVICE=NODE/DEVICE",
                         help="with --resume: run what is left of a cluster device on another node's device of the "
                              "same type (repeatable; a device to itself undoes its move)")


def apply_address(args: argparse.Namespace) -> str | None:
    """Set this process's cluster from the arguments (or the saved setting); returns the address in use."""
    given = getattr(args, "ray_address", None)
    if given is not None:
        from engine.cluster.connection import parse_address

        try:
            parse_address(given)
        except ClusterConfigError as exc:
            raise InputError(Problem("--ray-address", str(exc))) from None
        use_cluster(given)
    elif not os.environ.get(ADDRESS_ENV, "").strip() and args.command in USES_SAVED_ADDRESS:
        use_cluster(saved_address(Store(getattr(args, "db", None))))
    return cluster_address()


def cmd_node_start(args: argparse.Namespace) -> int:
    """The node agent's ``start``, joining the cluster in use unless ``--address`` or ``--head`` says otherwise."""
    if not args.head and not args.address:
        args.address = cluster_address()
    return agent_start(args)


def cmd_nodes(args: argparse.Namespace) -> int:
    address = cluster_address()
    if not address:
        raise InputError(NO_ADDRESS)
    inventory = cluster_inventory.read_inventory_in_subprocess(address, probe=not args.no_probe)
    if args.json:
        print(json.dumps(asdict(inventory), indent=2))
    else:
        print("\n".join(cluster_inventory.describe(inventory)))
    return 0


def parse_moves(items: list[str]) -> dict[str, str]:
    """``--move A=B`` values as ``{A: B}``, or InputError naming each one that is not NODE/DEVICE=NODE/DEVICE."""
    from engine.cluster.naming import parse_qualified
    from engine.errors import DeviceUnavailableError

    moves, problems = {}, []
    for item in items:
        source, sep, target = item.partition("=")
        try:
            if not sep:
                raise DeviceUnavailableError(f"{item!r} is not of the form NODE/DEVICE=NODE/DEVICE")
            moves[str(parse_qualified(source))] = str(parse_qualified(target))
        except DeviceUnavailableError as exc:
            problems.append(Problem("--move", str(exc).rstrip("."), None, "NODE/DEVICE=NODE/DEVICE, e.g. "
                                    "nodeB/cpu=nodeC/cpu"))
    if problems:
        raise InputError(problems)
    return moves


def move_before_resume(store: Store, execution_id: int, items: list[str]) -> dict[str, str]:
    """``execute --resume ID --move ...``: check each move against the cluster's inventory and keep it.

    Returns the execution's placement after the moves.
    """
    from engine.cluster.runstate import apply_moves

    moves = parse_moves(items)
    address = cluster_address()
    if not address:
        raise InputError(NO_ADDRESS)
    inventory = cluster_inventory.read_inventory_in_subprocess(address, probe=False)
    placement = apply_moves(store, execution_id, moves, same_type=inventory.same_type)
    for device, to in sorted(placement.items()):
        print(f"{device}: what is left runs on {to}", file=sys.stderr)
    return placement
