"""What can go wrong with a cluster, each as a sentence a person can act on."""

from __future__ import annotations

from engine.errors import PlannerError


class ClusterError(PlannerError):
    """Base of the cluster's errors."""


class ClusterConfigError(ClusterError):
    """This host is not set up to join the cluster (no token, a bad address, not a Ray node)."""


class ClusterUnreachableError(ClusterError):
    """The cluster's head cannot be reached, or did not answer in time."""


class ClusterAuthError(ClusterError):
    """The cluster refused our token."""


class NodeUnavailableError(ClusterError):
    """A node (or its device) is not in the cluster now, or a file a run needs is not on it."""


class NodeLostError(ClusterError):
    """A node stopped answering while it ran work (killed, crashed, network gone)."""
