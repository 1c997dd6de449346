"""Profiling and executing on the devices of a Ray cluster's nodes.

- ``naming``: host-qualified device names (``nodeA/cuda:0``) and their Ray labels and resources;
- ``errors``: what can go wrong, in sentences;
- ``connection``: joining the cluster as a driver, every wait bounded, token required;
- ``facts``: a node's devices and sensors, read on the node;
- ``agent``: ``python -m engine.cluster.agent start``, which starts a node with its devices as resources;
- ``inventory``: the cluster's nodes, devices and sensors, alive or gone;
- ``protocol``: what a device's work streams back (batches of sink calls), no Ray;
- ``work``: what a node runs for profiling and execution (their own measuring code);
- ``scheduler``: the driver's loop over every device's stream, against :class:`ClusterInterface`;
- ``remote``: the Ray actor, the node probe and :class:`RayCluster` (imports Ray);
- ``runstate``: an execution's per-device parts and where its devices run;
- ``driver``: the driver process, the database's only writer;
- ``localcluster``: a whole cluster on this host's loopback, for tests and benchmarks.

Only ``connection``, ``remote``, ``inventory`` (when it lists) and the processes import Ray,
and only when used; a single-host installation never loads it. Where runs start is
:mod:`engine.runs.cluster`.
"""

from engine.cluster.errors import (ClusterAuthError, ClusterConfigError, ClusterError, ClusterUnreachableError,
                                   NodeLostError, NodeUnavailableError)
from engine.cluster.naming import QualifiedDevice, format_qualified, is_qualified, parse_qualified

__all__ = [
    "ClusterAuthError", "ClusterConfigError", "ClusterError", "ClusterUnreachableError", "NodeLostError",
    "NodeUnavailableError", "QualifiedDevice", "format_qualified", "is_qualified", "parse_qualified",
]
