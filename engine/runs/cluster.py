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

#: The settings table's key for the address saved on the Home page.
SETTING_KEY = "cluster_address"

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


def saved_address(store: Store) -> str | None:
    """The cluster address saved in the database (the Home page's setting), or None."""
    row = store.query_one("SELECT value FROM settings WHERE key = ?", [SETTING_KEY])
    return row[0] if row and row[0] else None


def save_address(store: Store, address: str | None) -> str | None:
    """Save the cluster address (checked: ``HOST[:PORT]``, port 6379 when left out), or clear it with None or ''.

    Returns the address as saved. Raises ClusterConfigError when it is not an address.
    """
    text = (address or "").strip()
    if not text:
        store.execute("DELETE FROM settings WHERE key = ?", [SETTING_KEY])
        return None
    from engine.cluster.connection import parse_address  # no Ray: parsing only

    saved = str(parse_address(text))
    store.execute("INSERT OR REPLACE INTO settings (key, value, updated_at) VALUES (?, ?, current_timestamp)",
                  [SETTING_KEY, saved])
    return saved


def configured_address(store: Store) -> tuple[str | None, str | None]:
    """The cluster this installation uses, and where that came from: ``$PLANNER_RAY_ADDRESS`` wins over the
    address saved in the database; ``(None, None)`` without a cluster."""
    from_env = os.environ.get(ADDRESS_ENV, "").strip()
    if from_env:
        return from_env, ADDRESS_ENV
    saved = saved_address(store)
    return (saved, "the saved setting") if saved else (None, None)


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
