"""Device health for telemetry windows: memory, free disk, CPU load, temperature (if readable)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from edgeserve.contract import Health

__all__ = ["read_health"]

_MB = 2**20


def read_health(disk_path: Path | str = ".") -> Health:
    """What psutil can tell about this device now; fields it cannot read stay None.

    ``cpu_load`` is the 1-minute load average divided by the number of CPUs (1.0 = every core
    busy); ``temp_c`` the hottest sensor psutil reports (Linux, FreeBSD), else None.
    """
    import psutil

    values: dict[str, float | None] = {}
    with contextlib.suppress(OSError, AttributeError):
        memory = psutil.virtual_memory()
        values["mem_used_mb"] = round((memory.total - memory.available) / _MB, 1)
        values["mem_total_mb"] = round(memory.total / _MB, 1)
    with contextlib.suppress(OSError):
        values["disk_free_mb"] = round(psutil.disk_usage(str(disk_path)).free / _MB, 1)
    with contextlib.suppress(OSError, AttributeError):
        values["cpu_load"] = round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    values["temp_c"] = _temperature()
    return Health.model_validate(values)


def _temperature() -> float | None:
    import psutil

    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries
                if t.current is not None and -100 <= t.current <= 300]
    return round(max(readings), 1) if readings else None
