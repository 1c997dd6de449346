"""Exceptions of the energy layer, each meant to be shown to a person as it is."""

from __future__ import annotations

from engine.errors import PlannerError


class EnergyError(PlannerError):
    """Base of every error the energy layer raises on purpose."""


class SensorUnavailableError(EnergyError):
    """A sensor cannot be used on this host.

    ``source`` names it (``nvml``, ``rapl``, ...), ``detail`` says why in one sentence
    and ``fix`` what a person can do about it, when anything.
    """

    def __init__(self, source: str, detail: str, fix: str | None = None):
        self.source, self.detail, self.fix = source, detail, fix
        super().__init__(f"{source}: {detail}" + (f" Fix: {fix}" if fix else ""))


class MeterStateError(EnergyError):
    """A window was started twice, or stopped without having been started."""
