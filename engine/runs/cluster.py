"""Runs on a Ray cluster: which address, and the launcher that starts their driver.

A run whose devices are cluster devices (``nodeA/cuda:0``) is driven by a process on
this host, ``python -m engine.cluster.driver [--ray-address A] --db PATH --job ID``: it
joins the cluster, starts one pinned actor per device, and stores what they stream back.
It is a local worker process like any other (own session, log beside the database,
recognised by its command line), so the lifecycle treats it as one: stopping it stops its
actors too (Ray ends the work a driver owns when the driver goes). A run on this host's
own devices still starts the local worker, cluster or not.

Nothing here imports Ray; :mod:`engine.cluster` does, in the driver process.
"""

from __future__ import annotations

import os
import subprocess

from engine.runs.kinds import RunKind
from engine.runs.local import LocalProcessLauncher, is_process_of, spawn, worker_log_path
from engine.store import Store

#: The environment variable that names the cluster (the head's HOST:PORT).
ADDRESS_ENV = "PLANNER_RAY_ADDRESS"
DRIVER_MODULE = "engine.cluster.driver"

_address_override: str | None = None


def use_cluster(address: str | None) -> None:
    """Set the cluster address for this process (the CLI's ``--ray-address``); None goes back to the environment."""
    global _address_override
    _address_override = address.strip() if address and address.strip() else None


def cluster_address(explicit: str | None = None) -> str | None:
    """The cluster's address: ``explicit``, else the one set by :func:`use_cluster`, else ``$PLANNER_RAY_ADDRESS``."""
    for value in (explicit, _address_override, os.environ.get(ADDRESS_ENV)):
        if value and value.strip():
            return value.strip()
    return None


def run_devices(store: Store, kind: RunKind, run_id: int) -> list[str]:
    """The devices a run uses, as its row names them."""
    row = store.query_one(f"SELECT {kind.devices_sql} FROM {kind.table} WHERE id = ?", [int(run_id)])
    return [str(device) for device in (row[0] if row and row[0] is not None else [])]


class RayLauncher(LocalProcessLauncher):
    """Runs on cluster devices are driven by a local driver process; the others start as before.

    It extends the local launcher because the driver is a local worker process: stopping
    and finding it work the same way.
    """

    def __init__(self, address: str) -> None:
        self.address = address

    def start(self, kind: RunKind, store: Store, run_id: int) -> subprocess.Popen:
        from engine.cluster.naming import is_qualified

        if not any(is_qualified(device) for device in run_devices(store, kind, run_id)):
            return super().start(kind, store, run_id)
        arguments = ["--ray-address", self.address, "--db", str(store.path.resolve()), kind.id_flag, str(run_id)]
        return spawn(DRIVER_MODULE, arguments, worker_log_path(store, kind, run_id))

    def is_alive(self, kind: RunKind, run_id: int, pid: int | None) -> bool:
        return is_process_of(pid, DRIVER_MODULE, [kind.id_flag, str(run_id)]) or super().is_alive(kind, run_id, pid)
