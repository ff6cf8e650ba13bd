"""Download tokens: who may fetch a version's files from the fleet's artifact endpoint.

When the fleet's HTTP side requires authentication, devices (which hold no API credentials) fetch
artifacts with a token the fleet puts in each ``VersionRef`` of the desired state it signs for
them: an HMAC, keyed by a secret derived from the fleet's signing key, over the device, model and
version. It names the device (for the fleet's logs) and opens that one version, nothing else; it
reaches a device only inside its own desired state, which the broker ACL lets no other device
read.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["ArtifactTokens"]


class ArtifactTokens:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def from_key(cls, key: Ed25519PrivateKey) -> ArtifactTokens:
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return cls(hashlib.sha256(b"edgeserve.artifact-tokens/1\n" + raw).digest())

    def _mac(self, device_id: str, model: str, version: str) -> str:
        message = f"{device_id}\n{model}\n{version}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def mint(self, device_id: str, model: str, version: str) -> str:
        """The token that lets ``device_id`` fetch ``model`` ``version``."""
        return f"{device_id}.{self._mac(device_id, model, version)}"

    def check(self, token: str, model: str, version: str) -> str | None:
        """The device a token belongs to, if it opens ``model`` ``version``; else None."""
        device_id, _, mac = token.rpartition(".")
        if not device_id or not mac:
            return None
        expected = self._mac(device_id, model, version)
        return device_id if hmac.compare_digest(mac, expected) else None
