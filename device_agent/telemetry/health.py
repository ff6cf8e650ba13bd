"""Device health for telemetry windows: memory, free disk, CPU load, temperature (if readable).

On Linux (most devices) everything is read from ``/proc`` and ``/sys`` directly, as psutil
itself reads it there: importing psutil cost a long-running ``agent run`` 0.4–0.9 MB of resident
memory for four numbers. Elsewhere (macOS, Windows) psutil reads them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from edgeserve.contract import Health

__all__ = ["read_health"]

_MB = 2**20
_SYS = Path("/sys/class")


def read_health(disk_path: Path | str = ".") -> Health:
    """What this device can tell about itself now; fields it cannot read stay None.

    ``mem_used_mb`` is total less available memory (the kernel's ``MemAvailable``, as psutil
    reads it); ``cpu_load`` the 1-minute load average divided by the number of CPUs (1.0 =
    every core busy); ``temp_c`` the hottest temperature sensor (Linux, FreeBSD), else None.
    """
    values: dict[str, float | None] = {}
    memory = _memory()
    if memory is not None:
        total, available = memory
        values["mem_used_mb"] = round((total - available) / _MB, 1)
        values["mem_total_mb"] = round(total / _MB, 1)
    with contextlib.suppress(OSError):
        values["disk_free_mb"] = round(shutil.disk_usage(str(disk_path)).free / _MB, 1)
    with contextlib.suppress(OSError, AttributeError):
        values["cpu_load"] = round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    values["temp_c"] = _temperature()
    return Health.model_validate(values)


def _memory() -> tuple[int, int] | None:
    """(total, available) bytes of memory, or None when unreadable."""
    if sys.platform.startswith("linux"):
        return _linux_memory(Path("/proc/meminfo"))
    try:
        import psutil

        memory = psutil.virtual_memory()
    except (ImportError, OSError, AttributeError):
        return None
    return int(memory.total), int(memory.available)


def _linux_memory(meminfo: Path) -> tuple[int, int] | None:
    fields: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            name, _, rest = line.partition(":")
            number = rest.split()
            if number and number[0].isdigit():
                fields[name] = int(number[0]) * 1024  # kB
    except OSError:
        return None
    total = fields.get("MemTotal")
    if not total:
        return None
    available = fields.get("MemAvailable")
    if available is None:  # kernels before 3.14: what psutil estimates for them
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return total, min(available, total)


def _temperature() -> float | None:
    if sys.platform.startswith("linux"):
        readings = _linux_temperatures(_SYS)
    else:
        readings = _psutil_temperatures()
    readings = [t for t in readings if -100 <= t <= 300]
    return round(max(readings), 1) if readings else None


def _linux_temperatures(root: Path) -> list[float]:
    """Every hwmon sensor's temperature in °C, or the thermal zones' when there is no hwmon
    sensor (the sources psutil reads, in its order)."""
    readings = _millidegrees(root.glob("hwmon/hwmon*/temp*_input"))
    return readings or _millidegrees(root.glob("thermal/thermal_zone*/temp"))


def _millidegrees(paths: Iterable[Path]) -> list[float]:
    readings = []
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            readings.append(int(path.read_text().strip()) / 1000.0)
    return readings


def _psutil_temperatures() -> list[float]:
    try:
        import psutil
    except ImportError:
        return []
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return []
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return []
    return [t.current for entries in sensors.values() for t in entries if t.current is not None]
