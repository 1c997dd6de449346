"""A whole Ray cluster on this host's loopback, for tests and benchmarks: a head and nodes, as our agent starts them.

    with LocalCluster(["nodeA", "nodeB"]) as cluster:   # sets PLANNER_RAY_ADDRESS for child processes
        ...                                             # runs on nodeA/cpu, nodeB/cpu
        cluster.remove_node("nodeB")                    # SIGKILL of its processes: a lost host
        cluster.add_node("nodeB")                       # back, same name, labels and resources

Isolated so that nothing leaves the loopback and nothing of the developer's is read:
every node is bound to 127.0.0.1; token authentication is on with a fresh token; HOME
and Ray's temp dir are a short temp folder (Unix sockets live there: 107 bytes at most),
holding an empty ``ray_bootstrap_config.yaml`` (else the head probes cloud metadata
addresses); usage stats are off and their report URL points at a closed loopback port
(a cluster not started by ``ray.init`` posts a "disabled" report otherwise). The
environment is restored on exit, and every process the cluster started is killed if
it is still there (a test runner that kills this process leaves agents for a minute).

Ray requires :meth:`add_node` on the main thread (it installs a signal handler).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable

import psutil

from engine.cluster.agent import node_labels, node_resources
from engine.cluster.facts import DeviceFacts
from engine.runs.cluster import ADDRESS_ENV

LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024
TEST_CPU = DeviceFacts("cpu", "cpu", "test CPU")
#: What the command line of a process Ray started holds.
RAY_MARKERS = ("/ray/core/src/", "ray::", "/ray/_private/", "/ray/dashboard/", "/ray/autoscaler/")


class LocalCluster:
    """A head (named ``head``, no devices unless given) and one node per name, each with the devices given."""

    def __init__(self, nodes: Iterable[str] = ("nodeA", "nodeB"), *, devices: dict[str, tuple[DeviceFacts, ...]] | None = None,
                 head_devices: tuple[DeviceFacts, ...] = (), object_store_mib: int = 80,
                 health_check: dict[str, str] | None = None) -> None:
        self.names = list(nodes)
        self.devices = {name: (devices or {}).get(name, (TEST_CPU,)) for name in self.names}
        self.head_devices = head_devices
        self.object_store_mib = object_store_mib
        self.health_check = health_check or {}
        self.cluster = None
        self.nodes: dict[str, object] = {}
        self.token = secrets.token_hex(16)
        self.pids: set[int] = set()
        self._saved_env: dict[str, str | None] = {}
        self.folder: str | None = None

    # -- environment ----------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """What every process of the cluster, and every driver, runs with."""
        home = os.path.join(self.folder, "home")
        return {
            "HOME": home, "RAY_TMPDIR": self.folder, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_REPORT_URL": f"http://{LOOPBACK}:9/",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning",
            **self.health_check,
        }

    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    # -- nodes ------------------------------------------------------------------------------------

    def _node_args(self, name: str, devices: tuple[DeviceFacts, ...]) -> dict:
        return dict(node_ip_address=LOOPBACK, num_cpus=1, object_store_memory=self.object_store_mib * MIB,
                    resources=node_resources(name, devices), labels=node_labels(name, devices), node_name=name,
                    temp_dir=os.path.join(self.folder, "ray"), include_dashboard=False)

    @property
    def address(self) -> str:
        return self.cluster.address

    def start(self, timeout_s: float = 60.0) -> "LocalCluster":
        """Start the head and the nodes; sets ``PLANNER_RAY_ADDRESS`` for this process and its children."""
        self.folder = tempfile.mkdtemp(prefix="jc", dir="/tmp")
        os.makedirs(os.path.join(self.folder, "ray"))
        os.makedirs(os.path.join(self.folder, "home"))
        with open(os.path.join(self.folder, "home", "ray_bootstrap_config.yaml"), "w") as f:
            f.write("{}\n")
        self._set_env(self.environment())
        import ray._private.ray_constants as ray_constants
        from ray.cluster_utils import Cluster

        ray_constants.ENABLE_RAY_CLUSTER = False  # 127.0.0.1 stays 127.0.0.1 (see engine.cluster.connection)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=self._node_args("head", self.head_devices))
            for name in self.names:
                self.add_node(name)
            self.cluster.wait_for_nodes(timeout=timeout_s)
            self._set_env({ADDRESS_ENV: self.address})
            self._record_pids()
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, name: str) -> None:
        """Start node ``name`` (again): same name, labels and resources. Main thread only."""
        self.nodes[name] = self.cluster.add_node(**self._node_args(name, self.devices[name]))
        self._record_pids()

    def remove_node(self, name: str) -> None:
        """Kill node ``name``'s processes at once (SIGKILL), its workers too: a host lost, not shut down.

        Ray's own removal kills the node's raylet and agents only; a worker would go on for a
        second or two until it noticed, which a host that died does not do.
        """
        self._record_pids()
        node = self.nodes.pop(name)
        raylet = node.all_processes["raylet"][0].process.pid
        try:
            processes = [*psutil.Process(raylet).children(recursive=True), psutil.Process(raylet)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        self.cluster.remove_node(node, allow_graceful=False)

    def _record_pids(self) -> None:
        """Remember this process's Ray descendants (never its other children: a run's driver is not ours to kill)."""
        for process in psutil.Process().children(recursive=True):
            try:
                command = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if any(marker in command for marker in RAY_MARKERS):
                self.pids.add(process.pid)

    # -- the end ----------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stop everything, kill what is left of it, restore the environment; returns what had to be killed."""
        import ray

        self._record_pids()
        try:
            if ray.is_initialized():
                ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            killed = self.kill_leftovers()
            self._restore_env()
            if self.folder:
                shutil.rmtree(self.folder, ignore_errors=True)
        return killed

    def leftovers(self, wait_s: float = 10.0) -> list[psutil.Process]:
        """Processes this cluster started that are still alive (waiting up to ``wait_s`` for them to go)."""
        deadline = time.monotonic() + wait_s
        while True:
            alive = []
            for pid in self.pids:
                try:
                    process = psutil.Process(pid)
                    if process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(process)
                except psutil.NoSuchProcess:
                    continue
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)

    def kill_leftovers(self) -> list[str]:
        killed = []
        for process in self.leftovers():
            try:
                killed.append(" ".join(process.cmdline())[:120])
                process.kill()
            except psutil.NoSuchProcess:
                continue
        return killed

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.cluster.localcluster [--nodes nodeA nodeB] --env-file PATH``: a test cluster until Ctrl-C.

    Writes the environment a driver (the app, the CLI) needs to join it to ``PATH`` (mode
    0600: it holds the token), as ``export`` lines, and waits for SIGINT or SIGTERM; then
    stops the cluster and says whether any of its processes had to be killed.
    """
    import argparse
    import shlex
    import signal
    import threading

    parser = argparse.ArgumentParser(prog="python -m engine.cluster.localcluster",
                                     description="A loopback-only test cluster: a head and nodes, as the agent "
                                                 "starts them, until interrupted.")
    parser.add_argument("--nodes", nargs="+", default=["nodeA", "nodeB"], help="the nodes' names")
    parser.add_argument("--env-file", required=True, help="where to write the environment that joins it (0600)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    cluster = LocalCluster(args.nodes).start()
    for number in (signal.SIGINT, signal.SIGTERM):  # after the start: Ray's nodes install a SIGTERM handler
        signal.signal(number, lambda *_: stop.set())
    try:
        environment = {**cluster.environment(), ADDRESS_ENV: cluster.address}
        descriptor = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.writelines(f"export {key}={shlex.quote(value)}\n" for key, value in environment.items())
        print(f"cluster at {cluster.address}: head, {', '.join(args.nodes)}; environment in {args.env_file}",
              flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        killed = cluster.stop()
        print(f"stopped; {len(killed)} processes had to be killed" + (f": {killed}" if killed else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
