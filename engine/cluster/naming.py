"""Host-qualified device names (``nodeA/cuda:0``, ``nodeA/cpu``) and what Ray calls them.

A device of a cluster node is named by the node's name and the device as that node
names it. The node's name is the one its agent gave it (``--node-name``, stable when the
node rejoins, unlike Ray's node id), so it must be a valid Ray label value: at most 63
characters of ``[A-Za-z0-9._-]``, starting and ending with a letter or digit.

Work is pinned to a device by two things, never by node id:
- the node's label ``joule/node=<node>`` (``label_selector``), which picks the node;
- a custom resource of capacity 1 per device, ``joule_dev_<node>_<device label>``, which
  the work asks for whole, so one device runs one thing at a time (two runs on one
  device would measure each other).

Label values may not hold ``:`` or ``/``, so a device is written ``cuda-0`` there.
Pure functions only; the device part is parsed by :func:`engine.backends.base.parse_device`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.backends.base import parse_device
from engine.errors import DeviceUnavailableError

#: The label every node started by our agent carries: its name.
NODE_LABEL = "joule/node"
#: The prefix of the per-device resources.
RESOURCE_PREFIX = "joule_dev_"
#: Ray's (Kubernetes') rule for a label value.
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
SEPARATOR = "/"


@dataclass(frozen=True, order=True)
class QualifiedDevice:
    """A device of a cluster node: ``node`` as its agent named it, ``device`` as the node names it (``cpu``, ``cuda:0``)."""

    node: str
    device: str

    def __str__(self) -> str:
        return f"{self.node}{SEPARATOR}{self.device}"

    @property
    def kind(self) -> str:
        """``cpu`` or ``cuda``."""
        return parse_device(self.device).kind

    @property
    def device_label(self) -> str:
        """The device as a label value: ``cpu``, ``cuda-0``."""
        return device_label(self.device)

    @property
    def resource(self) -> str:
        """The node's custom resource for this device (capacity 1): ``joule_dev_nodeA_cuda-0``."""
        return f"{RESOURCE_PREFIX}{self.node}_{self.device_label}"

    @property
    def label_selector(self) -> dict[str, str]:
        """What pins work to this device's node."""
        return {NODE_LABEL: self.node}


def is_qualified(name: str) -> bool:
    """Whether a device name names a cluster node's device (``node/device``) rather than one of this host."""
    return SEPARATOR in str(name)


def canonical_device(device: str) -> str:
    """A device of one host in its one spelling: ``cpu`` or ``cuda:N`` (``cuda``, ``gpu:1`` accepted)."""
    spec = parse_device(device)
    return "cpu" if spec.kind == "cpu" else f"cuda:{spec.index or 0}"


def check_node_name(node: str) -> str:
    """The node name, or DeviceUnavailableError saying what a node name may hold."""
    if not LABEL_VALUE_RE.match(node):
        raise DeviceUnavailableError(
            f"{node!r} is not a usable node name: it must be 1 to 63 letters, digits, '.', '_' or '-', starting and "
            "ending with a letter or digit (Ray's rule for label values).")
    return node


def parse_qualified(name: str) -> QualifiedDevice:
    """``nodeA/cuda:0`` as a :class:`QualifiedDevice` (device part in its one spelling), or DeviceUnavailableError."""
    text = str(name).strip()
    node, separator, device = text.partition(SEPARATOR)
    if not separator or not node or not device or SEPARATOR in device:
        raise DeviceUnavailableError(
            f"{text!r} is not a device of a cluster node; write it as NODE/DEVICE, e.g. nodeA/cpu or nodeA/cuda:0.")
    check_node_name(node)
    return QualifiedDevice(node, canonical_device(device))


def format_qualified(node: str, device: str) -> str:
    """``node/device`` in its one spelling."""
    return str(QualifiedDevice(check_node_name(node), canonical_device(device)))


def device_label(device: str) -> str:
    """A device of one host written as a label value: ``cpu``, ``cuda-0``."""
    return canonical_device(device).replace(":", "-")


def device_from_label(label: str) -> str:
    """The inverse of :func:`device_label`: ``cuda-0`` to ``cuda:0``."""
    kind, _, index = label.partition("-")
    return canonical_device(f"{kind}:{index}" if index else kind)


def device_from_resource(node: str, resource: str) -> str | None:
    """The device a node's resource stands for (``joule_dev_nodeA_cuda-0`` to ``cuda:0``), or None for other resources."""
    prefix = f"{RESOURCE_PREFIX}{node}_"
    if not resource.startswith(prefix):
        return None
    try:
        return device_from_label(resource[len(prefix):])
    except DeviceUnavailableError:
        return None


def label_value(text: str, *, fallback: str = "unknown") -> str:
    """Free text (a GPU's or CPU's model name) as a valid label value: other characters become '-', cut to 63."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-_.")[:63].rstrip("-_.")
    return value if LABEL_VALUE_RE.match(value) else fallback
