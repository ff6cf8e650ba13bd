"""Helpers for tests of edgeserve and of code that embeds it (like ``structlog.testing``).

They build *real* things: real key pairs, real signed packages whose artifacts are whatever bytes
or files the caller gives (the converter's tests give real ONNX/TFLite files).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .manifest import Manifest, parse_manifest
from .package import PackageWriter
from .signing import TrustStore, load_private_key, write_keypair

__all__ = ["KeyPair", "make_keypair", "make_manifest", "publish_versions", "write_test_package",
           "write_test_profile"]


class _Publisher(Protocol):
    def publish(self, package: Path) -> Any: ...


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str

    @property
    def private(self) -> Ed25519PrivateKey:
        return load_private_key(self.private_path)

    @property
    def trust(self) -> TrustStore:
        return TrustStore.from_paths([self.public_path])


def make_keypair(directory: Path, name: str = "test") -> KeyPair:
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub.pem"
    keyid = write_keypair(private, public, overwrite=True)
    return KeyPair(private, public, keyid)


def write_test_profile(directory: Path, name: str, body: str, *, title: str = "",
                       runtimes: str = "[runtimes.onnxruntime]\n[runtimes.litert]\n",
                       memory_mb: int = 4096) -> Path:
    """``directory/NAME.toml``: a desktop-class profile with generous budgets, ``runtimes``
    (TOML tables) and ``body`` (its ``[[artifacts]]`` and any other tables) as given."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(f'''schema = "edgeserve.profile/1"
name = "{name}"
title = "{title or f'test profile {name}'}"
device_class = "desktop"
vendor = "test"

[hardware]
arch = "any"
cpu = "any"
cores = 2
memory_mb = {memory_mb}
storage_mb = 4096

[budgets]
max_model_bytes = 2_000_000_000
cache_bytes = 4_000_000_000

{runtimes}
{body}
''')
    return path


def make_manifest(name: str = "toy", version: str = "1.0.0", release: int = 1,
                  artifacts: list[dict[str, Any]] | None = None, **extra: Any) -> Manifest:
    """A valid manifest for a 4-float-in, 3-float-out classifier with one ONNX artifact."""
    data: dict[str, Any] = {
        "schema": "edgeserve.manifest/1",
        "name": name,
        "version": version,
        "release": release,
        "task": "classification",
        "source": {"framework": "onnx", "sha256": hashlib.sha256(name.encode()).hexdigest()},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
        "labels": ["a", "b", "c"],
        "artifacts": artifacts or [{
            "id": "onnx-fp32", "format": "onnx", "precision": "fp32",
            "path": "artifacts/model.onnx", "profiles": ["generic-cpu"],
        }],
    }
    data.update(extra)
    return parse_manifest(data)


def write_test_package(out: Path, key: KeyPair | Ed25519PrivateKey,
                       files: Mapping[str, bytes | Path] | None = None,
                       manifest: Manifest | None = None) -> Manifest:
    """Sign and write a package; by default one artifact file of 4 KiB of pseudo-random bytes."""
    manifest = manifest or make_manifest()
    writer = PackageWriter(manifest)
    contents = dict(files or {"artifacts/model.onnx": hashlib.sha512(b"x").digest() * 64})
    for name, content in contents.items():
        writer.add_file(name, content)
    private = key.private if isinstance(key, KeyPair) else key
    return writer.write(out, private)


def publish_versions(store: _Publisher, directory: Path, key: KeyPair, versions: list[str],
                     name: str = "toy") -> None:
    """Write a signed test package of model ``name`` for each version (release: its major
    number) into ``directory`` and publish it into ``store`` (a fleet ``ArtifactStore``)."""
    for version in versions:
        package = directory / f"{name}-{version}.edgepkg"
        write_test_package(package, key, manifest=make_manifest(
            name=name, version=version, release=int(version.split(".")[0])))
        store.publish(package)


@contextmanager
def postgres_schema(url: str, prefix: str = "es") -> Iterator[str]:
    """``url`` with its ``search_path`` set to a fresh schema, dropped (with everything in it)
    afterwards, so that a test or benchmark shares a PostgreSQL database with nobody.
    Raises ``psycopg.OperationalError`` when the server cannot be reached; needs psycopg."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def end_mqtt_sessions(port: int, client_ids: list[str], host: str = "127.0.0.1") -> None:
    """End these clients' persistent MQTT sessions on the broker at ``host:port`` (an MQTT 5
    clean start with session expiry 0, then DISCONNECT): a shared broker, such as a machine's
    Mosquitto, would otherwise keep them, and queue messages for them, for as long as they asked
    (the fleet asks 7 days). An unreachable broker is passed over. Needs paho-mqtt."""
    import contextlib

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    for client_id in client_ids:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
        with contextlib.suppress(OSError):
            client.connect(host, port, clean_start=True, properties=properties)
            client.loop_start()
            client.disconnect()
            client.loop_stop()
