"""This host and its devices: the host's name, whether a device exists, and its lock file."""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from engine.backends.base import parse_device
from engine.errors import DeviceUnavailableError, PlannerError
from engine.store import Store


def host_name() -> str:
    """This host's name, as stored with runs and measurements."""
    return socket.gethostname()


def check_device(device: str) -> str:
    """The device as stored (``cpu``, ``cuda:N``), or DeviceUnavailableError when this host has no such device.

    A cluster node's device (``nodeA/cuda:0``) is checked for its spelling and for a
    configured cluster here; whether the node has it is checked when its run starts there.
    """
    if "/" in str(device):
        return _check_cluster_device(device)
    spec = parse_device(device)
    if spec.kind == "cpu":
        return "cpu"
    from engine.energy.discovery import discover_sensors

    sensors = discover_sensors()
    gpus = [s for s in sensors if s.device.startswith("cuda:")]
    index = spec.index or 0
    if not gpus:
        reasons = "; ".join(s.detail for s in sensors if s.source.startswith("nvml"))
        raise DeviceUnavailableError(f"{device}: this host has no usable NVIDIA GPU ({reasons or 'NVML found none'}).")
    if index >= len(gpus):
        raise DeviceUnavailableError(f"{device}: this host has {len(gpus)} NVIDIA GPU(s), cuda:0 to cuda:{len(gpus) - 1}.")
    return f"cuda:{index}"


def _check_cluster_device(device: str) -> str:
    from engine.cluster.naming import parse_qualified
    from engine.runs.cluster import ADDRESS_ENV, cluster_address

    name = str(parse_qualified(device))
    if cluster_address() is None:
        raise DeviceUnavailableError(f"{name} is a device of a cluster node; set {ADDRESS_ENV} to the cluster's "
                                     "address (HOST:PORT of its head) to use it.")
    return name


@contextmanager
def device_lock(store: Store, device: str) -> Iterator[None]:
    """Hold the lock file of a device while a run uses it (the OS releases it if the process dies).

    The database's row says a device is busy; the lock makes sure of it even when two
    processes read that row at the same moment.
    """
    folder = store.path.resolve().parent / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / f"{host_name()}-{device.replace(':', '_').replace('/', '__')}.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PlannerError(f"another run holds {device} on this host; two runs on one device would measure "
                           "each other") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
