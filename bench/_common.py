"""What the benchmarks share: the machine they ran on and its load, percentages, and a report that is
printed as it goes and appended, dated, to a results file.

Imported by the scripts in ``bench/`` (run as ``.venv/bin/python bench/NAME.py``, which puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def cpu_name() -> str:
    """The CPU's model name, as the energy estimate reports it."""
    from engine.energy.estimate import cpu_model_name

    return cpu_model_name()


def machine() -> str:
    """``host, CPU model, N logical CPUs``: what every figure depends on."""
    return f"{platform.node()}, {cpu_name()}, {os.cpu_count()} logical CPUs"


def uptime() -> str:
    """``uptime``'s line (load averages over 1, 5 and 15 minutes); the load average alone where it is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        one, five, fifteen = os.getloadavg()
        return f"load average: {one:.2f}, {five:.2f}, {fifteen:.2f}"


def load_average() -> str:
    """``1.2 / 0.9 / 0.7 (1 / 5 / 15 min)``."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage (``+12.3%``), ``?`` when unknown."""
    if value is None or value != value:
        return "?"
    return f"{value:+.1%}" if signed else f"{value:.1%}"


def spread(values: list[float], fmt=lambda v: f"{v:.3g}") -> str:
    """``min / median / max`` of the known values (``?`` without any)."""
    known = [v for v in values if v is not None and v == v]
    if not known:
        return "?"
    return " / ".join(fmt(v) for v in (min(known), statistics.median(known), max(known)))


class Report:
    """Lines printed as they come and kept, to be appended to a results file as one dated block."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def append_to(self, path: Path, title: str) -> Path:
        """Append the lines as a block headed ``== <UTC date and time>: <title> ==``; returns the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with path.open("a", encoding="utf-8") as out:
            out.write(f"\n== {stamp}: {title} ==\n")
            out.write("\n".join(self.lines) + "\n")
        return path
