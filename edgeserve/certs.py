"""X.509 for TLS: a CA, certificates it issues, PEM files — EC P-256 keys throughout.

Used by the fleet's broker enrolment (``fleet broker-config``, ``fleet device add --cert``) and
by the tests that need TLS. ``cryptography`` is imported when a function is called.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .package import atomic_write

__all__ = ["issue", "load_pem", "new_ca", "write_pem"]


def _builder(subject: str, issuer: Any, public_key: Any, days: float) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def new_ca(name: str, days: float = 3650) -> tuple[Any, Any]:
    """(key, certificate) of a self-signed CA named ``name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(name, subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key: Any, ca_cert: Any, name: str, days: float, hosts: Sequence[str] = (),
          client: bool = False) -> tuple[Any, Any]:
    """(key, certificate) for ``name`` signed by the CA: a server's with ``hosts`` (IP addresses
    or DNS names) as subject alternative names, or with ``client`` one for client
    authentication only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(name, ca_cert.subject, key.public_key(), days)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if client:
        builder = (builder
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(key_path: Path, cert_path: Path, key: Any, cert: Any) -> None:
    """The key (PKCS#8, unencrypted, mode 0600) and the certificate, each written atomically."""
    from cryptography.hazmat.primitives import serialization

    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    key_path.chmod(0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def load_pem(key_path: Path, cert_path: Path) -> tuple[Any, Any]:
    """(key, certificate) written by :func:`write_pem`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
