"""Enrolment: per-device broker credentials, and a Mosquitto configuration that gives each device
exactly its own topics over TLS.

``broker_config(dir)`` writes, once::

    ca.key ca.crt            the fleet's CA (EC P-256), kept beside the broker configuration
    server.key server.crt    the broker's certificate, for the host names given
    passwd                   the devices' password file (PBKDF2-SHA512, as mosquitto_passwd writes)
    acl                      devices may write only their own status/telemetry/reported/files/req,
                             read only their own topics and the fleet's announcement; the fleet's
                             user reads and writes the whole tree
    mosquitto.conf           TLS listeners, each with its own users and no anonymous clients: one
                             for the fleet service, one for devices with passwords and, unless
                             turned off, one requiring a client certificate from the fleet CA
                             (its common name is the user); on the device listeners the client
                             id is forced to the user name
    fleet.passwd             the fleet listener's password file (only ``edgeserve-fleet``)
    fleet.password           the fleet service's own password (0600)
    broker.json              the host names and ports, for the commands 'device add' prints

``add_device(dir, id)`` adds (or replaces) a device's user, named after its device id, and returns
its new password; ``add_device_certificate(dir, id, out)`` instead issues the device a client
certificate (common name = device id) and its key. Either way the broker authenticates the
connection, the ACL's ``%u`` patterns bind the device to the topics of that id, and its client id
is forced to that id (so it cannot take over another client's session). Mosquitto reads the
password file at start and on SIGHUP; certificates need no reload (any the CA signed are accepted:
a certificate cannot be revoked yet, so a device whose certificate leaks means a new CA).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from edgeserve import certs
from edgeserve.contract import TOPIC_ROOT, check_id
from edgeserve.errors import ConfigError
from edgeserve.package import atomic_write

__all__ = ["FLEET_USER", "BrokerFiles", "DeviceCertificate", "add_device",
           "add_device_certificate", "broker_config", "mosquitto_hash"]

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

    @property
    def fleet_passwd(self) -> Path:
        return self.root / "fleet.passwd"

    @property
    def info(self) -> Path:
        return self.root / "broker.json"

    def settings(self) -> dict[str, object]:
        """What 'broker-config' recorded: ``hosts``, ``port``, ``cert_port`` (None: none)."""
        if not self.info.exists():  # written before broker.json existed: read the listener
            ports = [int(line.split()[1]) for line in self.config.read_text().splitlines()
                     if line.startswith("listener ")]
            return {"hosts": [], "port": ports[0] if ports else 8883, "cert_port": None,
                    "fleet_port": ports[0] if ports else 8883}
        data: dict[str, object] = json.loads(self.info.read_text())
        return data


@dataclass(frozen=True)
class DeviceCertificate:
    device_id: str
    cert_file: Path
    key_file: Path
    not_after: dt.datetime


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


def _config(files: BrokerFiles, bind: str, ports: dict[str, int | None]) -> str:
    """One TLS listener each for the fleet's own clients, devices with passwords and devices
    with certificates, each with its own users. On the device listeners the client id is the
    user name, so no one can take over another device's session (or the fleet's) by choosing
    its client id."""
    tls = [f"cafile {files.ca}", f"certfile {files.root / 'server.crt'}",
           f"keyfile {files.root / 'server.key'}"]
    blocks = [
        "# written by 'edgeserve fleet broker-config'",
        "per_listener_settings true",
        "persistence true",
        f"persistence_location {files.root / 'data'}/",
        "max_queued_messages 100000",
        "",
        "# the fleet service and operators' tools (user edgeserve-fleet)",
        f"listener {ports['fleet']} {bind}", *tls, "allow_anonymous false",
        f"password_file {files.fleet_passwd}", f"acl_file {files.acl}",
        "",
        "# devices with a password ('fleet device add ID'): user = client id = device id",
        f"listener {ports['password']} {bind}", *tls, "allow_anonymous false",
        f"password_file {files.passwd}", f"acl_file {files.acl}",
        "use_username_as_clientid true",
    ]
    if ports["certificate"] is not None:
        blocks += [
            "",
            "# devices with a client certificate from the fleet CA ('fleet device add ID --cert'):",
            "# user = client id = the certificate's common name",
            f"listener {ports['certificate']} {bind}", *tls, "allow_anonymous false",
            "require_certificate true", "use_identity_as_username true",
            "use_username_as_clientid true", f"acl_file {files.acl}",
        ]
    return "\n".join([*blocks, ""])


def _certificates(files: BrokerFiles, hosts: list[str]) -> None:
    """The fleet CA (10 years) and the broker's certificate for ``hosts`` (825 days)."""
    ca_key, ca = certs.new_ca("edgeserve fleet CA")
    server_key, server = certs.issue(ca_key, ca, hosts[0], 825, hosts=hosts)
    certs.write_pem(files.root / "ca.key", files.ca, ca_key, ca)
    certs.write_pem(files.root / "server.key", files.root / "server.crt", server_key, server)


def broker_config(directory: Path, hosts: list[str], port: int = 8883, bind: str = "0.0.0.0",
                  cert_port: int | None = 8884, fleet_port: int = 8885) -> BrokerFiles:
    """Write the broker's configuration into ``directory`` (refused if one is there already):
    devices log in with a password on ``port`` and with a client certificate on ``cert_port``
    (None: no such listener), the fleet service on ``fleet_port``."""
    files = BrokerFiles(Path(directory).resolve())
    if files.config.exists():
        raise ConfigError(f"{files.config} exists already; add devices with 'edgeserve fleet "
                          "device add', or choose another --out")
    if not hosts:
        raise ConfigError("give at least one --host: the name devices use to reach the broker")
    ports = {"fleet": fleet_port, "password": port, "certificate": cert_port}
    taken = [p for p in ports.values() if p is not None]
    if len(set(taken)) != len(taken):
        raise ConfigError(f"the broker's listeners need a port each, got {ports}")
    (files.root / "data").mkdir(parents=True, exist_ok=True)
    _certificates(files, hosts)
    atomic_write(files.acl, _acl().encode())
    atomic_write(files.config, _config(files, bind, ports).encode())
    atomic_write(files.info, json.dumps({"hosts": hosts, "port": port, "cert_port": cert_port,
                                         "fleet_port": fleet_port}, indent=2).encode())
    password = secrets.token_urlsafe(24)
    atomic_write(files.fleet_passwd, f"{FLEET_USER}:{mosquitto_hash(password)}\n".encode())
    atomic_write(files.passwd, b"")
    atomic_write(files.fleet_password, password.encode())
    files.fleet_password.chmod(0o600)
    return files


def _enrollable(files: BrokerFiles, device_id: str) -> None:
    check_id(device_id, "device id")
    if ":" in device_id:
        raise ConfigError(f"device id {device_id!r}: a broker user name cannot contain ':'; "
                          "enrol devices whose ids have none")
    if device_id.startswith("edgeserve-"):
        raise ConfigError(f"device id {device_id!r}: ids starting 'edgeserve-' are the fleet's "
                          "own clients")
    if not files.passwd.exists():
        raise ConfigError(f"no broker configuration in {files.root}: run 'edgeserve fleet "
                          "broker-config --out DIR' first")


def add_device(directory: Path, device_id: str) -> str:
    """Give ``device_id`` broker credentials (replacing any it had); returns its new password."""
    files = BrokerFiles(Path(directory).resolve())
    _enrollable(files, device_id)
    password = secrets.token_urlsafe(18)
    lines = [line for line in files.passwd.read_text().splitlines()
             if line and line.split(":", 1)[0] != device_id]
    lines.append(f"{device_id}:{mosquitto_hash(password)}")
    atomic_write(files.passwd, ("\n".join(lines) + "\n").encode())
    return password


def add_device_certificate(directory: Path, device_id: str, out: Path | None = None,
                           days: int = 825) -> DeviceCertificate:
    """Issue ``device_id`` a client certificate from the fleet CA (common name = the device id,
    for client authentication only) and a new EC P-256 key, written to ``out`` (default: the
    configuration's ``devices/`` folder) as ``ID.crt`` and ``ID.key`` (0600)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    files = BrokerFiles(Path(directory).resolve())
    _enrollable(files, device_id)
    if files.settings().get("cert_port") is None:
        raise ConfigError(f"the broker configuration in {files.root} has no listener for client "
                          "certificates; write one with 'edgeserve fleet broker-config "
                          "--cert-port PORT', or enrol the device with a password")
    ca_key, ca = certs.load_pem(files.root / "ca.key", files.ca)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{files.root / 'ca.key'} is not the EC key broker-config writes")
    key, cert = certs.issue(ca_key, ca, device_id, days, client=True)
    folder = Path(out).resolve() if out is not None else files.root / "devices"
    folder.mkdir(parents=True, exist_ok=True)
    issued = DeviceCertificate(device_id, folder / f"{device_id}.crt", folder / f"{device_id}.key",
                               cert.not_valid_after_utc)
    certs.write_pem(issued.key_file, issued.cert_file, key, cert)
    return issued
