"""Desired state that only the fleet can write: signing on the fleet, checking on the device.

Anyone who may publish on a device's ``desired`` topic (another device with valid broker
credentials, or anybody on an anonymous broker) could otherwise retain a document that wipes the
device's models, or points it at an old, validly signed release. So the fleet signs every desired
document with its own ed25519 key (separate from the release key that signs packages), binds it
to one device and gives it an expiry; the device pins the fleet's public key at enrolment and
acts only on a document that

1. verifies with a pinned fleet key (over ``DESIRED_CONTEXT`` + the exact payload bytes),
2. names this device,
3. has not expired (the fleet re-signs retained documents well before they do), and
4. carries a higher revision than the last one applied (checked by the updater).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import ContractError
from ..signing import TrustStore, sign_bytes
from .messages import DESIRED_CONTEXT, Desired, SignedDesired, decode, encode

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["open_desired", "sign_desired"]


def sign_desired(desired: Desired, key: Ed25519PrivateKey) -> SignedDesired:
    """The envelope to publish; ``desired`` should name its device and an expiry."""
    payload = encode(desired).decode()
    return SignedDesired(payload=payload,
                         signatures=[sign_bytes(DESIRED_CONTEXT + payload.encode(), key)])


def open_desired(raw: bytes, trust: TrustStore, device_id: str, now: float | None = None,
                 where: str = "desired") -> Desired:
    """The desired state in ``raw`` if the fleet signed it for ``device_id`` and it is still
    valid; otherwise :class:`~edgeserve.errors.ContractError` or a
    :class:`~edgeserve.errors.SignatureError` subclass saying which check failed."""
    envelope = decode(SignedDesired, raw, where)
    trust.verify_entries(DESIRED_CONTEXT + envelope.payload.encode(), envelope.signatures,
                         f"{where} (fleet signature)")
    desired = decode(Desired, envelope.payload.encode(), f"{where} payload")
    if desired.device_id != device_id:
        raise ContractError(f"{where}: signed for device {desired.device_id!r}, this is "
                            f"{device_id!r}; refusing another device's desired state")
    if desired.expires is None:
        raise ContractError(f"{where}: carries no expiry; the fleet signs every desired state "
                            "with one")
    now = time.time() if now is None else now
    if desired.expires < now:
        raise ContractError(f"{where}: expired {now - desired.expires:.0f} s ago (revision "
                            f"{desired.revision}); the fleet re-signs it while it runs")
    return desired
