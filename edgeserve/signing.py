"""ed25519 keys, package signatures and the reader's pinned trust store.

A package's ``signature`` member is a small JSON document (``edgeserve.signature/1``) holding one
or more ed25519 signatures over the canonical manifest bytes, each tagged with the signer's key id
(sha256 of the raw public key). It also records the sha256 of the manifest it signed: that lets a
reader say *the manifest was edited after signing* rather than just *bad signature*. That hash is a
diagnostic only; trust comes from the signature checked with a pinned key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from msgspec import Meta

from ._doc import Document, field
from ._validation import validate_json
from .errors import (
    KeyFileError,
    SignatureError,
    TamperedManifestError,
    UntrustedKeyError,
)
from .manifest import canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "SIGNATURE_SCHEMA",
    "SignatureDocument",
    "SignatureEntry",
    "TrustStore",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_public_key_bytes",
    "sign_bytes",
    "sign_manifest",
    "write_keypair",
]

SIGNATURE_SCHEMA = "edgeserve.signature/1"


class SignatureEntry(Document):
    keyid: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    sig: Annotated[str, Meta(min_length=1, max_length=200,
                             description="base64 ed25519 signature")]


class SignatureDocument(Document):
    schema_: Annotated[str, Meta(pattern=r"^edgeserve\.signature/1$")] = \
        field(default=SIGNATURE_SCHEMA, name="schema")
    manifest_sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    signatures: Annotated[list[SignatureEntry], Meta(min_length=1, max_length=16)]

    def to_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", by_alias=True))


# cryptography (about 9 MB of RSS) loads when a key signs or a signature is checked, not when a
# reader pins its keys: an agent that only serves its cache never loads it (docs/benchmarks.md).
# An ed25519 SubjectPublicKeyInfo is this fixed DER prefix and the 32 raw key bytes (RFC 8410).
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----\s*([A-Za-z0-9+/=\s]+?)\s*"
                         rb"-----END PUBLIC KEY-----")


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey | bytes) -> str:
    """sha256 of the raw 32-byte public key (given as a key object or those bytes)."""
    raw = public_key if isinstance(public_key, bytes) else _raw_public(public_key)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ed25519 key pair as (PKCS#8 private PEM, SubjectPublicKeyInfo public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def write_keypair(private_path: Path, public_path: Path, overwrite: bool = False) -> str:
    """Write a new key pair (private key mode 0600); return its key id."""
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise KeyFileError(f"{path} already exists; pass --force to overwrite it")
    private_pem, public_pem = generate_keypair()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(private_pem)
    private_path.chmod(0o600)
    public_path.write_bytes(public_pem)
    return key_id(load_public_key(public_pem))


def _read_key_bytes(source: Path | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, f"the given {what}"
    try:
        return Path(source).read_bytes(), str(source)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {source}: {exc.strerror or exc}") from None


def load_private_key(source: Path | bytes) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data, where = _read_key_bytes(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{where} is not an unencrypted PEM private key ({exc}); "
            "expected a PKCS#8 ed25519 key as written by 'edgeserve keys generate'"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where} holds a {type(key).__name__}, expected an ed25519 key")
    return key


def load_public_key(source: Path | bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(load_public_key_bytes(source))


def load_public_key_bytes(source: Path | bytes) -> bytes:
    """The raw 32 bytes of an ed25519 public key PEM, read without loading cryptography; any
    other PEM is handed to cryptography, which says what it holds instead."""
    data, where = _read_key_bytes(source, "public key")
    match = _PEM_PUBLIC.fullmatch(data.strip())
    if match:
        try:
            der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except (binascii.Error, ValueError):
            der = b""
        if len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
            return der[len(_ED25519_SPKI_PREFIX):]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{where} is not a PEM public key ({exc}); expected a SubjectPublicKeyInfo ed25519 "
            "key as written by 'edgeserve keys generate'"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where} holds a {type(key).__name__}, expected an ed25519 key")
    return _raw_public(key)


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> SignatureEntry:
    """One ed25519 signature over ``data``, tagged with the signer's key id."""
    return SignatureEntry(keyid=key_id(key.public_key()),
                          sig=base64.b64encode(key.sign(data)).decode())


def sign_manifest(
    manifest_bytes: bytes, keys: Ed25519PrivateKey | Iterable[Ed25519PrivateKey]
) -> SignatureDocument:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_list = [keys] if isinstance(keys, Ed25519PrivateKey) else list(keys)
    return SignatureDocument(
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        signatures=[sign_bytes(manifest_bytes, k) for k in key_list],
    )


class TrustStore:
    """The public keys a reader pins. A package is trusted when one of them signed it."""

    def __init__(self, keys: Iterable[Ed25519PublicKey | bytes] = ()) -> None:
        """``keys``: key objects or raw 32-byte ed25519 public keys."""
        raws = [k if isinstance(k, bytes) else _raw_public(k) for k in keys]
        self._keys = {key_id(raw): raw for raw in raws}
        self._loaded: dict[str, Ed25519PublicKey] = {}

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> TrustStore:
        """Keys from PEM files; a directory contributes every ``*.pem`` / ``*.pub`` in it."""
        keys: list[bytes] = []
        for path in paths:
            path = Path(path)
            if path.is_dir():
                files = sorted([*path.glob("*.pem"), *path.glob("*.pub")])
                keys.extend(load_public_key_bytes(f) for f in files)
            else:
                keys.append(load_public_key_bytes(path))
        return cls(keys)

    def _key(self, keyid: str) -> Ed25519PublicKey:
        key = self._loaded.get(keyid)
        if key is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            key = self._loaded[keyid] = Ed25519PublicKey.from_public_bytes(self._keys[keyid])
        return key

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verify(self, manifest_bytes: bytes, signature_bytes: bytes | None) -> str:
        """Check the signature document over ``manifest_bytes``; return the trusted key id used."""
        if signature_bytes is None:
            raise SignatureError("package is not signed: it has no 'signature' member; "
                                 "sign it with 'edgeserve convert --sign-key' or a PackageWriter")
        doc = validate_json(SignatureDocument, signature_bytes, "signature", SignatureError, 65536)
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        if digest != doc.manifest_sha256:
            raise TamperedManifestError(
                f"manifest.json was modified after signing: its sha256 is {digest[:16]}…, "
                f"the signature covers {doc.manifest_sha256[:16]}…"
            )
        if not self._keys:
            raise UntrustedKeyError("no trusted public keys are configured; pass --trusted-key "
                                    "PUB.pem or add keys to the agent's trusted_keys")
        return self.verify_entries(manifest_bytes, doc.signatures, "package")

    def verify_entries(self, data: bytes, entries: Iterable[SignatureEntry], what: str) -> str:
        """Check that a pinned key signed ``data`` (among ``entries``); return its key id."""
        entries = list(entries)
        known = [e for e in entries if e.keyid in self._keys]
        if not known:
            signers = ", ".join(e.keyid[:16] for e in entries) or "no key"
            trusted = ", ".join(k[:16] for k in self.key_ids) or "none"
            raise UntrustedKeyError(
                f"{what} is signed by {signers}, none of which is trusted (trusted: {trusted})")
        from cryptography.exceptions import InvalidSignature

        for entry in known:
            try:
                raw = base64.b64decode(entry.sig, validate=True)
                self._key(entry.keyid).verify(raw, data)
            except (binascii.Error, ValueError):
                raise SignatureError(f"{what}: signature by key {entry.keyid[:16]} is not valid "
                                     "base64") from None
            except InvalidSignature:
                raise SignatureError(
                    f"{what}: signature by trusted key {entry.keyid[:16]} does not verify: the "
                    "signed bytes or the signature were altered, or another key made it"
                ) from None
            return entry.keyid
        raise SignatureError("no usable signature")  # pragma: no cover - loop always returns
