"""What one node has: its devices (cpu; cuda:N with the GPU's name and memory) and its energy sensors.

Read on the node itself: by the node agent (for the labels and resources it starts the
node with) and by the inventory's probe (for the facts too rich for labels). The NVML
module and the environment are parameters, so tests run it against fakes that raise the
real ``pynvml.NVMLError_*`` classes.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, Mapping

import psutil

from engine import __version__
from engine.energy.discovery import SensorStatus, discover_sensors
from engine.energy.estimate import cpu_model_name
from engine.energy.nvml import cuda_label_for_nvml_index, import_pynvml
from engine.paths import PROJECT_ROOT


@dataclass(frozen=True)
class DeviceFacts:
    """One device of a node: ``device`` as the node names it (``cpu``, ``cuda:0``), ``kind`` cpu or gpu,
    ``model`` the CPU's or GPU's model name, ``memory_bytes`` its memory (the host's RAM for the CPU)."""

    device: str
    kind: str
    model: str
    memory_bytes: int | None = None

    @property
    def memory_gib(self) -> float | None:
        return None if self.memory_bytes is None else self.memory_bytes / 2**30


@dataclass(frozen=True)
class NodeFacts:
    """A node as it sees itself: its devices, its sensors (found or missing, and why), its software."""

    node: str
    hostname: str
    devices: tuple[DeviceFacts, ...]
    sensors: tuple[SensorStatus, ...]
    engine_version: str = __version__
    project_root: str = str(PROJECT_ROOT)
    python: str = field(default_factory=platform.python_version)
    physical_cores: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NodeFacts":
        data = dict(data)
        data["devices"] = tuple(DeviceFacts(**d) for d in data.get("devices", ()))
        data["sensors"] = tuple(SensorStatus(**s) for s in data.get("sensors", ()))
        return cls(**data)


def detect_devices(nvml: ModuleType | None | str | Any = "import", env: Mapping[str, str] | None = None
                   ) -> tuple[DeviceFacts, ...]:
    """This host's devices: the CPU always, then every NVIDIA GPU CUDA can see (none when NVML cannot be read)."""
    devices = [DeviceFacts("cpu", "cpu", cpu_model_name(), int(psutil.virtual_memory().total))]
    nvml = import_pynvml() if nvml == "import" else nvml
    if nvml is None:
        return tuple(devices)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return tuple(devices)  # why not is in the sensors' list
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            device = cuda_label_for_nvml_index(index, uuid, env)
            if not device.startswith("cuda:"):
                continue  # hidden by CUDA_VISIBLE_DEVICES
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            devices.append(DeviceFacts(device, "gpu", _text(nvml.nvmlDeviceGetName(handle)), memory))
    except nvml.NVMLError:
        pass
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    return tuple(sorted(devices, key=lambda d: (d.kind != "cpu", d.device)))


def node_facts(node: str, nvml: ModuleType | None | str | Any = "import",
               env: Mapping[str, str] | None = None) -> NodeFacts:
    """Everything the inventory shows of this node."""
    return NodeFacts(node=node, hostname=socket.gethostname(), devices=detect_devices(nvml, env),
                     sensors=tuple(discover_sensors(nvml=nvml, env=env)),
                     physical_cores=psutil.cpu_count(logical=False) or os.cpu_count())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
