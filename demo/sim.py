"""A fleet of real agents in one process: the demo, the rollout benchmark and end-to-end tests.

Each :class:`SimDevice` is the real device stack — :class:`~edgeserve.device_agent.agent.Agent`
with its cache, runtimes, monitor, durable outbox, MQTT link and updater (``AgentRun``) — plus a
traffic thread that replays held-out samples through ``agent.predict`` and, when labels are
known, reports whether each answer was right as feedback. Only the process boundary is simulated:
devices share one Python process (and its two cores) instead of each having their own board.

Like the demo, this module ties the parts together, so it imports them lazily.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeserve._process import die_with_parent, popen
from edgeserve.errors import EdgeserveError, ModelNotFoundError
from edgeserve.profiles import HardwareProfile, load_profile

if TYPE_CHECKING:
    from edgeserve.device_agent.run import AgentRun

__all__ = ["FleetChild", "ProcessFleet", "SimDevice", "SimFleet", "Traffic", "shared_host_profile"]

log = logging.getLogger(__name__)


@dataclass
class Traffic:
    """What a device serves: held-out samples of one model, replayed at ``rate_per_s``."""

    model: str
    inputs: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    rate_per_s: float = 20.0
    feedback: bool = True


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    by_version: Counter[str] = field(default_factory=Counter)


def shared_host_profile(name: str) -> HardwareProfile:
    """``name``'s profile with one runtime thread per session: simulated devices share the
    host's cores, and dozens of sessions each spinning a thread per core would starve them all."""
    profile = load_profile(name)
    runtimes = profile.runtimes
    updates: dict[str, Any] = {}
    if runtimes.onnxruntime is not None:
        updates["onnxruntime"] = runtimes.onnxruntime.model_copy(
            update={"intra_op_threads": 1, "inter_op_threads": 1})
    if runtimes.litert is not None:
        updates["litert"] = runtimes.litert.model_copy(update={"threads": 1})
    return profile.model_copy(update={"runtimes": runtimes.model_copy(update=updates)})


class SimDevice:
    def __init__(self, device_id: str, profile: str, root: Path, trusted_keys: Iterable[Path],
                 broker_url: str, fleet: str, *, window_s: float = 2.0,
                 labels: Mapping[str, str] | None = None, traffic: Traffic | None = None,
                 seed: int = 0, fleet_keys: Iterable[Path] = ()) -> None:
        from edgeserve.device_agent.agent import Agent
        from edgeserve.device_agent.run import AgentRun
        from edgeserve.device_agent.telemetry.link import LinkSettings
        from edgeserve.mqtt import BrokerSettings
        from edgeserve.signing import TrustStore

        self.device_id = device_id
        self.profile = profile
        self.traffic = traffic
        self.agent = Agent(root / device_id, shared_host_profile(profile), list(trusted_keys),
                           feedback=True, concurrency=1)
        link = LinkSettings(BrokerSettings.from_url(broker_url), fleet, device_id,
                            backoff_min_s=0.2, backoff_max_s=2.0, ack_timeout_s=5.0)
        self.run: AgentRun = AgentRun.build(self.agent, window_s=window_s, link=link,
                                            labels=dict(labels or {}),
                                            fleet_keys=TrustStore.from_paths(fleet_keys))
        self.counts = _Counts()
        self.online = True
        self._random = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SimDevice:
        self.run.start(port=None)
        if self.traffic is not None:
            self._thread = threading.Thread(target=self._serve, daemon=True,
                                            name=f"traffic-{self.device_id}")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.run.stop()

    def go_offline(self) -> None:
        """Lose the connection without a goodbye (the broker publishes the Last Will)."""
        self.online = False
        self.run.disconnect(clean=False)

    def come_back(self) -> None:
        self.online = True
        self.run.reconnect()

    def active_version(self, model: str) -> str | None:
        try:
            return str(self.agent.active_version(model))
        except ModelNotFoundError:
            return None

    def _serve(self) -> None:
        traffic = self.traffic
        assert traffic is not None
        count = len(next(iter(traffic.inputs.values())))
        period = 1.0 / traffic.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            i = self._random.randrange(count)
            try:
                result = self.agent.predict(
                    traffic.model, {k: v[i:i + 1] for k, v in traffic.inputs.items()},
                    request_key=f"{self.device_id}-{i % 97}")
            except ModelNotFoundError:
                self._stop.wait(0.2)  # nothing installed yet
                next_at = time.monotonic()
                continue
            except Exception as exc:  # the device keeps serving whatever one request does
                self.counts.requests += 1
                self.counts.errors += 1
                if not isinstance(exc, EdgeserveError):
                    log.warning("%s: unexpected %s", self.device_id, type(exc).__name__)
            else:
                self.counts.requests += 1
                self.counts.by_version[result.version] += 1
                if traffic.feedback and traffic.labels is not None and result.request_id:
                    self._feedback(result.request_id, result.outputs, int(traffic.labels[i]))
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    def _feedback(self, request_id: str, outputs: Mapping[str, Any], label: int) -> None:
        scores = np.asarray(next(iter(outputs.values())))
        reward = float(int(np.argmax(scores.reshape(scores.shape[0], -1)[0])) == label)
        try:
            self.agent.feedback(request_id, reward=reward, label=label)
        except EdgeserveError as exc:
            log.debug("feedback refused: %s", exc)


class SimFleet:
    """Many :class:`SimDevice` s, started and stopped together."""

    def __init__(self, devices: list[SimDevice]) -> None:
        self.devices = devices

    @classmethod
    def build(cls, count: int, profiles: list[str], root: Path, trusted_keys: Iterable[Path],
              broker_url: str, fleet: str, traffic: Traffic | None = None,
              window_s: float = 2.0, prefix: str = "dev",
              ids: Iterable[int] | None = None, fleet_keys: Iterable[Path] = ()) -> SimFleet:
        """``count`` devices ``{prefix}-000`` … (or only the numbers in ``ids``), obeying
        desired state signed with ``fleet_keys`` (:attr:`FleetChild.fleet_public_key`)."""
        keys, pinned = list(trusted_keys), list(fleet_keys)
        devices = [
            SimDevice(f"{prefix}-{i:03d}", profiles[i % len(profiles)], root, keys, broker_url,
                      fleet, window_s=window_s, labels={"site": f"site-{i % 3}"},
                      traffic=traffic, seed=i, fleet_keys=pinned)
            for i in (range(count) if ids is None else ids)]
        return cls(devices)

    def start(self, short_switch: bool | None = None) -> SimFleet:
        """Start every device. ``short_switch`` (default: with at most 50 devices) sets a 1 ms
        GIL switch interval for this process.

        Devices share one interpreter: with the default 5 ms interval a request can wait that
        long for the GIL, blurring the latency differences rollout gates look at. A shorter
        interval helps a few dozen lightly loaded devices, but every thread that wants the GIL
        is switched in once per interval, so on a saturated machine (hundreds of devices) it
        turns into a thousand context switches per thread per second."""
        if short_switch if short_switch is not None else len(self.devices) <= 50:
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        for device in self.devices:
            device.start()
        return self

    def stop(self) -> None:
        threads = [threading.Thread(target=d.stop) for d in self.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    def versions(self, model: str) -> Counter[str | None]:
        return Counter(d.active_version(model) for d in self.devices)

    def wait_for(self, predicate: Any, timeout: float, interval: float = 0.25) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return bool(predicate())


class ProcessFleet:
    """Many devices spread over worker processes (``SimFleet.build`` arguments, split evenly).

    One interpreter holds a few dozen devices well; hundreds need more than one, because their
    four threads each (traffic, monitor, link, updater) queue for one GIL. Each worker runs an
    ordinary :class:`SimFleet` and answers :meth:`versions` over a pipe. ``nice`` lowers the
    workers' CPU priority, so that the fleet service, which in production has a machine of its
    own, is not starved by a thousand device threads on the same two cores.

    Workers die with the process that built the fleet (see :mod:`edgeserve._process`); start it
    from a thread that lives as long as the workers should.
    """

    def __init__(self, count: int, processes: int, profiles: list[str], root: Path,
                 trusted_keys: Iterable[Path], broker_url: str, fleet: str,
                 traffic: Traffic | None = None, window_s: float = 2.0,
                 prefix: str = "dev", nice: int = 0, fleet_keys: Iterable[Path] = ()) -> None:
        self.count = count
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Any]] = []
        ids = list(range(count))
        for n in range(max(1, min(processes, count))):
            mine = ids[n::max(1, min(processes, count))]
            parent, child = context.Pipe()
            process = context.Process(
                target=_fleet_worker, name=f"sim-fleet-{n}", daemon=True,
                args=(os.getpid(), child, mine, profiles, root, list(trusted_keys), broker_url,
                      fleet, traffic, window_s, prefix, nice, list(fleet_keys)))
            self._workers.append((process, parent))

    def start(self, timeout: float = 300.0) -> ProcessFleet:
        try:
            for process, _ in self._workers:
                process.start()
            for process, pipe in self._workers:
                if not pipe.poll(timeout):
                    raise EdgeserveError(f"{process.name} did not start its devices within "
                                         f"{timeout:g} s")
                reply = pipe.recv()
                if reply != "started":
                    raise EdgeserveError(f"{process.name} failed to start its devices: {reply}")
        except BaseException:  # Ctrl-C too: no worker outlives a failed start
            self.stop()
            raise
        return self

    def versions(self, model: str) -> Counter[str | None]:
        total: Counter[str | None] = Counter()
        for _, pipe in self._workers:
            pipe.send(("versions", model))
            total.update(pipe.recv())
        return total

    def stop(self, timeout: float = 60.0) -> None:
        """Ask every worker to stop its devices; kill those still running after ``timeout``."""
        started = [(process, pipe) for process, pipe in self._workers
                   if process.pid is not None]  # start() may have failed part-way
        for process, pipe in started:
            if process.is_alive():
                with contextlib.suppress(OSError):  # it is going already
                    pipe.send(("stop", None))
        deadline = time.monotonic() + timeout
        for process, _ in started:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def _fleet_worker(parent_pid: int, pipe: Any, ids: list[int], profiles: list[str], root: Path,
                  keys: list[Path], broker_url: str, fleet: str, traffic: Traffic | None,
                  window_s: float, prefix: str, nice: int, fleet_keys: list[Path]) -> None:
    """One :class:`ProcessFleet` worker: build and start its devices, answer, stop."""
    die_with_parent(parent_pid)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if nice:
        os.nice(nice)
    try:
        devices = SimFleet.build(len(ids), profiles, root, keys, broker_url, fleet, traffic,
                                 window_s, prefix, ids, fleet_keys).start(short_switch=False)
    except Exception as exc:
        pipe.send(f"{type(exc).__name__}: {exc}")
        return
    pipe.send("started")
    try:
        while True:
            command, argument = pipe.recv()
            if command == "stop":
                break
            pipe.send(devices.versions(argument))
    except EOFError:
        pass  # the parent went away
    finally:
        devices.stop()


@dataclass
class FleetChild:
    """``edgeserve fleet serve`` in a child process, sharing a work directory with the caller.

    The fleet is its own service in production; running it in its own process here also keeps
    its work (queries, JSON, sketch merges) from competing with the simulated devices for this
    interpreter, which would otherwise show up as latency in the very gates being tested. The
    caller reads and writes the same SQLite store and artifact directory.

    The child dies with its parent, even a SIGKILLed one, and takes its embedded broker with it
    (see :mod:`edgeserve._process`); call :meth:`start` from a long-lived thread.
    """

    fleet: str
    work: Path
    trusted_key: Path
    broker_port: int
    http_port: int
    broker: str | None = None
    tick_s: float = 0.5
    public_url: str | None = None
    """the artifact base URL desired state names (default: the fleet's own HTTP address)"""
    fleet_key: Path | None = None
    """the fleet's desired-state signing key (default WORK/fleet.key, made when missing)"""
    process: subprocess.Popen[bytes] | None = None

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.work / 'fleet.db'}"

    @property
    def fleet_public_key(self) -> Path:
        """What the simulated devices pin (``fleet serve`` makes it on its first start)."""
        key = self.fleet_key or self.work / "fleet.key"
        return key.with_name(key.stem + ".pub.pem")

    @property
    def artifacts_dir(self) -> Path:
        return self.work / "artifacts"

    @property
    def broker_url(self) -> str:
        return self.broker or f"mqtt://127.0.0.1:{self.broker_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> FleetChild:
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "edgeserve", "fleet", "serve", "--fleet", self.fleet,
                "--db", self.db_url, "--artifacts", str(self.artifacts_dir), "--trusted-key",
                str(self.trusted_key), "--http-port", str(self.http_port), "--rollout-tick",
                str(self.tick_s), "--log-level", "warning"]
        args += ["--broker", self.broker] if self.broker else \
            ["--broker-port", str(self.broker_port)]
        args += ["--public-url", self.public_url] if self.public_url else []
        args += ["--fleet-key", str(self.fleet_key or self.work / "fleet.key")]
        with (logs / "fleet.log").open("ab") as log_file:
            self.process = popen(args, stdout=log_file, stderr=log_file)
        try:
            self._wait_ready(self.process, timeout, logs / "fleet.log")
        except BaseException:  # Ctrl-C too: a child that never became ready is not left behind
            self.stop()
            raise
        return self

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise EdgeserveError(f"the fleet service exited with {process.returncode}; "
                                     f"see {log}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise EdgeserveError(f"the fleet service did not start within {timeout:g} s; see {log}")

    def metric(self, name: str) -> float:
        """One unlabelled value from the fleet's Prometheus ``/metrics``."""
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the service stops its broker and flushes); SIGKILL after ``timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
