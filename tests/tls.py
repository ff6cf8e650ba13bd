"""Certificates for TLS tests: a CA, a server certificate for 127.0.0.1, a client certificate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeserve import certs

__all__ = ["Certificates", "make_certificates"]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = certs.new_ca("test CA", days=1)
    paths = {}
    for name, hosts in (("ca", None), ("server", ["127.0.0.1", "localhost"]), ("client", [])):
        key, cert = (ca_key, ca) if hosts is None else certs.issue(ca_key, ca, name, 1, hosts)
        paths[name] = (directory / f"{name}.crt", directory / f"{name}.key")
        certs.write_pem(paths[name][1], paths[name][0], key, cert)
    return Certificates(paths["ca"][0], *paths["server"], *paths["client"])
