"""The demo's child processes die with it, even when it is SIGKILLed.

The demo (or a benchmark, or a test) runs ``fleet serve`` in a child (:class:`FleetChild`), which
runs its embedded MQTT broker in a child of its own, and may spread devices over worker processes
(:class:`ProcessFleet`). A SIGKILLed parent runs no cleanup, so the kernel must take them down:
each test SIGKILLs a throwaway parent and expects every process below it gone, ports released.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from edgeserve._process import DIES_WITH_PARENT, popen
from edgeserve.testing import make_keypair
from tests.core.test_process import gone
from tests.services import free_port, port_open

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DIES_WITH_PARENT, reason="PR_SET_PDEATHSIG is Linux only")]

FLEET_PARENT = """
import sys, time
from pathlib import Path
from edgeserve.demo.sim import FleetChild
work, key, broker_port, http_port = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:])
service = FleetChild("orphans", work, key, broker_port=broker_port, http_port=http_port).start()
print(service.process.pid, flush=True)
time.sleep(300)
"""

WORKERS_PARENT = """
import sys, time
from pathlib import Path
from edgeserve.demo.sim import ProcessFleet
work, key, broker_port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
fleet = ProcessFleet(2, 2, ["generic-cpu"], work / "devices", [key],
                     f"mqtt://127.0.0.1:{broker_port}", "orphans").start()
print(" ".join(str(process.pid) for process, _ in fleet._workers), flush=True)
time.sleep(300)
"""


def _kill_parent_of(script: str, *args: object) -> tuple[subprocess.Popen[str], str]:
    """Start ``script`` as a throwaway parent; return it and the first line it prints."""
    parent = popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                   text=True)
    assert parent.stdout is not None
    return parent, parent.stdout.readline()


def _kill(parent: subprocess.Popen[str]) -> None:
    parent.kill()
    parent.wait()
    assert parent.stdout is not None
    parent.stdout.close()


def test_fleet_child_and_its_broker_die_with_a_killed_parent(tmp_path: Path) -> None:
    key = make_keypair(tmp_path / "keys", "demo")
    broker_port, http_port = free_port(), free_port()
    parent, line = _kill_parent_of(FLEET_PARENT, tmp_path, key.public_path, broker_port,
                                   http_port)
    try:
        assert line.strip(), "the parent did not start the fleet; see logs/fleet.log"
        fleet = psutil.Process(int(line))
        broker = fleet.children()
        assert broker and port_open("127.0.0.1", broker_port), "no embedded broker"
    finally:
        _kill(parent)
    assert gone(fleet.pid, 10), "fleet serve outlived its SIGKILLed parent"
    assert all(gone(b.pid, 10) for b in broker), "the broker outlived the fleet"
    assert not port_open("127.0.0.1", broker_port) and not port_open("127.0.0.1", http_port)


def test_process_fleet_workers_die_with_a_killed_parent(tmp_path: Path) -> None:
    key = make_keypair(tmp_path / "keys", "demo")
    # nothing listens on the broker port: the devices keep retrying, which is enough here
    parent, line = _kill_parent_of(WORKERS_PARENT, tmp_path, key.public_path, free_port())
    try:
        workers = [int(pid) for pid in line.split()]
        assert len(workers) == 2, line
    finally:
        _kill(parent)
    assert all(gone(pid, 10) for pid in workers), "a worker outlived its SIGKILLed parent"
