"""Enrolment: per-device broker credentials, and a Mosquitto configuration that gives each device
exactly its own topics over TLS.

``broker_config(dir)`` writes, once::

    ca.key ca.crt            the fleet's CA (EC P-256), kept beside the broker configuration
    server.key server.crt    the broker's certificate, for the host names given
    passwd                   Mosquitto's password file (PBKDF2-SHA512, as mosquitto_passwd writes)
    acl                      devices may write only their own status/telemetry/reported/files/req,
                             read only their own topics and the fleet's announcement; the fleet's
                             user reads and writes the whole tree
    mosquitto.conf           a TLS listener, allow_anonymous false, the files above
    fleet.password           the fleet service's own password (user ``edgeserve-fleet``, 0600)

``add_device(dir, id)`` adds (or replaces) a device's user, named after its device id, and returns
its new password: the broker authenticates the connection, and the ACL's ``%u`` patterns bind the
device to the topics of that id, whatever client id it chooses. Mosquitto reads the password file
at start and on SIGHUP.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgeserve.contract import TOPIC_ROOT, check_id
from edgeserve.errors import ConfigError
from edgeserve.package import atomic_write

__all__ = ["FLEET_USER", "BrokerFiles", "add_device", "broker_config", "mosquitto_hash"]

FLEET_USER = "edgeserve-fleet"
_ITERATIONS = 101
"""mosquitto_passwd's default for its $7$ (PBKDF2-SHA512) hashes."""


@dataclass(frozen=True)
class BrokerFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def fleet_password(self) -> Path:
        return self.root / "fleet.password"


def mosquitto_hash(password: str) -> str:
    """``$7$101$SALT$HASH``: Mosquitto 2's salted PBKDF2-SHA512 password format."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _acl() -> str:
    root = TOPIC_ROOT
    return "\n".join([
        "# written by 'edgeserve fleet broker-config': a device's user name is its device id",
        f"pattern write {root}/+/devices/%u/status",
        f"pattern write {root}/+/devices/%u/telemetry",
        f"pattern write {root}/+/devices/%u/reported",
        f"pattern write {root}/+/devices/%u/files/req",
        f"pattern read {root}/+/devices/%u/#",
        f"pattern read {root}/+/fleet/status",
        "",
        f"user {FLEET_USER}",
        f"topic readwrite {root}/#",
        "",
    ])


def _config(files: BrokerFiles, port: int, bind: str) -> str:
    return "\n".join([
        "# written by 'edgeserve fleet broker-config'",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.passwd}",
        f"acl_file {files.acl}",
        "persistence true",
        f"persistence_location {files.root / 'data'}/",
        "max_queued_messages 100000",
        f"listener {port} {bind}",
        f"cafile {files.ca}",
        f"certfile {files.root / 'server.crt'}",
        f"keyfile {files.root / 'server.key'}",
        "",
    ])


def _write_key_cert(key_path: Path, cert_path: Path, key: object, cert: object) -> None:
    from cryptography.hazmat.primitives import serialization

    atomic_write(key_path, key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))  # type: ignore[attr-defined]


def _certificates(files: BrokerFiles, hosts: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeserve fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=825))
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    _write_key_cert(files.root / "ca.key", files.ca, ca_key, ca)
    _write_key_cert(files.root / "server.key", files.root / "server.crt", server_key, server)


def broker_config(directory: Path, hosts: list[str], port: int = 8883,
                  bind: str = "0.0.0.0") -> BrokerFiles:
    """Write the broker's configuration into ``directory`` (refused if one is there already)."""
    files = BrokerFiles(Path(directory).resolve())
    if files.config.exists():
        raise ConfigError(f"{files.config} exists already; add devices with 'edgeserve fleet "
                          "device add', or choose another --out")
    if not hosts:
        raise ConfigError("give at least one --host: the name devices use to reach the broker")
    (files.root / "data").mkdir(parents=True, exist_ok=True)
    _certificates(files, hosts)
    atomic_write(files.acl, _acl().encode())
    atomic_write(files.config, _config(files, port, bind).encode())
    password = secrets.token_urlsafe(24)
    atomic_write(files.passwd, f"{FLEET_USER}:{mosquitto_hash(password)}\n".encode())
    atomic_write(files.fleet_password, password.encode())
    files.fleet_password.chmod(0o600)
    return files


def add_device(directory: Path, device_id: str) -> str:
    """Give ``device_id`` broker credentials (replacing any it had); returns its new password."""
    files = BrokerFiles(Path(directory).resolve())
    check_id(device_id, "device id")
    if ":" in device_id:
        raise ConfigError(f"device id {device_id!r}: a broker user name cannot contain ':'; "
                          "enrol devices whose ids have none")
    if device_id == FLEET_USER:
        raise ConfigError(f"{FLEET_USER!r} is the fleet service's own user")
    if not files.passwd.exists():
        raise ConfigError(f"no broker configuration in {files.root}: run 'edgeserve fleet "
                          "broker-config --out DIR' first")
    password = secrets.token_urlsafe(18)
    lines = [line for line in files.passwd.read_text().splitlines()
             if line and line.split(":", 1)[0] != device_id]
    lines.append(f"{device_id}:{mosquitto_hash(password)}")
    atomic_write(files.passwd, ("\n".join(lines) + "\n").encode())
    return password
