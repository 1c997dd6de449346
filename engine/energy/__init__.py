"""Energy: which sources exist on this host, and (later) meters that read them."""

from engine.energy.discovery import SensorStatus, discover_sensors

__all__ = ["SensorStatus", "discover_sensors"]
