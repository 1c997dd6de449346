"""NVIDIA GPU meters against a fake NVML that raises the real ``pynvml.NVMLError_*`` classes.

The fake answers like three generations of GPU: Pascal (no energy counter, no instant
power field, a plain power reading), Volta (the counter) and Hopper (the counter and
instant power; its power reading is a 1 s average). Readings are scripted sequences,
time is passed in, so every integration and every invalid window is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from engine.energy.errors import SensorUnavailableError
from engine.energy.nvml import (NvmlGpuMeter, cuda_label_for_nvml_index, integrate_power, nvml_error_message,
                                parse_cuda_visible_devices, power_usage_is_1s_average, resolve_cuda_device)

PASCAL, VOLTA, AMPERE, HOPPER = (pynvml.NVML_DEVICE_ARCH_PASCAL, pynvml.NVML_DEVICE_ARCH_VOLTA,
                                 pynvml.NVML_DEVICE_ARCH_AMPERE, pynvml.NVML_DEVICE_ARCH_HOPPER)


@dataclass
class FakeGpu:
    """One GPU: each reading is a script consumed one value per call (the last one repeats);
    a script entry that is an exception is raised; ``None`` as a whole script means
    "not supported". The meter probes each reading once when it opens: the first value
    of a script is that probe's."""

    name: str
    uuid: str
    arch: int
    counter_mj: list | None = None
    instant_mw: list | None = None
    usage_mw: list | None = None
    processes: list[int] = field(default_factory=list)
    field_value_type: int = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    calls: dict[str, int] = field(default_factory=dict)

    def next(self, what: str) -> Any:
        script = getattr(self, what)
        if script is None:
            raise pynvml.NVMLError_NotSupported()
        i = self.calls.get(what, 0)
        self.calls[what] = i + 1
        value = script[min(i, len(script) - 1)]
        if isinstance(value, BaseException):
            raise value
        return value


def pascal(**kw) -> FakeGpu:
    kw.setdefault("usage_mw", [100_000])
    return FakeGpu("Tesla P100-PCIE-16GB", "GPU-aaaa1111-0000", PASCAL, **kw)


def volta(**kw) -> FakeGpu:
    kw.setdefault("counter_mj", [1_000_000, 1_000_000, 1_250_000])  # probe, start, end
    kw.setdefault("usage_mw", [150_000])
    return FakeGpu("Tesla V100-SXM2-16GB", "GPU-bbbb2222-0000", VOLTA, **kw)


def hopper(**kw) -> FakeGpu:
    kw.setdefault("counter_mj", [5_000_000])
    kw.setdefault("instant_mw", [300_000])
    kw.setdefault("usage_mw", [300_000])
    return FakeGpu("NVIDIA H100 80GB HBM3", "GPU-cccc3333-0000", HOPPER, **kw)


class FakeNvml:
    """The part of pynvml the meters use; errors and constants are the real module's."""

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None):
        self.gpus, self.init_error = gpus, init_error
        self.inits = self.shutdowns = 0

    def __getattr__(self, name: str):
        if name.startswith(("NVMLError", "NVML_")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu):
        return gpu.name.encode()  # old pynvml versions return bytes

    def nvmlDeviceGetUUID(self, gpu):
        return gpu.uuid

    def nvmlDeviceGetArchitecture(self, gpu):
        return gpu.arch

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu):
        return gpu.next("counter_mj")

    def nvmlDeviceGetPowerUsage(self, gpu):
        return gpu.next("usage_mw")

    def nvmlDeviceGetFieldValues(self, gpu, field_ids):
        assert field_ids == [pynvml.NVML_FI_DEV_POWER_INSTANT]
        try:
            milliwatts = gpu.next("instant_mw")
        except pynvml.NVMLError_NotSupported:
            return [SimpleNamespace(nvmlReturn=pynvml.NVML_ERROR_NOT_SUPPORTED, valueType=0, value=None)]
        member = {pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal", pynvml.NVML_VALUE_TYPE_SIGNED_INT: "siVal",
                  pynvml.NVML_VALUE_TYPE_DOUBLE: "dVal"}[gpu.field_value_type]
        return [SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, valueType=gpu.field_value_type,
                                value=SimpleNamespace(**{member: milliwatts}))]

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        return [SimpleNamespace(pid=pid, usedGpuMemory=0) for pid in gpu.processes]


def meter_for(gpu: FakeGpu, **kw) -> NvmlGpuMeter:
    return NvmlGpuMeter(0, nvml=FakeNvml([gpu]), env={}, **kw)


def run_window(meter: NvmlGpuMeter, duration_s: float, polls: int = 0):
    meter.begin(0.0)
    for i in range(1, polls + 1):
        meter.poll(duration_s * i / (polls + 1))
    (reading,) = meter.end(duration_s)
    return reading


# -- choosing the reading ----------------------------------------------------------------------

def test_volta_uses_the_counter_in_millijoules():
    meter = meter_for(volta())
    assert meter.mode == "counter" and meter.poll_interval_s == 1.0
    reading = run_window(meter, 2.0)
    assert reading.energy_j == pytest.approx(250.0)
    assert (reading.source, reading.method, reading.kind, reading.device) == ("nvml-counter", "nvml-counter", "gpu",
                                                                              "cuda:0")
    assert reading.warnings == ()
    assert "GPU-bbbb2222" in reading.detail and "Volta" in reading.detail


def test_hopper_prefers_the_counter_over_instant_power():
    meter = meter_for(hopper(counter_mj=[5_000_000, 5_000_000, 5_600_000]))
    assert meter.mode == "counter"
    assert run_window(meter, 2.0).energy_j == pytest.approx(600.0)


def test_pascal_has_no_counter_and_integrates_its_power_reading():
    gpu = pascal(usage_mw=[100_000])
    meter = meter_for(gpu)
    assert meter.mode == "power-usage" and not meter.averaged  # pre-Ampere: not the 1 s average
    assert meter.poll_interval_s == pytest.approx(0.05)
    reading = run_window(meter, 2.0, polls=39)
    assert reading.source == "nvml-power" and reading.method == "nvml-power:usage@50ms"
    assert reading.energy_j == pytest.approx(200.0)
    assert reading.warnings == ()


def test_instant_power_is_integrated_by_the_trapezoid_rule():
    # power rises linearly from 100 W to 200 W over 1 s: exactly 150 J
    ramp = [100_000 + 100_000 * i / 20 for i in range(21)]
    meter = meter_for(hopper(instant_mw=[0] + ramp), mode="power-instant")  # 0: the probe
    reading = run_window(meter, 1.0, polls=19)
    assert reading.method == "nvml-power:instant@50ms"
    assert reading.energy_j == pytest.approx(150.0)


def test_instant_power_field_with_a_signed_value_type():
    meter = meter_for(hopper(instant_mw=[250_000], field_value_type=pynvml.NVML_VALUE_TYPE_SIGNED_INT),
                      mode="power-instant")
    assert run_window(meter, 1.0, polls=19).energy_j == pytest.approx(250.0)


def test_hopper_power_usage_is_a_1s_average_and_short_windows_say_so():
    meter = meter_for(hopper(), mode="power-usage")
    assert meter.averaged and meter.method == "nvml-power:1s-average@100ms"
    reading = run_window(meter, 1.0, polls=9)
    assert reading.energy_j == pytest.approx(300.0)
    assert any("1 s moving average" in w for w in reading.warnings)


def test_ga100_power_usage_is_not_averaged():
    a100 = FakeGpu("NVIDIA A100-SXM4-40GB", "GPU-dddd", AMPERE, counter_mj=[0], usage_mw=[200_000])
    assert not meter_for(a100, mode="power-usage").averaged
    assert power_usage_is_1s_average(AMPERE, "NVIDIA GeForce RTX 3090") is True
    assert power_usage_is_1s_average(AMPERE, "NVIDIA A30") is False
    assert power_usage_is_1s_average(VOLTA, "Tesla V100") is False
    assert power_usage_is_1s_average(None, "?") is None


def test_a_gpu_with_no_reading_is_unavailable_with_the_reason():
    gpu = FakeGpu("Old", "GPU-eeee", pynvml.NVML_DEVICE_ARCH_KEPLER,
                  usage_mw=[pynvml.NVMLError_NoPermission()])
    with pytest.raises(SensorUnavailableError) as raised:
        meter_for(gpu)
    assert "no permission" in raised.value.detail and raised.value.fix


# -- invalid windows ---------------------------------------------------------------------------

def test_counter_going_backwards_mid_window_invalidates_it():
    gpu = volta(counter_mj=[1_000_000, 1_000_000, 1_100_000, 40_000, 90_000])  # reload after the first poll
    reading = run_window(meter_for(gpu), 3.0, polls=2)
    assert reading.energy_j is None
    assert any("went backwards" in w and "invalid" in w for w in reading.warnings)


def test_counter_going_backwards_at_the_end_invalidates_it():
    reading = run_window(meter_for(volta(counter_mj=[1_000_000, 1_000_000, 999_999])), 2.0)
    assert reading.energy_j is None and any("went backwards" in w for w in reading.warnings)


def test_gpu_lost_at_the_end_gives_no_energy_and_says_why():
    gpu = volta(counter_mj=[1_000_000, 1_000_000, pynvml.NVMLError_GpuIsLost()])
    reading = run_window(meter_for(gpu), 2.0)
    assert reading.energy_j is None
    assert any("fallen off the bus" in w for w in reading.warnings)


def test_counter_unreadable_at_the_start_gives_no_energy():
    gpu = volta(counter_mj=[0, pynvml.NVMLError_Timeout(), 2_000_000, 3_000_000])
    meter = meter_for(gpu)
    reading = run_window(meter, 2.0, polls=1)
    assert reading.energy_j is None and any("start of the window" in w for w in reading.warnings)


def test_a_counter_that_did_not_advance_is_unknown_not_zero():
    reading = run_window(meter_for(volta(counter_mj=[1_000_000])), 0.05)
    assert reading.energy_j is None and any("did not advance" in w for w in reading.warnings)


def test_short_counter_window_warns_about_its_steps():
    reading = run_window(meter_for(volta(counter_mj=[1_000_000, 1_000_000, 1_020_000])), 0.2)
    assert reading.energy_j == pytest.approx(20.0)
    assert any("100 ms" in w for w in reading.warnings)


def test_power_samples_that_cover_too_little_of_the_window_give_no_energy():
    failing = pynvml.NVMLError_Unknown()
    gpu = hopper(instant_mw=[300_000, 300_000] + [failing] * 100)  # probe, begin, then every read fails
    reading = run_window(meter_for(gpu, mode="power-instant"), 2.0, polls=39)
    assert reading.energy_j is None
    assert any("cover only" in w for w in reading.warnings)
    assert any("power reading(s) failed" in w for w in reading.warnings)


def test_integrate_power_holds_edges_and_reports_the_held_share():
    energy_j, held = integrate_power([(1.0, 100.0), (3.0, 300.0)], 0.0, 4.0)
    assert energy_j == pytest.approx(100 * 1 + 400 + 300 * 1)
    assert held == pytest.approx(0.5)


# -- who else uses the GPU -------------------------------------------------------------------------

def test_other_processes_on_the_gpu_are_reported():
    gpu = volta(processes=[os.getpid(), 999_999])
    reading = run_window(meter_for(gpu), 2.0)
    assert reading.energy_j == pytest.approx(250.0)
    assert any("999999" in w and "other processes" in w for w in reading.warnings)


def test_a_single_unknown_process_is_taken_to_be_us_in_a_container():
    reading = run_window(meter_for(volta(processes=[424_242])), 2.0)
    assert not any("other processes" in w for w in reading.warnings)


# -- NVML errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("error, fragment", [
    (pynvml.NVMLError_LibraryNotFound(), "libnvidia-ml.so"),
    (pynvml.NVMLError_DriverNotLoaded(), "not loaded"),
    (pynvml.NVMLError_NoPermission(), "no permission"),
    (pynvml.NVMLError_LibRmVersionMismatch(), "reboot"),
])
def test_init_errors_become_sentences_with_a_fix(error, fragment):
    with pytest.raises(SensorUnavailableError) as raised:
        NvmlGpuMeter(0, nvml=FakeNvml([volta()], init_error=error), env={})
    assert fragment in (raised.value.detail + " " + (raised.value.fix or "")).lower()


def test_every_error_class_named_has_its_own_sentence():
    classes = [pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded, pynvml.NVMLError_NoPermission,
               pynvml.NVMLError_NotSupported, pynvml.NVMLError_GpuIsLost, pynvml.NVMLError_FunctionNotFound,
               pynvml.NVMLError_ResetRequired, pynvml.NVMLError_InsufficientPower, pynvml.NVMLError_Timeout]
    sentences = [nvml_error_message(pynvml, cls())[0] for cls in classes]
    assert len(set(sentences)) == len(classes)
    assert not any(s.startswith("NVML failed") for s in sentences)
    assert nvml_error_message(pynvml, pynvml.NVMLError_Unknown())[0].startswith("NVML failed")


def test_the_meter_releases_nvml_on_close():
    fake = FakeNvml([volta()])
    meter = NvmlGpuMeter(0, nvml=fake, env={})
    meter.close()
    meter.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)


# -- cuda:N is which NVML GPU ------------------------------------------------------------------------

def three_gpus() -> FakeNvml:
    return FakeNvml([volta(), hopper(), FakeGpu("NVIDIA H100 80GB HBM3", "GPU-ffff9999-0000", HOPPER,
                                                counter_mj=[0])])


def test_cuda_visible_devices_indices_map_to_nvml_indices():
    identity, gpu = resolve_cuda_device(0, three_gpus(), env={"CUDA_VISIBLE_DEVICES": "2,0",
                                                              "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert (identity.nvml_index, gpu.uuid, identity.mapped_by) == (2, "GPU-ffff9999-0000",
                                                                    "CUDA_VISIBLE_DEVICES index")
    assert identity.warnings == ()


def test_mixed_gpu_models_without_pci_order_warn():
    identity, _ = resolve_cuda_device(1, three_gpus(), env={})
    assert identity.nvml_index == 1 and any("CUDA_DEVICE_ORDER=PCI_BUS_ID" in w for w in identity.warnings)


def test_cuda_visible_devices_uuid_prefixes_are_matched():
    identity, _ = resolve_cuda_device(1, three_gpus(), env={"CUDA_VISIBLE_DEVICES": "GPU-ffff,GPU-bbbb"})
    assert identity.nvml_index == 0 and identity.mapped_by == "CUDA_VISIBLE_DEVICES UUID"


def test_the_cuda_uuid_wins_over_the_environment():
    identity, _ = resolve_cuda_device(0, three_gpus(), env={"CUDA_VISIBLE_DEVICES": "0"},
                                      cuda_uuid="cccc3333-0000")  # torch prints it without "GPU-"
    assert identity.nvml_index == 1 and identity.name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("env, fragment", [
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "not visible"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "not visible"),  # asks for cuda:1 below
    ({"CUDA_VISIBLE_DEVICES": "MIG-1234,0"}, "whole GPUs"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-9999"}, "no NVML device"),
])
def test_unmappable_devices_are_refused_with_the_reason(env, fragment):
    index = 1 if env["CUDA_VISIBLE_DEVICES"] == "0" else 0
    with pytest.raises(SensorUnavailableError) as raised:
        resolve_cuda_device(index, three_gpus(), env=env)
    assert fragment in raised.value.detail


def test_parse_cuda_visible_devices_stops_where_cuda_stops():
    assert parse_cuda_visible_devices(None) is None
    assert parse_cuda_visible_devices("1, 0") == ["1", "0"]
    assert parse_cuda_visible_devices("0,-1,2") == ["0"]
    assert parse_cuda_visible_devices("") == []


def test_nvml_gpus_get_their_cuda_names_for_listings():
    env = {"CUDA_VISIBLE_DEVICES": "2,GPU-bbbb"}
    assert cuda_label_for_nvml_index(2, "GPU-ffff", env) == "cuda:0"
    assert cuda_label_for_nvml_index(0, "GPU-bbbb2222", env) == "cuda:1"
    assert cuda_label_for_nvml_index(1, "GPU-cccc", env).startswith("nvml:1 (hidden")
    assert cuda_label_for_nvml_index(1, "GPU-cccc", {}) == "cuda:1"
