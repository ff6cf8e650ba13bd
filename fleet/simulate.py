"""Thousands of simulated devices in one asyncio process, speaking the device contract exactly.

Each :class:`SimDevice` is what a fleet sees of an agent (``device_agent/telemetry/link.py``):

- an MQTT 3.1.1 session of its own (client id ``{device_id}@{fleet}``, ``clean_session=False``)
  with a retained Last Will on ``status`` (offline, ``connection lost``, ``ts`` = the connect
  time), and a retained birth message (online, agent version, profile, active models, labels)
  after every connect;
- telemetry: contract :class:`~edgeserve.contract.Window` documents, numbered from 1 without
  gaps, sent oldest first in :class:`~edgeserve.contract.TelemetryBatch` es whose ``floor`` is
  the lowest unacked number; the backlog stays until an :class:`~edgeserve.contract.Ack` covers
  it and is sent again after every reconnect, after ``ack_timeout_s`` without progress, and at
  once when the fleet announces itself live without a resumed session (as the agent does);
- desired state in (the fleet-signed document, verified against ``fleet_key`` when given),
  reported state out: the desired versions are "installed" without downloading anything (the
  artifact fetch is stubbed by the manifest hash the desired state names), and committed, or
  rolled back with a ``HealthCheckFailed`` error for versions it was told are bad.

Windows are not stored: one device's backlog is two numbers (acked, newest) and the window for a
sequence number is rebuilt from a template encoded once by the contract's own class, so the bytes
are those an agent's outbox would send (checked when a template is made). That keeps a device
at a few KiB (measured in docs/scale-out.md), so 10,000 fit in one process. The simulator counts
exactly what it produced and sent, for tests and ``bench/`` to hold the fleet's store against.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import resource
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve import __version__
from edgeserve.contract import (
    Ack,
    Desired,
    ErrorInfo,
    FleetStatus,
    Health,
    ModelReport,
    Reported,
    SignedDesired,
    Status,
    Window,
    check_id,
    decode,
    device_topic,
    encode,
    fleet_status_topic,
    open_desired,
)
from edgeserve.errors import ConfigError, ContractError, EdgeserveError
from edgeserve.mqtt import BrokerSettings
from edgeserve.telemetry import LatencyHistogram

from .sim_mqtt import MqttClient, MqttError, Will

__all__ = ["Scenario", "SimDevice", "SimSettings", "Simulator", "raise_open_files_limit",
           "run_scenario", "window_bytes"]

log = logging.getLogger(__name__)

_VARIANTS = 8
"""window shapes per model version (request counts, latencies); every 8th window is health"""
_SENTINEL_SEQ = 987654321987
_SENTINEL_START = 1234567890.25
_SENTINEL_END = 1234567950.25
_WINDOW_S = 60.0


# -- windows --------------------------------------------------------------------------------------

_Key = tuple[tuple[tuple[str, str], ...], int]
_templates: dict[_Key, tuple[bytes, bytes, bytes, bytes]] = {}


def _window(seq: int, start: float, models: tuple[tuple[str, str], ...], variant: int,
            length: float = _WINDOW_S) -> Window:
    """The contract window a device running ``models`` records (health when none or variant 0)."""
    if not models or variant == 0:
        return Window(seq=seq, start=start, end=start + length,
                      health=Health(mem_used_mb=412.0 + variant, mem_total_mb=3793.0,
                                    disk_free_mb=20480.5, cpu_load=0.25, temp_c=48.5))
    model, version = models[variant % len(models)]
    hist = LatencyHistogram()
    requests = 40 + 7 * variant
    for k in range(requests - variant % 3):
        hist.add(1.0 + ((variant * 7 + k * 13) % 50) / 10)
    return Window(seq=seq, start=start, end=start + length, model=model, version=version,
                  requests=requests, errors=variant % 3, latency=hist.to_data())


def _template(models: tuple[tuple[str, str], ...], variant: int
              ) -> tuple[bytes, bytes, bytes, bytes]:
    key = (models, variant)
    found = _templates.get(key)
    if found is not None:
        return found
    raw = _window(_SENTINEL_SEQ, _SENTINEL_START, models, variant).model_dump_json(
        exclude_none=True).encode()
    parts = []
    rest = raw
    for marker in (f'"seq":{_SENTINEL_SEQ}', f'"start":{_SENTINEL_START!r}',
                   f'"end":{_SENTINEL_END!r}'):
        head, sep, rest = rest.partition(marker.encode())
        if not sep:
            raise ContractError(f"the window encoding changed: {marker} not found in {raw[:200]!r}")
        parts.append(head + marker.split(":")[0].encode() + b":")
    template = (parts[0], parts[1], parts[2], rest)
    start = 1_800_000_000.0
    real = _window(3, start, models, variant, 7.5).model_dump_json(exclude_none=True).encode()
    if _fill(template, 3, start, 7.5) != real:
        raise ContractError("the simulator's window template no longer matches the contract's "
                            f"encoding: {_fill(template, 3, start, 7.5)[:200]!r} != "
                            f"{real[:200]!r}")
    _templates[key] = template
    return template


def _fill(template: tuple[bytes, bytes, bytes, bytes], seq: int, start: float,
          length: float = _WINDOW_S) -> bytes:
    a, b, c, d = template
    return b"".join((a, str(seq).encode(), b, repr(start).encode(), c,
                     repr(start + length).encode(), d))


def window_bytes(seq: int, start: float, models: Mapping[str, str],
                 length: float = _WINDOW_S) -> bytes:
    """The JSON of window ``seq`` (``length`` seconds from ``start``) of a device running
    ``models``: the exact bytes ``Window(...).model_dump_json(exclude_none=True)`` gives, as an
    agent sends."""
    frozen = tuple(sorted(models.items()))
    return _fill(_template(frozen, seq % _VARIANTS), seq, start, length)


# -- settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimSettings:
    """A simulated fleet of devices; every field but ``broker``, ``fleet``, ``devices`` has a
    default."""

    broker: BrokerSettings
    fleet: str
    devices: int
    prefix: str = "sim-"
    """device ids are ``{prefix}{n:05d}``, n from 1"""
    first: int = 1
    profile: str = "simulated"
    labels: Mapping[str, str] = field(default_factory=dict)
    models: Mapping[str, str] = field(default_factory=dict)
    """active version per model when the simulation starts (before any desired state)"""
    bad_versions: frozenset[str] = frozenset()
    """``model=version`` (or a bare version) a device reports as failing its health check"""
    fleet_key: Path | None = None
    """the fleet's public key (``fleet serve``'s FLEET.pub.pem); without it desired state is
    read unverified"""
    batch_windows: int = 100
    max_unacked_windows: int = 1000
    ack_timeout_s: float = 30.0
    keepalive: int = 60
    connect_concurrency: int = 256
    connect_timeout_s: float = 20.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    seed: int | None = None
    window_s: float = _WINDOW_S
    """the length of a telemetry window (the agent's ``window_s``; windows align to multiples
    of it, as an agent's do)"""
    spread: bool = False
    """start device n on node n mod the number of nodes (what DNS or a load balancer in front
    of a cluster does), not every device on the first node"""

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet name")
        if not 1 <= self.devices <= 1_000_000:
            raise ConfigError(f"--devices {self.devices} is out of range; expected 1-1000000")
        check_id(self.device_id(self.first + self.devices - 1), "device id")
        if not 0.5 <= self.window_s <= 86400:
            raise ConfigError(f"window_s {self.window_s} is out of range: 0.5 to 86400 seconds")
        if not 1 <= self.batch_windows <= 1000:
            raise ConfigError(f"batch of {self.batch_windows} windows; the contract allows 1-1000")
        if self.max_unacked_windows < self.batch_windows:
            raise ConfigError("max_unacked_windows must be at least batch_windows")
        for model, version in self.models.items():
            check_id(model, "model name")
            if not version:
                raise ConfigError(f"model {model!r} has no version")

    def device_id(self, n: int) -> str:
        return f"{self.prefix}{n:05d}"


# -- one device ------------------------------------------------------------------------------------

class SimDevice:
    """One simulated agent: its MQTT session, its telemetry backlog and its models."""

    __slots__ = ("acked", "acks", "batches_sent", "client", "connect_ts", "connecting", "connects",
                 "desired_seen",
                 "device_id", "hashes", "last_progress", "lost", "models", "newest",
                 "node", "refused", "reported", "reports_sent", "resends", "revision", "segments",
                 "sent", "sim", "topics", "windows_sent")

    def __init__(self, sim: Simulator, device_id: str) -> None:
        self.sim = sim
        self.device_id = device_id
        self.topics = {kind: device_topic(sim.settings.fleet, device_id, kind)  # type: ignore[arg-type]
                       for kind in ("status", "telemetry", "ack", "desired", "reported")}
        self.models: dict[str, str] = dict(sim.settings.models)
        self.segments: list[tuple[int, dict[str, str], float, bool]] = []
        """(first seq, active models, start of the first window, whether the windows after it
        follow minute by minute): when and under which versions each window was recorded, so a
        window sent again is the same bytes"""
        self.hashes: dict[str, dict[str, str]] = {}
        """per model: version -> manifest sha256 "installed" (the stubbed fetch)"""
        self.reported: Reported | None = None
        self.revision = 0
        self.newest = 0
        self.acked = 0
        self.sent = 0
        self.last_progress = 0.0
        self.connect_ts = 0.0
        self.node = 0
        self.lost = False
        self.connecting = False
        self.client: MqttClient | None = None
        self.connects = self.batches_sent = self.windows_sent = self.resends = self.acks = 0
        self.desired_seen = self.reports_sent = self.refused = 0

    # -- telemetry ---------------------------------------------------------------------------------

    def record(self, count: int) -> None:
        """``count`` more windows into the backlog (numbered on from the newest): one is the
        current window (aligned to ``window_s``, as an agent's); several are the last ``count``
        windows' (recorded while away)."""
        if count <= 0:
            return
        length = self.sim.settings.window_s
        current = (time.time() // length) * length
        last = self.segments[-1] if self.segments else None
        if count > 1:
            self.segments.append((self.newest + 1, dict(self.models),
                                  current - length * (count - 1), True))
        elif last is None or last[3] or last[2] != current or last[1] != self.models:
            self.segments.append((self.newest + 1, dict(self.models), current, False))
        self.newest += count

    def window(self, seq: int) -> bytes:
        first, models, start, spread = self.segments[
            bisect.bisect_right(self.segments, seq, key=lambda s: s[0]) - 1]
        length = self.sim.settings.window_s
        return window_bytes(seq, start + length * (seq - first) if spread else start, models,
                            length)

    def flush(self) -> None:
        """Send what is not in flight, oldest first, up to ``max_unacked_windows`` unacked."""
        client = self.client
        if client is None or not client.connected:
            return
        s = self.sim.settings
        while self.sent < self.newest:
            room = min(s.batch_windows, s.max_unacked_windows - (self.sent - self.acked),
                       self.newest - self.sent)
            if room <= 0:
                return
            first = self.sent + 1
            last = self.sent + room
            head = (f'{{"v":1,"device_id":"{self.device_id}","sent":{time.time():.3f},'
                    f'"floor":{min(self.acked + 1, first)},"windows":[').encode()
            payload = head + b",".join(self.window(q) for q in range(first, last + 1)) + b"]}"
            if self.sent == self.acked:
                self.last_progress = time.monotonic()
            client.publish(self.topics["telemetry"], payload, qos=1)
            self.sent = last
            self.batches_sent += 1
            self.windows_sent += room
            self.sim.windows_sent += room

    def resend(self) -> None:
        """Send every unacked window again (the broker or the fleet may have lost them)."""
        if self.sent > self.acked:
            self.resends += 1
        self.sent = self.acked
        self.last_progress = time.monotonic()
        self.flush()

    # -- messages ----------------------------------------------------------------------------------

    def status(self, state: str, reason: str | None = None) -> bytes:
        s = self.sim.settings
        if state == "online":
            return encode(Status(device_id=self.device_id, state="online", ts=self.connect_ts,
                                 agent_version=__version__, profile=s.profile,
                                 models=dict(self.models), labels=dict(s.labels)))
        return encode(Status(device_id=self.device_id, state="offline", ts=self.connect_ts,
                             agent_version=__version__, reason=reason))

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            if topic == self.topics["ack"]:
                self._on_ack(payload)
            elif topic == self.topics["desired"]:
                self._on_desired(payload)
            elif topic == self.sim.fleet_topic:
                self._on_fleet_status(payload, retained)
        except (ContractError, EdgeserveError) as exc:
            self.refused += 1
            self.sim.refused += 1
            if self.sim.refused <= 20:
                log.warning("%s: refused a message on %s: %s", self.device_id, topic, exc)

    def _on_ack(self, payload: bytes) -> None:
        seq = decode(Ack, payload, where=self.topics["ack"]).seq
        self.acks += 1
        if seq > self.newest:
            raise ContractError(f"ack {seq} is above the newest window {self.newest} this "
                                "simulated device ever numbered (is another simulator using "
                                "these device ids on this fleet?)")
        if seq > self.acked:
            self.acked = seq
            self.sent = max(self.sent, seq)
            self.last_progress = time.monotonic()
            self.flush()

    def _on_fleet_status(self, payload: bytes, retained: bool) -> None:
        if not payload:
            return
        status = decode(FleetStatus, payload, where=self.sim.fleet_topic)
        if status.state == "online" and not status.resumed and not retained \
                and self.sent > self.acked:
            self.resend()

    def _on_desired(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        where = self.topics["desired"]
        if self.sim.trust is not None:
            desired = open_desired(payload, self.sim.trust, self.device_id, where=where)
        else:
            envelope = decode(SignedDesired, payload, where)
            desired = decode(Desired, envelope.payload.encode(), f"{where} payload")
            if desired.device_id not in (None, self.device_id):
                raise ContractError(f"{where}: signed for device {desired.device_id!r}")
        self.desired_seen += 1
        if desired.revision <= self.revision:
            return
        self.apply(desired)

    def apply(self, desired: Desired) -> None:
        """Install (stubbed: the hashes are taken as fetched and verified) and commit or roll
        back each desired model, then report."""
        bad = self.sim.settings.bad_versions
        now = time.time()
        reports: dict[str, ModelReport] = {}
        old = self.reported.models if self.reported is not None else {}
        for name, want in desired.models.items():
            hashes = self.hashes.setdefault(name, {})
            for version, ref in want.versions.items():
                hashes[version] = ref.manifest_sha256
            current = self.models.get(name)
            previous = old[name].previous if name in old else None
            installed = sorted(hashes)
            if want.active in bad or f"{name}={want.active}" in bad:
                error = ErrorInfo(code="HealthCheckFailed", version=want.active,
                                  message="health check failed: simulated bad version")
                if current is not None and current != want.active:
                    reports[name] = ModelReport(active=current, previous=previous,
                                                installed=installed, state="rolled-back",
                                                target=want.active, progress=1.0,
                                                active_since=now, last_error=error)
                else:
                    self.models[name] = want.active
                    reports[name] = ModelReport(active=want.active, previous=previous,
                                                installed=installed, state="unhealthy",
                                                target=want.active, progress=1.0,
                                                active_since=now, last_error=error)
                continue
            if current != want.active:
                previous = current
                self.models[name] = want.active
                since = now
            else:
                since = (old[name].active_since if name in old else None) or now
            reports[name] = ModelReport(active=want.active, previous=previous, installed=installed,
                                        state="committed", progress=1.0,
                                        traffic=dict(want.traffic),
                                        shadow=want.shadow.version if want.shadow else None,
                                        active_since=since)
        for name in list(self.models):
            if name not in desired.models:
                del self.models[name]
                self.hashes.pop(name, None)
        self.revision = desired.revision
        self.reported = Reported(device_id=self.device_id, revision=desired.revision, ts=now,
                                 models=reports)
        self.publish_reported()
        client = self.client
        if client is not None and client.connected:  # the birth names the active versions
            client.publish(self.topics["status"], self.status("online"), qos=1, retain=True)

    def publish_reported(self) -> None:
        client = self.client
        if self.reported is None or client is None or not client.connected:
            return
        client.publish(self.topics["reported"], encode(self.reported), qos=1, retain=True)
        self.reports_sent += 1

    # -- the connection ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (trying the broker's nodes in turn), subscribe, birth, report, flush; returns
        at once when a connection is open or being opened already."""
        if self.connecting or (self.client is not None and self.client.open):
            return
        self.connecting = True
        try:
            await self._connect()
        finally:
            self.connecting = False

    async def _connect(self) -> None:
        sim = self.sim
        s = sim.settings
        self.connect_ts = time.time()
        client = self.client
        will = Will(self.topics["status"], self.status("offline", "connection lost"), 1, True)
        if client is None:
            client = MqttClient(f"{self.device_id}@{s.fleet}", on_message=self.on_message,
                                on_lost=self._on_lost, keepalive=s.keepalive,
                                clean_session=False, will=will, username=s.broker.username,
                                password=s.broker.password)
            self.client = client
        client.will = will
        nodes = s.broker.nodes
        errors = []
        for step in range(len(nodes)):
            index = (self.node + step) % len(nodes)
            host, port = nodes[index]
            try:
                await client.connect(host, port, s.connect_timeout_s, sim.ssl_context)
            except (OSError, MqttError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            self.node = index
            break
        else:
            raise MqttError(f"{self.device_id}: cannot connect: " + "; ".join(errors))
        self.lost = False
        wanted = [self.topics["ack"], self.topics["desired"], sim.fleet_topic]
        for attempt in range(5):  # a busy broker cluster may refuse one now and grant it later
            granted = await client.subscribe([(f, s.broker.subscribe_qos) for f in wanted],
                                             s.connect_timeout_s)
            wanted = [f for f, code in zip(wanted, granted, strict=True) if code == 0x80]
            if not wanted:
                break
            sim.subscribe_refusals += 1
            await asyncio.sleep(0.2 * (attempt + 1))
        else:
            raise MqttError(f"{self.device_id}: the broker refused the subscription to "
                            f"{wanted} five times")
        client.publish(self.topics["status"], self.status("online"), qos=1, retain=True)
        self.publish_reported()
        self.connects += 1
        self.sim.connects += 1
        self.resend()

    def _on_lost(self, _client: MqttClient, _exc: BaseException | None) -> None:
        self.lost = True
        self.sim.on_device_lost(self)

    def abort(self) -> None:
        """Cut the connection without DISCONNECT (the broker publishes the Last Will)."""
        if self.client is not None:
            self.client.abort()

    async def goodbye(self) -> None:
        """A clean stop: offline ("stopped"), then DISCONNECT."""
        client = self.client
        if client is None or not client.connected:
            return
        packet = client.publish(self.topics["status"], self.status("offline", "stopped"), qos=1,
                                retain=True)
        with contextlib.suppress(MqttError):
            await client.published(packet, 5.0)
        await client.disconnect()

    def counts(self) -> dict[str, int]:
        return {"windows": self.newest, "acked": self.acked, "windows_sent": self.windows_sent,
                "batches_sent": self.batches_sent, "resends": self.resends,
                "connects": self.connects, "acks": self.acks, "reports_sent": self.reports_sent,
                "revision": self.revision}


# -- the simulator ---------------------------------------------------------------------------------

class Simulator:
    """Many :class:`SimDevice` s on one event loop (use it from a coroutine)."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.fleet_topic = fleet_status_topic(settings.fleet)
        self.trust = None
        if settings.fleet_key is not None:
            from edgeserve.signing import TrustStore

            self.trust = TrustStore.from_paths([settings.fleet_key])
        self.ssl_context = _ssl_context(settings.broker)
        self.devices = [SimDevice(self, settings.device_id(n))
                        for n in range(settings.first, settings.first + settings.devices)]
        if settings.spread:
            for index, device in enumerate(self.devices):
                device.node = index % len(settings.broker.nodes)
        self.by_id = {d.device_id: d for d in self.devices}
        self._rng = random.Random(settings.seed)
        self._reconnecting: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self.reconnect = True
        """whether a lost connection is made again (off while cut on purpose)"""
        self.windows_sent = self.connects = self.refused = self.lost = 0
        self.connect_failures = self.subscribe_refusals = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, devices: Iterable[SimDevice] | None = None) -> float:
        """Connect every device (``connect_concurrency`` at a time); returns the seconds it took.
        Raises :class:`MqttError` naming the first device that could not connect."""
        self._semaphore = self._semaphore or asyncio.Semaphore(self.settings.connect_concurrency)
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())
        self.reconnect = True
        begun = time.monotonic()
        await asyncio.gather(*(self._connect(d) for d in (devices or self.devices)))
        return time.monotonic() - begun

    async def _connect(self, device: SimDevice) -> None:
        assert self._semaphore is not None
        async with self._semaphore:
            await device.connect()

    def record(self, windows_each: int, devices: Iterable[SimDevice] | None = None) -> None:
        """Give each device ``windows_each`` more windows and send them (when connected)."""
        for device in devices or self.devices:
            device.record(windows_each)
            device.flush()

    async def produce(self, rate: float, duration_s: float) -> int:
        """Record and send ``rate`` windows per second across the devices (round robin) for
        ``duration_s`` seconds; returns how many."""
        begun = time.monotonic()
        made = 0
        while (elapsed := time.monotonic() - begun) < duration_s:
            for _ in range(int(elapsed * rate) - made):
                device = self.devices[made % len(self.devices)]
                device.record(1)
                device.flush()
                made += 1
            await asyncio.sleep(0.05)
        return made

    async def wait_acked(self, timeout: float, progress: Callable[[int, int], None] | None = None
                         ) -> float:
        """Wait until every device's windows are all acked; returns the seconds it took.
        Raises TimeoutError naming how many devices are behind."""
        begun = time.monotonic()
        deadline = begun + timeout
        total = self.produced
        while True:
            acked = sum(d.acked for d in self.devices)
            if progress is not None:
                progress(acked, total)
            if acked >= total:
                return time.monotonic() - begun
            if time.monotonic() > deadline:
                behind = [d.device_id for d in self.devices if d.acked < d.newest]
                raise TimeoutError(f"{len(behind)} of {len(self.devices)} devices still have "
                                   f"unacked windows after {timeout:g} s ({total - acked} "
                                   f"windows), e.g. {behind[:5]}")
            await asyncio.sleep(0.05)

    async def wait_published(self, timeout: float,
                             progress: Callable[[int, int], None] | None = None) -> float:
        """Wait until the broker acknowledged (PUBACK) everything sent: a publishing benchmark
        without a fleet. Returns the seconds it took; TimeoutError otherwise."""
        begun = time.monotonic()
        total = self.produced
        while True:
            waiting = sum(len(d.client.inflight) for d in self.devices if d.client is not None)
            behind = sum(d.newest - d.sent for d in self.devices)
            if progress is not None:
                progress(total - behind, total)
            if not waiting and not behind:
                return time.monotonic() - begun
            if time.monotonic() - begun > timeout:
                raise TimeoutError(f"{waiting} messages still unacknowledged by the broker and "
                                   f"{behind} windows not sent after {timeout:g} s")
            await asyncio.sleep(0.05)

    async def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(d.client is not None and d.client.connected for d in self.devices):
            if time.monotonic() > deadline:
                missing = sum(1 for d in self.devices
                              if d.client is None or not d.client.connected)
                raise TimeoutError(f"{missing} devices are not connected after {timeout:g} s")
            await asyncio.sleep(0.05)

    def cut(self) -> None:
        """Drop every connection without DISCONNECT and stay away (Last Wills fire)."""
        self.reconnect = False
        for task in list(self._reconnecting):
            task.cancel()
        for device in self.devices:
            device.abort()

    async def storm(self, within_s: float, windows_each: int) -> float:
        """A reconnect storm: every connection is cut at once (no DISCONNECT), each device
        records ``windows_each`` windows while away and comes back at a random moment within
        ``within_s`` seconds. Returns when all are connected again (the seconds it took)."""
        self.cut()
        for _ in range(100):  # the transports report their loss on the next loop turns
            if not any(d.client is not None and d.client.connected for d in self.devices):
                break
            await asyncio.sleep(0.01)
        for device in self.devices:
            device.record(windows_each)
        self.reconnect = True
        begun = time.monotonic()
        assert self._semaphore is not None

        async def back(device: SimDevice) -> None:
            await asyncio.sleep(self._rng.uniform(0, within_s))
            await self._connect_retrying(device)

        await asyncio.gather(*(back(d) for d in self.devices))
        return time.monotonic() - begun

    async def stop(self) -> None:
        """Say offline ("stopped") and disconnect every device; end the background tasks."""
        self.reconnect = False
        for task in list(self._reconnecting):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        sem = asyncio.Semaphore(self.settings.connect_concurrency)

        async def bye(device: SimDevice) -> None:
            async with sem:
                await device.goodbye()

        await asyncio.gather(*(bye(d) for d in self.devices))
        for device in self.devices:
            device.abort()

    async def forget(self) -> None:
        """End every device's broker session (connect with ``clean_session`` and disconnect):
        with MQTT 3.1.1 a broker keeps a persistent session, its subscriptions and queued
        messages, until then. Call after :meth:`stop`."""
        s = self.settings
        sem = asyncio.Semaphore(s.connect_concurrency)

        async def end(device: SimDevice) -> None:
            client = MqttClient(f"{device.device_id}@{s.fleet}", keepalive=0, clean_session=True,
                                username=s.broker.username, password=s.broker.password)
            host, port = s.broker.nodes[device.node]
            async with sem:
                with contextlib.suppress(OSError, MqttError):
                    await client.connect(host, port, s.connect_timeout_s, self.ssl_context)
                    await client.disconnect()

        await asyncio.gather(*(end(d) for d in self.devices))

    # -- reconnecting ------------------------------------------------------------------------------

    def on_device_lost(self, device: SimDevice) -> None:
        self.lost += 1
        if not self.reconnect or device.connecting:
            return
        task = asyncio.get_running_loop().create_task(self._connect_retrying(device, delay=True))
        self._reconnecting.add(task)
        task.add_done_callback(self._reconnecting.discard)

    async def _connect_retrying(self, device: SimDevice, delay: bool = False) -> None:
        """Connect with full-jitter back-off until it works or reconnecting is switched off."""
        s = self.settings
        attempt = 1 if delay else 0
        while self.reconnect:
            if attempt:
                await asyncio.sleep(self._rng.uniform(
                    0, min(s.backoff_max_s, s.backoff_min_s * 2 ** min(attempt, 20))))
                if not self.reconnect:
                    return
            try:
                await self._connect(device)
                return
            except (OSError, MqttError) as exc:
                self.connect_failures += 1
                if self.connect_failures <= 20:
                    log.warning("%s", exc)
                if device.client is not None:
                    device.abort()
                attempt += 1

    async def _tick(self) -> None:
        """Once a second: send again what waited ``ack_timeout_s`` for an ack."""
        timeout = self.settings.ack_timeout_s
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for device in self.devices:
                if device.sent > device.acked and now - device.last_progress > timeout:
                    device.resend()

    # -- counts ------------------------------------------------------------------------------------

    @property
    def produced(self) -> int:
        return sum(d.newest for d in self.devices)

    @property
    def sessions(self) -> int:
        return sum(1 for d in self.devices if d.client is not None and d.client.connected)

    def counts(self) -> dict[str, Any]:
        """What the simulator numbered, sent and had acked: in total and per device."""
        return {
            "devices": len(self.devices), "sessions": self.sessions,
            "windows": self.produced, "acked": sum(d.acked for d in self.devices),
            "windows_sent": self.windows_sent,
            "batches_sent": sum(d.batches_sent for d in self.devices),
            "resends": sum(d.resends for d in self.devices), "connects": self.connects,
            "connections_lost": self.lost, "connect_failures": self.connect_failures,
            "refused_messages": self.refused, "subscribe_refusals": self.subscribe_refusals,
            "reports_sent": sum(d.reports_sent for d in self.devices),
            "per_device": {d.device_id: {"windows": d.newest, "acked": d.acked}
                           for d in self.devices},
        }


def _ssl_context(broker: BrokerSettings) -> ssl.SSLContext | None:
    if not broker.tls:
        return None
    context = ssl.create_default_context(cafile=str(broker.ca_file) if broker.ca_file else None)
    if broker.cert_file is not None and broker.key_file is not None:
        context.load_cert_chain(str(broker.cert_file), str(broker.key_file))
    if broker.tls_insecure:
        context.check_hostname = False
    return context


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's open-files limit (soft, up to the hard limit) to fit ``needed``
    descriptors; returns the limit. :class:`ConfigError` if the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    top = hard if hard != resource.RLIM_INFINITY else max(needed, soft)
    if top < needed:
        raise ConfigError(f"{needed} open files are needed (one per simulated device, plus "
                          f"some) but this process may have at most {hard} (ulimit -Hn); "
                          "simulate fewer devices per process or raise the hard limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    return top


# -- a whole run (the CLI and bench/ use it) --------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """What ``edgeserve fleet simulate`` does after connecting every device."""

    windows_per_device: int = 5
    """backlog each device records once connected, sent at once"""
    rate: float = 0.0
    """then new windows per second across all devices (round robin) ..."""
    duration_s: float = 0.0
    """... for this long"""
    storm_within_s: float | None = None
    """then a reconnect storm: all drop, and return within this many seconds ..."""
    storm_windows: int = 5
    """... each with this many windows recorded while away"""
    acks: bool = True
    """wait for the fleet's acks (False: only for the broker's PUBACKs, no fleet needed)"""
    timeout_s: float = 300.0
    """longest wait for one phase's acks"""
    hold_s: float = 0.0
    """keep the sessions this long at the end (a rollout may run meanwhile)"""
    forget: bool = False
    """end the devices' broker sessions at the end (the broker keeps 3.1.1 sessions otherwise)"""


Progress = Callable[[str, int, int], None]
"""``(phase, done, total)``"""


def _usage() -> tuple[float, int]:
    """CPU seconds of this process and its resident memory in bytes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss * 1024
    with contextlib.suppress(OSError, ValueError, IndexError):
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    return usage.ru_utime + usage.ru_stime, rss


async def _connect_all(sim: Simulator) -> dict[str, Any]:
    """Connect every device; what holding the sessions costs (memory, CPU, idle CPU)."""
    cpu0, rss0 = _usage()
    took = await sim.start()
    cpu1, rss1 = _usage()
    await asyncio.sleep(2.0)
    cpu2, _ = _usage()
    return {"connect_s": round(took, 3), "sessions": sim.sessions,
            "rss_mb": round(rss1 / 2**20, 1),
            "kib_per_session": round((rss1 - rss0) / 1024 / len(sim.devices), 1),
            "connect_cpu_s": round(cpu1 - cpu0, 2),
            "idle_cpu_percent": round((cpu2 - cpu1) / 2.0 * 100, 1)}


async def run_scenario(settings: SimSettings, scenario: Scenario,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Connect every device, then run the phases of ``scenario``; returns the counts and what
    each phase took (CPU, memory, windows/s). Raises TimeoutError or MqttError when a phase
    does not complete."""
    report: dict[str, Any] = {"devices": settings.devices, "fleet": settings.fleet,
                              "broker": settings.broker.url}
    cpu0, _ = _usage()
    sim = Simulator(settings)
    try:
        report.update(await _connect_all(sim))

        async def settle(phase: str, timeout: float) -> float:
            def tell(done: int, total: int) -> None:
                if progress is not None:
                    progress(phase, done, total)
            if scenario.acks:
                return await sim.wait_acked(timeout, tell)
            return await sim.wait_published(timeout, tell)

        if scenario.windows_per_device:
            cpu_a, _ = _usage()
            begun = time.monotonic()
            sim.record(scenario.windows_per_device)  # writes every batch to its socket
            await settle("backlog", scenario.timeout_s)
            took = time.monotonic() - begun
            cpu_b, _ = _usage()
            count = settings.devices * scenario.windows_per_device
            report["backlog"] = {"windows": count, "seconds": round(took, 3),
                                 "windows_per_s": round(count / max(took, 1e-6)),
                                 "cpu_s": round(cpu_b - cpu_a, 2)}
        if scenario.rate > 0 and scenario.duration_s > 0:
            cpu_a, _ = _usage()
            made = await sim.produce(scenario.rate, scenario.duration_s)
            took = await settle("steady", scenario.timeout_s)
            cpu_b, _ = _usage()
            report["steady"] = {"windows": made, "rate": scenario.rate,
                                "drain_s": round(took, 3), "cpu_s": round(cpu_b - cpu_a, 2)}
        if scenario.storm_within_s is not None:
            cpu_a, _ = _usage()
            back = await sim.storm(scenario.storm_within_s, scenario.storm_windows)
            took = await settle("storm", scenario.timeout_s)
            cpu_b, _ = _usage()
            report["storm"] = {"within_s": scenario.storm_within_s,
                               "windows": settings.devices * scenario.storm_windows,
                               "all_back_s": round(back, 3), "acked_after_s": round(took, 3),
                               "cpu_s": round(cpu_b - cpu_a, 2)}
        if scenario.hold_s > 0:
            await asyncio.sleep(scenario.hold_s)
    finally:
        counts = sim.counts()
        await sim.stop()
        if scenario.forget:
            await sim.forget()
    cpu_end, _ = _usage()
    report["cpu_s"] = round(cpu_end - cpu0, 2)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report.update({k: v for k, v in counts.items() if k not in ("devices", "sessions", "per_device")})
    return report
