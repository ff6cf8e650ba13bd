"""Desired state for many devices in one transaction (a rollout stage over thousands of
devices): each device gets its next revision with what it had kept, a device named twice gets
two revisions in order, a device labelled ``transport=mqtt`` is told to fetch over MQTT, and
publishing marks exactly the revisions that went out."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.desired import DesiredStates, ModelChange
from edgeserve.fleet.registry import ensure_devices
from edgeserve.fleet.store import Store
from edgeserve.fleet.tables import desired_state, devices
from edgeserve.testing import KeyPair, publish_versions


def test_many_devices_in_one_call_match_one_by_one(tmp_path: Path, keypair: KeyPair) -> None:
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    publish_versions(artifacts, tmp_path, keypair, ["1.0.0", "2.0.0"])
    ids = [f"d{i:04d}" for i in range(1200)]  # more than one IN (...) chunk
    with Store.open(f"sqlite:///{tmp_path}/fleet.db") as store:
        with store.write() as conn:
            ensure_devices(store, conn, ids, 0.0)
            conn.execute(sa.update(devices).where(devices.c.device_id == "d0007")
                         .values(labels=json.dumps({"transport": "mqtt"})))
        desired = DesiredStates(store, artifacts, "http://fleet")
        one = DesiredStates(store, artifacts, "http://fleet").set_model("d0003", "toy", "1.0.0")
        assert one.revision == 1
        written = desired.set_models(
            [ModelChange(d, "toy", "2.0.0", rollout="r1") for d in ids]
            + [ModelChange("d0005", "toy", "1.0.0", rollout="r2")])
        assert len(written) == len(ids) + 1
        docs = {d: doc for d, doc in desired.all()}
        assert set(docs) == set(ids)
        assert docs["d0003"].revision == 2 and docs["d0003"].models["toy"].active == "2.0.0"
        assert docs["d0004"].revision == 1 and docs["d0004"].rollout == "r1"
        # named twice: both changes, in order, the second on top of the first
        assert docs["d0005"].revision == 2 and docs["d0005"].models["toy"].active == "1.0.0"
        assert set(docs["d0005"].models["toy"].versions) == {"1.0.0"}
        assert docs["d0007"].models["toy"].versions["2.0.0"].transport == "mqtt"
        assert docs["d0008"].models["toy"].versions["2.0.0"].transport == "http"
        assert len(desired.unpublished()) == len(ids)
        # only the revisions sent are marked: d0010's newer one stays to be published
        desired.set_model("d0010", "toy", "1.0.0")
        desired.mark_published_many([(d, docs[d].revision) for d in ids])
        left = desired.unpublished()
        assert [(d, doc.revision) for d, doc in left] == [("d0010", 2)]
        with store.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(desired_state)
                                .where(desired_state.c.published.is_not(None))
                                ).scalar_one() == len(ids) - 1
        assert desired.set_models([]) == []
