"""The cluster as the pages show it: the address in use, and its nodes, read off the script thread.

- :func:`cluster_in_use`: the address this installation uses (``PLANNER_RAY_ADDRESS`` wins
  over the one saved on the Home page), set for this process so that runs on a node's
  device (``nodeA/cpu``) start through the cluster;
- :func:`node_list`: the cluster's nodes, devices and sensors, as this session last read
  them. Reading joins the cluster, which can take seconds (or hang on a bad network), so
  it runs in a process of its own with a time limit
  (:func:`engine.cluster.inventory.read_inventory_in_subprocess`), started from a
  background task (:mod:`ui.background`): the page never waits for it. A list older than
  :data:`STALE_S` is read again; :func:`show_reading` shows that it is being read.
"""

from __future__ import annotations

import time

import streamlit as st

from engine.cluster import inventory as cluster_inventory
from engine.cluster.inventory import ClusterInventory
from engine.runs.cluster import configured_address, use_cluster
from engine.store import Store
from ui import background

SLOT = "cluster_nodes"
_KEPT = "_cluster_node_list"  # (address, inventory or the error, when it was read)
#: Seconds a node list is shown before it is read again.
STALE_S = 60.0


def cluster_in_use(store: Store) -> tuple[str | None, str | None]:
    """The cluster address in use and where it comes from (``PLANNER_RAY_ADDRESS`` or the saved setting), set
    for this process; ``(None, None)`` on a single host."""
    address, source = configured_address(store)
    use_cluster(address)
    return address, source


def _read(address: str, progress: background.TaskProgress) -> ClusterInventory:
    progress.report(f"asking the cluster at {address} for its nodes")
    return cluster_inventory.read_inventory_in_subprocess(address)


def node_list(address: str, *, refresh: bool = False) -> ClusterInventory | BaseException | None:
    """The node list of the cluster at ``address`` as last read in this session, or the error that reading it
    raised, or None before the first answer. Starts reading it in the background when there is none, it is
    older than :data:`STALE_S`, or ``refresh``."""
    outcome = background.take_outcome(SLOT)
    if outcome is not None:
        st.session_state[_KEPT] = (outcome.request, outcome.error if outcome.error else outcome.value, time.monotonic())
    kept = st.session_state.get(_KEPT)
    current = kept if kept is not None and kept[0] == address else None
    fresh = current is not None and time.monotonic() - current[2] < STALE_S
    reading = background.current(SLOT)
    if (refresh or not fresh) and (reading is None or reading.request != address):
        background.start(SLOT, "Reading the cluster's nodes", lambda progress: _read(address, progress),
                         request=address)
    return None if current is None else current[1]


def show_reading() -> None:
    """While the node list is being read: a line saying so (the page reruns when it arrives)."""
    background.show_progress(SLOT, stop_label="Stop waiting")


def live_devices(found: ClusterInventory | BaseException | None) -> list[str]:
    """The devices (``node/device``) of the nodes alive in a node list; none without one."""
    return [d.name for d in found.live_devices()] if isinstance(found, ClusterInventory) else []
