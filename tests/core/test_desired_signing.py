"""Signed desired state: only a document the pinned fleet key signed, for this device and not
expired, is opened; every other one is refused with the reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgeserve.contract import Desired, SignedDesired, encode, open_desired, sign_desired
from edgeserve.errors import ContractError, SignatureError, UntrustedKeyError
from edgeserve.testing import KeyPair, make_keypair

NOW = 1_800_000_000.0


def doc(**kw: object) -> Desired:
    base: dict[str, object] = {"revision": 7, "ts": NOW, "device_id": "cam-7", "expires": NOW + 3600,
                               "models": {}}
    return Desired.model_validate({**base, **kw})


@pytest.fixture
def fleet(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path / "keys", "fleet")


def test_a_document_signed_for_this_device_opens(fleet: KeyPair) -> None:
    """The fleet's signature, this device, before expiry: the document comes back as signed."""
    raw = encode(sign_desired(doc(), fleet.private))
    assert open_desired(raw, fleet.trust, "cam-7", now=NOW) == doc()


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"device_id": "cam-8"}, ContractError, "signed for device 'cam-8'"),
    ({"expires": NOW - 5}, ContractError, "expired 5 s ago"),
    ({"expires": None}, ContractError, "no expiry"),
])
def test_documents_for_another_device_or_out_of_date_are_refused(
        fleet: KeyPair, change: dict[str, object], error: type[Exception], match: str) -> None:
    """A validly signed document replayed to another device, expired, or without expiry."""
    raw = encode(sign_desired(doc(**change), fleet.private))
    with pytest.raises(error, match=match):
        open_desired(raw, fleet.trust, "cam-7", now=NOW)


def test_a_forged_or_altered_document_is_refused(fleet: KeyPair, tmp_path: Path) -> None:
    """Unsigned JSON (the old format an attacker would send), another key's signature, and a
    payload edited after signing are all refused before anything in them is read."""
    forged = json.dumps({"v": 1, "revision": 10**15, "models": {}}).encode()
    with pytest.raises(ContractError):
        open_desired(forged, fleet.trust, "cam-7", now=NOW)
    rogue = make_keypair(tmp_path / "rogue", "rogue")
    with pytest.raises(UntrustedKeyError, match="fleet signature"):
        open_desired(encode(sign_desired(doc(), rogue.private)), fleet.trust, "cam-7", now=NOW)
    envelope = sign_desired(doc(), fleet.private)
    edited = SignedDesired(payload=envelope.payload.replace('"revision":7', '"revision":9'),
                           signatures=envelope.signatures)
    with pytest.raises(SignatureError, match="does not verify"):
        open_desired(encode(edited), fleet.trust, "cam-7", now=NOW)


def test_fields_a_newer_fleet_adds_still_verify(fleet: KeyPair) -> None:
    """The signature covers the exact payload text, so an unknown key in it (a newer fleet)
    neither breaks the check nor is dropped before it."""
    payload = json.dumps({"v": 1, "revision": 3, "device_id": "cam-7", "expires": time.time()
                          + 60, "models": {}, "future_field": {"x": 1}}, separators=(",", ":"))
    from edgeserve.contract import DESIRED_CONTEXT
    from edgeserve.signing import sign_bytes

    raw = encode(SignedDesired(payload=payload,
                               signatures=[sign_bytes(DESIRED_CONTEXT + payload.encode(),
                                                      fleet.private)]))
    assert open_desired(raw, fleet.trust, "cam-7").revision == 3
