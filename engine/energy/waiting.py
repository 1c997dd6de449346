"""How the inference libraries' threads wait inside our workers: passively.

torch's intra-op pool and ggml's threads (llama-cpp-python's Linux wheels build ggml with
OpenMP: its barrier is an OpenMP barrier) are OpenMP threads. By default a waiting OpenMP
thread spins for a while before it sleeps (libgomp: 300,000 iterations per wait). That
spinning is CPU time, so the CPU estimate (CPU-seconds × watts) counts waiting as work;
and when another process wants the cores, spinners take turns with it and with the
thread they wait for, so both CPU time and wall time grow with the neighbour's load.
``bench/fidelity_causes.py`` measures it (see the README: up to several times the CPU
time of the same request under load, and a spread of 2-3x between runs).

``OMP_WAIT_POLICY=PASSIVE`` makes a waiting thread sleep at once. The runtime reads it
once, when the library loads, so it has to be in a worker's environment before torch or
llama_cpp is imported: :func:`worker_environment` is what every worker process is started
with (:mod:`engine.runs.local`), and :func:`apply_passive_waiting` sets it in a process
that was started without it, if no OpenMP runtime is loaded yet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
PASSIVE = "PASSIVE"

#: What the method string of an estimate says about waiting, by policy.
PASSIVE_NOTE = "passive waiting"
SPINNING_NOTE = "threads may spin while waiting (OMP_WAIT_POLICY is not PASSIVE)"


def worker_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker process is started with: ``env`` (default this one) with passive waiting."""
    out = dict(os.environ if env is None else env)
    out[WAIT_POLICY_ENV] = PASSIVE
    return out


def waits_passively(env: Mapping[str, str] | None = None) -> bool:
    """Whether OpenMP threads started under ``env`` (default this process's) wait passively."""
    env = os.environ if env is None else env
    return env.get(WAIT_POLICY_ENV, "").strip().upper() == PASSIVE


def waiting_note(env: Mapping[str, str] | None = None) -> str:
    """The few words an estimate's method carries about waiting."""
    return PASSIVE_NOTE if waits_passively(env) else SPINNING_NOTE


def openmp_loaded(maps: Path = Path("/proc/self/maps")) -> bool | None:
    """Whether an OpenMP runtime is mapped into this process (``None`` when this system cannot say)."""
    try:
        text = maps.read_text()
    except OSError:
        return None
    return any(name in text for name in ("libgomp", "libiomp", "libomp"))


def apply_passive_waiting() -> bool:
    """Make this process's OpenMP threads wait passively, if it is not too late; returns whether they do.

    Too late means an OpenMP runtime is already loaded (it read its policy then): the
    environment is left alone and ``False`` returned unless it already said PASSIVE.
    """
    if waits_passively():
        return True
    if openmp_loaded() is not False:
        return False
    os.environ[WAIT_POLICY_ENV] = PASSIVE
    return True
