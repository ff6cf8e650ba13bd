"""Device health read on Linux from /proc and /sys (no psutil import), agreeing with psutil."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from edgeserve.device_agent.telemetry import health
from edgeserve.device_agent.telemetry.health import read_health

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and /sys")


@linux
def test_memory_and_disk_agree_with_psutil(tmp_path: Path) -> None:
    mine = read_health(tmp_path)
    memory = psutil.virtual_memory()
    assert mine.mem_total_mb == round(memory.total / 2**20, 1)
    # memory moves between the two reads: within 2 % of the total
    assert mine.mem_used_mb is not None
    assert abs(mine.mem_used_mb - (memory.total - memory.available) / 2**20) \
        < 0.02 * memory.total / 2**20
    assert mine.disk_free_mb is not None
    assert abs(mine.disk_free_mb - psutil.disk_usage(str(tmp_path)).free / 2**20) < 64
    readings = [t.current for entries in psutil.sensors_temperatures().values()
                for t in entries if t.current is not None and -100 <= t.current <= 300]
    assert mine.temp_c == (round(max(readings), 1) if readings else None)


@linux
def test_reading_health_imports_no_psutil(tmp_path: Path) -> None:
    probe = ("import json, sys\n"
             "from edgeserve.device_agent.telemetry.health import read_health\n"
             f"h = read_health({str(tmp_path)!r})\n"
             "print(json.dumps([h.mem_total_mb, 'psutil' in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=tmp_path, timeout=60)
    total, imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert total > 0 and imported is False


def test_meminfo_without_memavailable_and_unreadable(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nBuffers:          20 kB\n"
                       "Cached:           30 kB\nHugePages_Total:    0\n")
    assert health._linux_memory(meminfo) == (1000 * 1024, 150 * 1024)
    meminfo.write_text("MemTotal: 1000 kB\nMemAvailable: 400 kB\n")
    assert health._linux_memory(meminfo) == (1000 * 1024, 400 * 1024)
    assert health._linux_memory(tmp_path / "missing") is None
    meminfo.write_text("garbage\n")
    assert health._linux_memory(meminfo) is None


def test_temperatures_from_hwmon_first_then_thermal_zones(tmp_path: Path) -> None:
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("48500\n")
    assert health._linux_temperatures(tmp_path) == [48.5]
    hwmon = tmp_path / "hwmon" / "hwmon1"
    hwmon.mkdir(parents=True)
    (hwmon / "temp1_input").write_text("61000\n")
    (hwmon / "temp2_input").write_text("not a number\n")
    (hwmon / "temp3_input").write_text("39250\n")
    assert sorted(health._linux_temperatures(tmp_path)) == [39.25, 61.0]
