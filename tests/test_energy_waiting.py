"""engine/energy/waiting: passive waiting in every worker, and the estimate saying how threads wait."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.energy.estimate import CpuEstimateMeter, CpuPowerModel
from engine.energy.waiting import (PASSIVE_NOTE, SPINNING_NOTE, openmp_loaded, waiting_note, waits_passively,
                                   worker_environment)
from engine.runs import local

ONE_WATT = CpuPowerModel(1.0, "test CPU", "1 W per CPU for the test")


def test_a_worker_environment_waits_passively_whatever_it_was_given():
    env = worker_environment({"PATH": "/bin", "OMP_WAIT_POLICY": "active"})
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert waits_passively(env) and not waits_passively({}) and waits_passively({"OMP_WAIT_POLICY": " passive "})


def test_the_estimate_says_how_the_threads_wait():
    passive = CpuEstimateMeter(ONE_WATT, waiting=waiting_note({"OMP_WAIT_POLICY": "PASSIVE"}))
    spinning = CpuEstimateMeter(ONE_WATT, waiting=waiting_note({}))
    assert passive.method == "estimated: process CPU-seconds × 1 W per logical CPU (1 W per CPU for the test), " \
                             "passive waiting"
    assert spinning.method.endswith(SPINNING_NOTE)
    passive.begin(0.0)
    (reading,) = passive.end(1.0)
    assert reading.method.endswith(PASSIVE_NOTE) and reading.estimated


def test_an_openmp_runtime_is_recognised_in_the_memory_map(tmp_path: Path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1\n")
    assert openmp_loaded(maps) is True
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/libc.so.6\n")
    assert openmp_loaded(maps) is False
    assert openmp_loaded(tmp_path / "missing") is None


def test_spawned_workers_get_passive_waiting(tmp_path: Path, monkeypatch):
    started = []

    class Recorded:
        def __init__(self, args, **options):
            started.append((args, options))

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(local.subprocess, "Popen", Recorded)
    local.spawn("engine.profiling.worker", ["--db", "x", "--job", "1"], tmp_path / "w.log")
    (args, options), = started
    assert args[1:3] == ["-m", "engine.profiling.worker"]
    assert options["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and options["env"]["PATH"] == __import__("os").environ["PATH"]


def test_apply_passive_waiting_before_and_after_an_openmp_runtime_loads():
    code = ("import os\nfrom engine.energy.waiting import apply_passive_waiting\n"
            "print(apply_passive_waiting(), os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in worker_environment().items() if k != "OMP_WAIT_POLICY"}
    before = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert before.stdout.split() == ["True", "PASSIVE"]
    late = subprocess.run([sys.executable, "-c", "import torch\n" + code], env=env, capture_output=True, text=True,
                          check=True)
    assert late.stdout.split() == ["False", "None"]  # too late: torch's OpenMP read its policy already
