"""Children die with their parent (edgeserve._process), and the suite fails on leftovers.

Each test starts a throwaway parent process, lets it start a child, SIGKILLs the parent (which
then runs no code at all) and expects the child to be gone within seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgeserve._process import DIES_WITH_PARENT, popen, run

REPO = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not DIES_WITH_PARENT, reason="PR_SET_PDEATHSIG is Linux only")

POPEN_PARENT = """
import sys, time
from edgeserve._process import popen
child = popen(["sleep", "120"])
print(child.pid, flush=True)
time.sleep(120)
"""

SPAWN_PARENT = """
import multiprocessing, os, time
from edgeserve._process import die_with_parent

def child(parent_pid):
    die_with_parent(parent_pid)
    time.sleep(120)

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child, args=(os.getpid(),))
    process.start()
    print(process.pid, flush=True)
    time.sleep(120)
"""


def gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has exited (a zombie has) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def child_outlives_killed_parent(script: str, tmp_path: Path) -> bool:
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not gone(child, 0.2)
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    if gone(child, 5):
        return False
    os.kill(child, signal.SIGKILL)
    return True


@linux_only
def test_a_popen_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    assert not child_outlives_killed_parent(POPEN_PARENT, tmp_path)


@linux_only
def test_a_multiprocessing_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    assert not child_outlives_killed_parent(SPAWN_PARENT, tmp_path)


@linux_only
def test_a_child_whose_parent_is_already_gone_exits() -> None:
    """The parent may die between fork and prctl: then no signal would ever come."""
    probe = "from edgeserve._process import die_with_parent; die_with_parent(1); print('alive')"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout) == (1, "")


def test_a_given_preexec_fn_still_runs() -> None:
    child = popen(["sleep", "30"], preexec_fn=os.setsid)
    try:
        assert os.getsid(child.pid) == child.pid
    finally:
        child.kill()
        child.wait()
    assert run(["true"], check=True).returncode == 0


def test_a_test_that_leaves_a_process_running_fails_the_run(tmp_path: Path) -> None:
    """tests/processes.py: a test that leaves a process errors at teardown, a session fixture
    that does fails the session; either process is killed and the exit status is 1. A session
    fixture first requested inside a test is not that test's leftover."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.processes"]\n')
    (tmp_path / "test_leaky.py").write_text(
        "import subprocess\n"
        "import pytest\n\n"
        "@pytest.fixture(scope='session')\n"
        "def service():\n"
        "    subprocess.Popen(['sleep', '98'])\n\n"
        "def test_leaks():\n"
        "    subprocess.Popen(['sleep', '97'])\n\n"
        "def test_clean(service):\n"
        "    subprocess.run(['true'], check=True)\n\n"
        "@pytest.fixture(scope='session')\n"
        "def stopped_service():\n"
        "    process = subprocess.Popen(['sleep', '99'])\n"
        "    yield\n"
        "    process.kill()\n"
        "    process.wait()\n\n"
        "def test_lazy(request):\n"
        "    request.getfixturevalue('stopped_service')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "EDGESERVE_TEST_PROCESS_GRACE": "0.5"})
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "test_leaky.py::test_leaks left 1 process(es) running" in out, out
    assert "sleep 97" in out and "3 passed, 1 error" in out and "sleep 99" not in out, out
    assert "1 process(es) started by the test run were still running" in out, out
    assert "sleep 98" in out, out
    assert not [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] in (["sleep", "97"], ["sleep", "98"])
                and p.status() != psutil.STATUS_ZOMBIE]
