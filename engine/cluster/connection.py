"""Joining a Ray cluster as a driver: every way it can hang or fail, turned into a bounded wait and a sentence.

    from engine.cluster.connection import connect
    connect("10.0.0.5:6379")          # or None: PLANNER_RAY_ADDRESS

What Ray 2.60 does by itself, and what this module does about it (see the spike report,
``/work/tools/ray_spike.md`` while it exists, and the README's "Running on a cluster"):
- a wrong or missing token surfaces as a plain ``ConnectionError`` after ~20 s, its cause
  (``InvalidAuthToken``) buried in ``__cause__``: we require ``RAY_AUTH_MODE=token`` and a
  token before trying, and turn a refusal into "the cluster refused our token";
- an unreachable head makes ``ray.init`` retry for minutes, deaf to SIGTERM: a TCP
  connect with a timeout comes first, and ``ray.init`` runs in a thread we stop waiting for;
- a driver needs a Ray node on its own host (a raylet to attach to), else it fails after
  60 s: we look for one first;
- a loopback address (a test cluster) is rewritten to the host's routable address, where
  nobody listens, unless Ray's "cluster" switch is off: we turn it off for loopback only;
- worker output is not copied to the driver (``log_to_driver=False``): it would fill the
  run's log with every node's messages.

``import ray`` happens here, on first use: the single-host app never pays for it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.cluster.errors import ClusterAuthError, ClusterConfigError, ClusterUnreachableError
from engine.runs.cluster import ADDRESS_ENV, cluster_address

DEFAULT_PORT = 6379
#: Seconds for the TCP check of the head, and for ray.init once the head answers.
CONNECT_TIMEOUT_S = 5.0
INIT_TIMEOUT_S = 30.0
#: Ray retries the GCS once a second this many times before it gives up (its default is 20).
GCS_RETRIES = "10"
NAMESPACE = "joule-planner"
TOKEN_HELP = ("export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<a file readable only by you (chmod 600) holding "
              "the cluster's token> (print it on the head with `ray get-auth-token`), as on every node")


@dataclass(frozen=True)
class HeadAddress:
    """Where the cluster's head (its GCS) listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> HeadAddress:
    """``host[:port]`` (port 6379 when left out), or ClusterConfigError saying what an address looks like."""
    value = str(text).strip()
    if value.startswith("ray://"):
        raise ClusterConfigError(f"{value}: Ray Client addresses (ray://) are not supported; give the head's "
                                 "HOST:PORT (its GCS port, 6379 by default) and make this host a node of the cluster")
    host, _, port = value.rpartition(":") if ":" in value else (value, "", str(DEFAULT_PORT))
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterConfigError(f"{value!r} is not a cluster address; expected HOST:PORT, e.g. 10.0.0.5:6379")
    return HeadAddress(host, int(port))


def check_token(env: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """Where our token comes from (for messages), or ClusterConfigError saying how to set it.

    We never connect without token authentication: a cluster without it runs any code
    anyone on the network sends it.
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        raise ClusterConfigError(f"connecting to a cluster needs token authentication: {TOKEN_HELP}")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        if not Path(path).expanduser().is_file():
            raise ClusterConfigError(f"RAY_AUTH_TOKEN_PATH names {path}, which is not a file; {TOKEN_HELP}")
        return path
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return str(default)
    raise ClusterConfigError(f"no cluster token found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or {default}); {TOKEN_HELP}")


def check_reachable(address: HeadAddress, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connect to the head, or ClusterUnreachableError in words within ``timeout_s``."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster's head at {address} ({why} within {timeout_s:g} s): is `ray start --head` "
            "running there, and is its port open to this host?") from None


def has_local_raylet() -> bool:
    """Whether a Ray node runs on this host (a driver attaches to one)."""
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "raylet":
            return True
    return False


def refusal_reason(exc: BaseException) -> str | None:
    """"the cluster refused our token" when the chain of ``exc`` holds Ray's InvalidAuthToken, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "InvalidAuthToken" in str(exc) or type(exc).__name__ == "AuthenticationError":
            return "the cluster refused our token"
        exc = exc.__cause__ or exc.__context__
    return None


def connect(address: str | None = None, *, timeout_s: float = INIT_TIMEOUT_S) -> HeadAddress:
    """Join the cluster at ``address`` (default ``PLANNER_RAY_ADDRESS``) as a driver; returns the head's address.

    Idempotent within a process. Raises ClusterConfigError (no address, no token, this
    host not a node), ClusterUnreachableError (the head does not answer in time) or
    ClusterAuthError (the cluster refused our token).
    """
    text = cluster_address(address)
    if not text:
        raise ClusterConfigError(f"no cluster address: set {ADDRESS_ENV}=HOST:PORT (the head's GCS port)")
    head = parse_address(text)
    check_token()
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return head
    check_reachable(head)  # before importing Ray: a wrong address costs seconds, not Ray's import
    os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", GCS_RETRIES)  # read when ray is imported
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not has_local_raylet():
        raise ClusterConfigError(
            f"this host is not a node of the cluster at {head}: run `ray start --address={head} --num-cpus=0` here "
            "first (with the same RAY_AUTH_MODE and token), so that the app can attach to it")
    if head.is_loopback:
        # Ray would rewrite 127.0.0.1 to this host's routable address, where a loopback-only
        # cluster does not listen (read at call time, so set after import).
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    _init_within(ray, str(head), timeout_s)
    return head


def _init_within(ray, address: str, timeout_s: float) -> None:
    """``ray.init`` in a thread, so that a hang (it can ignore signals) costs ``timeout_s``, not minutes."""
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING",
                     configure_logging=True)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 (handed to the caller below)
            outcome["error"] = exc

    thread = threading.Thread(target=init, daemon=True, name="ray-init")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ClusterUnreachableError(f"the Ray cluster at {address} answered the connection but did not let us in "
                                      f"within {timeout_s:g} s; check its logs (ray status on the head)")
    error = outcome.get("error")
    if error is None:
        return
    if refusal_reason(error):
        raise ClusterAuthError(f"the cluster at {address} refused our token: use the head's token "
                               f"(`ray get-auth-token` there); {TOKEN_HELP}") from None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ClusterUnreachableError(f"could not join the Ray cluster at {address}: {first}") from None


def disconnect() -> None:
    """Leave the cluster (work this process owns is ended by Ray)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
