"""The rollout controller: the I/O around the pure engine.

Once per tick it (1) stores the ``reported`` messages devices sent since the last tick, (2)
applies operator actions queued by the CLI or API, (3) for every running rollout builds a
:class:`~.engine.Snapshot` — devices in scope with what they report, canary and control cohort
health since the stage began — feeds it to :func:`~.engine.step`, writes the resulting desired
state, and persists the new state with an event row (the dashboard's history), and (4) publishes
every unpublished desired revision, retained.

One controller runs per fleet: on PostgreSQL it holds an advisory lock for its lifetime (a second
one waits as a standby); SQLite stores are single-process.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from typing import Any

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeserve.contract import (
    Desired,
    FileRequest,
    Reported,
    decode,
    device_topic,
    encode,
    fleet_filter,
    parse_topic,
    sign_desired,
)
from edgeserve.errors import EdgeserveError

from ..artifact_tokens import ArtifactTokens
from ..artifacts import ArtifactStore
from ..connection import BrokerSettings, connect, fail_over
from ..deltas import DeltaCache
from ..desired import DesiredStates, ModelChange
from ..files import FileGate, answer_file_request, refusal
from ..leader import LeaderLoop
from ..registry import list_devices
from ..store import Store
from ..tables import device_models
from ..transfers import TransferLog
from .engine import (
    DeviceView,
    Event,
    Pause,
    Promote,
    Resume,
    Rollback,
    RolloutSpec,
    RolloutState,
    SetDesired,
    Snapshot,
    Tick,
    step,
)
from .metrics import cohort_metrics
from .repo import RolloutRecord, Rollouts

__all__ = ["RolloutController", "device_views", "in_scope"]

log = logging.getLogger(__name__)
_EVENT_EVERY_S = 2.0
DESIRED_VALIDITY_S = 30 * 86400.0
"""How long a signed desired state stays valid; it is signed again after half of that."""
WARMUP_S = 1.0
"""Canary traffic in the first second after activation (model load, cache warm-up) is not judged."""
_FAILED_STATES = ("rolled-back", "unhealthy", "failed")
"""Reported states that count against a rollout (``retrying`` is delivery still under way)."""


def in_scope(spec: RolloutSpec, profile: str | None, labels: dict[str, str],
             device_id: str) -> bool:
    sel = spec.selector
    if sel.devices and device_id not in sel.devices:
        return False
    if sel.profiles and profile not in sel.profiles:
        return False
    return all(labels.get(k) == v for k, v in sel.labels.items())


def device_views(store: Store, spec: RolloutSpec, now: float) -> list[DeviceView]:
    """Devices in the rollout's scope, with the model's state as each reports it."""
    with store.read() as conn:
        reports = {r.device_id: r for r in conn.execute(
            sa.select(device_models).where(device_models.c.model == spec.model))}
    views = []
    for device in list_devices(store):
        if not in_scope(spec, device.profile, device.labels, device.device_id):
            continue
        report = reports.get(device.device_id)
        last_seen = max(device.last_seen, report.updated if report is not None else 0.0)
        online = device.state != "offline"
        if report is None:
            views.append(DeviceView(device_id=device.device_id, online=online,
                                    last_seen=last_seen, active=device.models.get(spec.model)))
            continue
        views.append(DeviceView(
            device_id=device.device_id, online=online, last_seen=last_seen,
            active=report.active, shadow=report.shadow, state=report.state,
            last_error=report.error_message if report.state in _FAILED_STATES else None,
            error_version=report.error_version))
    return views


class RolloutController:
    def __init__(self, store: Store, artifacts: ArtifactStore, broker: BrokerSettings,
                 fleet: str, public_url: str, fleet_key: Ed25519PrivateKey,
                 client_id: str | None = None, tick_s: float = 1.0,
                 desired_validity_s: float = DESIRED_VALIDITY_S,
                 desired_connections: int = 1) -> None:
        self.store = store
        self.fleet_key = fleet_key
        self.tokens = ArtifactTokens.from_key(fleet_key)
        self.desired_validity_s = desired_validity_s
        self.artifacts = artifacts
        self.broker = broker
        self.fleet = fleet
        self.desired = DesiredStates(store, artifacts, public_url)
        self.files = FileGate(self.desired.get)
        self.deltas = DeltaCache(artifacts)
        self.transfers = TransferLog(artifacts.root)
        self.rollouts = Rollouts(store)
        self.client_id = client_id or f"edgeserve-rollouts-{fleet}"
        self.tick_s = tick_s
        self._client: mqtt.Client | None = None
        if not 1 <= desired_connections <= 64:
            raise EdgeserveError(f"desired_connections {desired_connections} is out of range: "
                                 "1 to 64")
        self.desired_connections = desired_connections
        self._publishers: list[mqtt.Client] = []
        """connections desired states go out on, a device's always on the same one: a broker
        that stores retained messages one at a time per connection (NATS) takes them faster
        over several"""
        self.published_per_connection = [0] * desired_connections
        self._reports: dict[str, tuple[Reported, float]] = {}
        self._lock = threading.Lock()
        self._last_event: dict[str, tuple[float, str]] = {}
        self._loop = LeaderLoop(store, "edgeserve-rollouts", fleet, self.tick, tick_s)
        self.bad_reports = 0
        self.revisions_ahead = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._client = connect(self.broker, self.client_id, self._prepare, lambda v: None)
        self._client.loop_start()
        self._publishers = [self._client]
        for k in range(1, self.desired_connections):
            # spread over the broker's nodes; no subscriptions, so nothing waits in a session
            publisher = connect(self.broker.starting_at(k), f"{self.client_id}-p{k}",
                                self._prepare_publisher, lambda v: None)
            publisher.loop_start()
            self._publishers.append(publisher)
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        for client in self._publishers or ([self._client] if self._client else []):
            client.disconnect()
            client.loop_stop()
        self._publishers = []

    def _prepare_publisher(self, client: mqtt.Client) -> None:
        def on_connect(client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
            if reason.is_failure:
                fail_over(client, f"refused the connection ({reason})")
        client.on_connect = on_connect

    def _publisher(self, device_id: str) -> mqtt.Client:
        """The connection ``device_id``'s desired states go out on (its revisions in order)."""
        publishers = self._publishers
        index = 0 if len(publishers) == 1 else zlib.crc32(device_id.encode()) % len(publishers)
        self.published_per_connection[index] += 1
        return publishers[index]

    def _prepare(self, client: mqtt.Client) -> None:
        client.on_message = self._on_message
        client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        """Subscribe on every connect: a reconnect may land on a broker (node) without this
        client's session, e.g. after failing over to a standby broker."""
        if reason.is_failure:
            fail_over(client, f"refused the connection ({reason})")
            return
        client.subscribe(fleet_filter(self.fleet, "reported"), qos=1)
        # chunked artifact transfer for devices that only speak MQTT
        client.subscribe(f"{fleet_filter(self.fleet, 'files')[:-2]}/req", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # an exception here would end paho's network thread, and with it desired state
        try:
            self._handle_message(client, msg)
        except Exception:
            self.bad_reports += 1
            if self.bad_reports <= 20 or self.bad_reports % 1000 == 0:
                log.exception("dropped a message on %s that raised", msg.topic[:200])

    def _handle_message(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/files/req"):
            self._on_file_request(client, msg)
            return
        if not msg.payload:
            return  # a cleared retained report (the device was removed)
        try:
            topic = parse_topic(msg.topic)
            report = decode(Reported, msg.payload, msg.topic)
            if report.device_id != topic.device_id:
                raise EdgeserveError(f"{msg.topic}: report names device {report.device_id}")
        except EdgeserveError as exc:
            self.bad_reports += 1
            log.warning("dropping bad reported payload: %s", exc)
            return
        with self._lock:
            self._reports[report.device_id] = (report, time.time())

    def _on_file_request(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = parse_topic(msg.topic)
            request = decode(FileRequest, msg.payload, msg.topic)
        except EdgeserveError as exc:
            self.bad_reports += 1
            log.warning("dropping bad file request: %s", exc)
            return
        answer_at_all, why = self.files.admit(topic.device_id, request)
        if not answer_at_all:
            return  # over its rate: dropped unanswered (no amplification)
        answer = refusal(request, why) if why else answer_file_request(
            self.artifacts, request, self.deltas, self.transfers, topic.device_id)
        client.publish(device_topic(self.fleet, topic.device_id, "files", "data"), encode(answer),
                       qos=1)

    # -- one tick ---------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._store_reports()
        for rollout_id, action, reason, _ in self.rollouts.take_actions():
            self._handle(rollout_id, action, reason, now)
        for record in self.rollouts.find(active_only=True):
            self._advance(record, Tick(snapshot=self.snapshot(record, now)), now)
        self.publish_pending()

    def _store_reports(self) -> None:
        with self._lock:
            reports, self._reports = self._reports, {}
        if not reports:
            return
        try:
            self._write_reports(reports)
        except BaseException:
            # nothing is lost: the reports wait for the next tick, unless a newer one came
            with self._lock:
                self._reports = {**reports, **self._reports}
            raise

    def _write_reports(self, reports: dict[str, tuple[Reported, float]]) -> None:
        rows: list[dict[str, Any]] = []
        for device_id, (report, received) in reports.items():
            for model, m in report.models.items():
                error = m.last_error
                rows.append({"device_id": device_id, "model": model, "active": m.active,
                             "previous": m.previous, "shadow": m.shadow, "state": m.state,
                             "target": m.target, "progress": m.progress,
                             "traffic": json.dumps(m.traffic),
                             "error_code": error.code if error else None,
                             "error_message": error.message if error else None,
                             "error_version": error.version if error else None,
                             "revision": report.revision, "updated": received,
                             "active_since": m.active_since})
        self._check_revisions({d: r.revision for d, (r, _) in reports.items()})
        keys = [(str(r["device_id"]), str(r["model"])) for r in rows]
        with self.store.write() as conn:
            # a report lists every model the device manages: rows for others are gone
            for device_id, (report, _) in reports.items():
                conn.execute(sa.delete(device_models).where(
                    device_models.c.device_id == device_id,
                    device_models.c.model.not_in(list(report.models))))
            for device_id, model in keys:
                conn.execute(sa.delete(device_models).where(
                    device_models.c.device_id == device_id, device_models.c.model == model))
            if rows:
                conn.execute(sa.insert(device_models), rows)

    def _check_revisions(self, reported: dict[str, int]) -> None:
        """A device that applied a revision the fleet never wrote: say so, and continue above
        it (a fleet restored from an old backup, or - before signing - a forged message)."""
        ours = self.desired.revisions(list(reported))
        for device_id, revision in reported.items():
            if revision > ours.get(device_id, 0):
                log.warning("device %s reports desired revision %d, ahead of the fleet's %d: "
                            "another publisher, or a fleet store older than the device's "
                            "state; the fleet's next revision for it will be %d", device_id,
                            revision, ours.get(device_id, 0), revision + 1)
                self.desired.skip_to(device_id, revision)
                self.revisions_ahead += 1

    def _handle(self, rollout_id: str, action: str, reason: str, now: float) -> None:
        try:
            record = self.rollouts.get(rollout_id)
        except EdgeserveError:
            return
        event: Event
        if action == "promote":
            event = Promote(now=now)
        elif action == "pause":
            event = Pause(now=now)
        elif action == "resume":
            event = Resume(now=now)
        else:
            event = Rollback(now=now, reason=reason or "rolled back by operator")
        self._advance(record, event, now)

    def _canary_since(self, spec: RolloutSpec, state: RolloutState) -> dict[str, float]:
        """Per canary device: judge windows from when its new version started answering (plus
        a short warm-up), never from before the stage began."""
        with self.store.read() as conn:
            rows = conn.execute(sa.select(device_models.c.device_id,
                                          device_models.c.active_since).where(
                device_models.c.model == spec.model,
                device_models.c.device_id.in_(list(state.assigned)))).all()
        started = {r.device_id: r.active_since for r in rows if r.active_since is not None}
        return {d: max(state.stage_started, started.get(d, state.stage_started) + WARMUP_S)
                for d in state.assigned}

    def snapshot(self, record: RolloutRecord, now: float) -> Snapshot:
        spec, state = record.spec, record.state
        views = device_views(self.store, spec, now)
        assigned = self._canary_since(spec, state)
        control_devices = [v.device_id for v in views if v.device_id not in assigned]
        since = state.stage_started
        refs = self.artifacts.reference
        if spec.strategy == "blue-green" and state.bg_step == "shadow":
            previous = {v for v in state.assigned.values() if v}
            canary = cohort_metrics(self.store, spec.model, since, assigned,
                                    shadow_of=next(iter(previous)) if len(previous) == 1 else None,
                                    version=None if len(previous) == 1 else spec.version,
                                    references=refs)
            control = cohort_metrics(self.store, spec.model, since, assigned,
                                     exclude_version=spec.version, references=refs)
        else:
            canary = cohort_metrics(self.store, spec.model, since, assigned, version=spec.version,
                                    references=refs)
            # the control is measured over the same span as the canary, so that whatever else
            # slowed the fleet meanwhile weighs on both sides of a relative gate
            span = min(assigned.values(), default=since)
            control = cohort_metrics(self.store, spec.model, span, dict.fromkeys(
                control_devices, span), exclude_version=spec.version, references=refs)
        return Snapshot(now=now, devices=views, canary=canary,
                        control=control if control.requests else None)

    def _advance(self, record: RolloutRecord, event: Event, now: float) -> None:
        new_state, commands = step(record.spec, record.state, event)
        self._apply(record.spec, commands)
        self.rollouts.save(record, new_state, now)
        self._record_events(record, new_state, event, now)

    def _apply(self, spec: RolloutSpec, commands: list[SetDesired]) -> None:
        """Write every device's next desired revision in one transaction."""
        self.desired.set_models([
            ModelChange(c.device_id, c.model, c.active, shadow=c.shadow,
                        shadow_rate=spec.shadow_sample_rate, health=spec.health,
                        rollout=spec.id) for c in commands])

    def _record_events(self, record: RolloutRecord, state: RolloutState, event: Event,
                       now: float) -> None:
        seen = set(record.state.history)
        new = [entry for entry in state.history if entry not in seen]
        snapshot = event.snapshot if isinstance(event, Tick) else None
        data: dict[str, Any] = {
            "gates": [g.model_dump() for g in state.gate_results],
            "assigned": len(state.assigned), "phase": state.phase,
        }
        if snapshot is not None:
            data["canary"] = snapshot.canary.model_dump()
            data["control"] = snapshot.control.model_dump() if snapshot.control else None
            data["converged"] = sum(1 for d in snapshot.devices
                                    if d.device_id in state.assigned
                                    and d.active == record.spec.version)
            data["in_scope"] = len(snapshot.devices)
        for entry in new:
            self.rollouts.add_event(record.id, entry.ts, entry.stage, entry.event, entry.detail,
                                    data)
        last_ts, _ = self._last_event.get(record.id, (0.0, ""))
        if not new and now - last_ts >= _EVENT_EVERY_S and snapshot is not None:
            self.rollouts.add_event(record.id, now, state.stage, "gates", "", data)
            self._last_event[record.id] = (now, "gates")
        elif new:
            self._last_event[record.id] = (now, new[-1].event)

    # -- desired state ----------------------------------------------------------------------------

    def _signed(self, device_id: str, desired: Desired) -> bytes:
        """The retained payload: bound to the device, valid for ``desired_validity_s``, each
        HTTP version carrying the device's download token for it."""
        models = {name: model.model_copy(update={"versions": {
            version: ref.model_copy(update={"token": self.tokens.mint(device_id, name, version)})
            if ref.transport == "http" else ref for version, ref in model.versions.items()}})
            for name, model in desired.models.items()}
        bound = desired.model_copy(update={"device_id": device_id, "models": models,
                                           "expires": time.time() + self.desired_validity_s})
        return encode(sign_desired(bound, self.fleet_key))

    def publish_pending(self) -> int:
        """Publish every unpublished desired revision (signed, retained, QoS 1), and sign again
        those published more than half their validity ago, so a device that reconnects after
        weeks still finds a valid one."""
        if self._client is None:
            return 0
        self.desired.republish_before(time.time() - self.desired_validity_s / 2)
        sent: list[tuple[str, int]] = []
        try:
            for device_id, desired in self.desired.unpublished():
                info = self._publisher(device_id).publish(
                    device_topic(self.fleet, device_id, "desired"),
                    self._signed(device_id, desired), qos=1, retain=True)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    sent.append((device_id, desired.revision))
        finally:  # what went out is marked, in one transaction, even if a later one failed
            self.desired.mark_published_many(sent)
        return len(sent)

    def republish_all(self) -> None:
        """Re-send every device's newest desired state (e.g. after a broker lost its retained)."""
        if self._client is None:
            return
        for device_id, desired in self.desired.all():
            self._publisher(device_id).publish(device_topic(self.fleet, device_id, "desired"),
                                               self._signed(device_id, desired), qos=1,
                                               retain=True)
