"""Desired state per device: revisioned documents in the store, published retained over MQTT.

Every change to what a device should run (a rollout stage, a rollback, new experiment weights)
writes a new :class:`~edgeserve.contract.Desired` with the next revision for that device. The
publisher sends unpublished revisions as retained QoS 1 messages on ``devices/{id}/desired``, so a
device that is offline for weeks receives the newest one when it reconnects and ignores any older
revision it might see.

Version references point devices at the artifact endpoint (``{public_url}/v1/packages/…``) and
carry the manifest's sha256; a device labelled ``transport=mqtt`` is told to fetch in chunks over
MQTT instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from edgeserve.contract import Desired, DesiredModel, HealthPolicy, ShadowSpec, VersionRef, decode

from .artifacts import ArtifactStore
from .store import Store
from .tables import desired_state, devices
from .web.artifacts import package_base_url

__all__ = ["DesiredStates", "ModelChange"]

_CHUNK = 500
"""device ids per IN (...) query"""


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


@dataclass(frozen=True)
class ModelChange:
    """One device's model to set (``active=None`` removes it) in its next desired revision."""

    device_id: str
    model: str
    active: str | None
    shadow: str | None = None
    shadow_rate: float = 1.0
    traffic: Mapping[str, float] | None = None
    health: HealthPolicy | None = None
    rollout: str | None = None


class DesiredStates:
    def __init__(self, store: Store, artifacts: ArtifactStore, public_url: str) -> None:
        self.store = store
        self.artifacts = artifacts
        self.public_url = public_url
        self._floors: dict[str, int] = {}
        """per device: a revision it applied from elsewhere, to continue above"""

    def get(self, device_id: str, conn: Connection | None = None) -> Desired | None:
        query = sa.select(desired_state.c.doc).where(desired_state.c.device_id == device_id)
        if conn is None:
            with self.store.read() as c:
                raw = c.execute(query).scalar_one_or_none()
        else:
            raw = conn.execute(query).scalar_one_or_none()
        return None if raw is None else decode(Desired, raw.encode(), f"desired {device_id}")

    def version_ref(self, model: str, version: str, transport: str = "http") -> VersionRef:
        published = self.artifacts.get(model, version)
        return VersionRef(release=published.release, manifest_sha256=published.manifest_sha256,
                          transport="mqtt" if transport == "mqtt" else "http",
                          url=package_base_url(self.public_url, model, version))

    def set_model(self, device_id: str, model: str, active: str | None,
                  shadow: str | None = None, shadow_rate: float = 1.0,
                  traffic: Mapping[str, float] | None = None,
                  health: HealthPolicy | None = None, rollout: str | None = None) -> Desired:
        """Write the next revision with ``model`` set (``active=None`` removes it)."""
        return self.set_models([ModelChange(device_id, model, active, shadow, shadow_rate,
                                            traffic, health, rollout)])[0]

    def set_models(self, changes: Sequence[ModelChange]) -> list[Desired]:
        """Write the next revision of each change's device, all in one transaction: a rollout
        stage over 5,000 devices costs a few queries, not three round trips per device. A
        device named twice gets both changes, in order (two revisions)."""
        if not changes:
            return []
        now = time.time()
        written: list[Desired] = []
        ids = sorted({c.device_id for c in changes})
        with self.store.write() as conn:
            docs: dict[str, Desired | None] = dict.fromkeys(ids)
            labels: dict[str, str] = {}
            for chunk in _chunks(ids):
                for row in conn.execute(sa.select(desired_state.c.device_id, desired_state.c.doc)
                                        .where(desired_state.c.device_id.in_(chunk))):
                    docs[row.device_id] = decode(Desired, row.doc.encode(),
                                                 f"desired {row.device_id}")
                for row in conn.execute(sa.select(devices.c.device_id, devices.c.labels)
                                        .where(devices.c.device_id.in_(chunk))):
                    labels[row.device_id] = row.labels
            existed = {d for d, doc in docs.items() if doc is not None}
            for change in changes:
                current = docs[change.device_id]
                desired = self._changed(current, change, labels.get(change.device_id), now)
                docs[change.device_id] = desired
                written.append(desired)
            rows = [{"key": d, "b_revision": doc.revision,
                     "b_doc": doc.model_dump_json(exclude_none=True)}
                    for d, doc in docs.items() if doc is not None]
            inserts = [r for r in rows if r["key"] not in existed]
            updates = [r for r in rows if r["key"] in existed]
            if inserts:
                conn.execute(sa.insert(desired_state), [
                    {"device_id": r["key"], "revision": r["b_revision"], "doc": r["b_doc"],
                     "updated": now, "published": None} for r in inserts])
            if updates:
                conn.execute(sa.update(desired_state)
                             .where(desired_state.c.device_id == sa.bindparam("key"))
                             .values(revision=sa.bindparam("b_revision"),
                                     doc=sa.bindparam("b_doc"), updated=now, published=None),
                             updates)
        return written

    def _changed(self, current: Desired | None, change: ModelChange, labels: str | None,
                 now: float) -> Desired:
        models = dict(current.models) if current else {}
        model, active = change.model, change.active
        if active is None:
            models.pop(model, None)
        else:
            transport = str((json.loads(labels) if labels else {}).get("transport", "http"))
            arms = dict(change.traffic or {})
            wanted = {active, *arms, *([change.shadow] if change.shadow else [])}
            keep_health = change.health or (models[model].health if model in models
                                            else HealthPolicy())
            models[model] = DesiredModel(
                active=active,
                versions={v: self.version_ref(model, v, transport) for v in sorted(wanted)},
                traffic=arms,
                shadow=(ShadowSpec(version=change.shadow, sample_rate=change.shadow_rate)
                        if change.shadow else None),
                health=keep_health)
        revision = max(current.revision if current else 0,
                       self._floors.get(change.device_id, 0)) + 1
        return Desired(revision=revision, ts=now, models=models,
                       rollout=change.rollout or (current.rollout if current else None))

    def unpublished(self) -> list[tuple[str, Desired]]:
        with self.store.read() as conn:
            rows = conn.execute(sa.select(desired_state.c.device_id, desired_state.c.doc)
                                .where(desired_state.c.published.is_(None))).all()
        return [(r.device_id, decode(Desired, r.doc.encode(), f"desired {r.device_id}"))
                for r in rows]

    def all(self) -> list[tuple[str, Desired]]:
        with self.store.read() as conn:
            rows = conn.execute(sa.select(desired_state.c.device_id, desired_state.c.doc)).all()
        return [(r.device_id, decode(Desired, r.doc.encode(), f"desired {r.device_id}"))
                for r in rows]

    def revisions(self, device_ids: list[str]) -> dict[str, int]:
        """The newest revision the fleet wrote for each device (absent: none yet)."""
        with self.store.read() as conn:
            rows = conn.execute(sa.select(desired_state.c.device_id, desired_state.c.revision)
                                .where(desired_state.c.device_id.in_(device_ids))).all()
        return {r.device_id: int(r.revision) for r in rows}

    def skip_to(self, device_id: str, revision: int) -> None:
        """Continue above ``revision``, which the device applied from elsewhere: the device's
        current document is written again as ``revision + 1`` (same content) and published; with
        no document yet, the next one written starts there (nothing is sent meanwhile: an empty
        document would remove the device's models)."""
        self._floors[device_id] = max(self._floors.get(device_id, 0), revision)
        with self.store.write() as conn:
            current = self.get(device_id, conn)
            if current is None:
                return
            desired = current.model_copy(update={"revision": revision + 1, "ts": time.time()})
            conn.execute(sa.update(desired_state)
                         .where(desired_state.c.device_id == device_id)
                         .values(revision=revision + 1, updated=time.time(), published=None,
                                 doc=desired.model_dump_json(exclude_none=True)))

    def republish_before(self, ts: float) -> int:
        """Mark documents published before ``ts`` for publishing again (re-signing them)."""
        with self.store.write() as conn:
            result = conn.execute(sa.update(desired_state)
                                  .where(desired_state.c.published < ts)
                                  .values(published=None))
        return int(result.rowcount or 0)

    def mark_published(self, device_id: str, revision: int) -> None:
        self.mark_published_many([(device_id, revision)])

    def mark_published_many(self, sent: Sequence[tuple[str, int]]) -> None:
        """Mark revisions published (one transaction; a newer revision written meanwhile stays
        unpublished)."""
        if not sent:
            return
        now = time.time()
        with self.store.write() as conn:
            conn.execute(sa.update(desired_state)
                         .where(desired_state.c.device_id == sa.bindparam("key"),
                                desired_state.c.revision == sa.bindparam("rev"))
                         .values(published=now),
                         [{"key": d, "rev": r} for d, r in sent])
