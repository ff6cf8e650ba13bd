"""Optional authentication for edgeserve's servers (agent HTTP/gRPC, fleet API and dashboard).

Schemes: a static bearer token, JWT bearer tokens (HS256 with a shared secret of at least 32
bytes, as RFC 7518 asks, or RS256 with a public key; ``exp`` is required and at most a year
ahead, ``aud`` checked when configured, an optional required ``scope``) and HTTP basic auth
(passwords stored as salted scrypt hashes, ``edgeserve keys hash-password``; clear text and the
older unsalted ``sha256:`` still read). Missing or invalid credentials raise
:class:`~edgeserve.errors.AuthError` (401); valid credentials that lack the required scope raise
``ForbiddenError`` (403). Comparisons of secrets are constant-time. A secret in an ``--auth``
option may be ``@FILE`` (read from that file), so that it does not show in ``ps``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthError, ConfigError, ForbiddenError

__all__ = ["Authenticator", "BasicAuth", "BearerTokenAuth", "JwtAuth", "hash_password",
           "is_loopback", "parse_auth_option"]

MIN_HS256_SECRET = 32
"""Bytes an HS256 secret needs at least (RFC 7518 section 3.2: the hash's size)."""
MAX_TOKEN_LIFETIME_S = 366 * 86400
"""A JWT whose ``exp`` lies further ahead than this is refused (an exp of 10^20 is a bug or a
forgery, not a token)."""
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class Authenticator:
    """Base: ``check(authorization_header)`` returns the principal or raises."""

    scheme = "Bearer"

    def check(self, authorization: str | None) -> str:
        raise NotImplementedError

    def challenge(self) -> str:
        return f'{self.scheme} realm="edgeserve"'


def _credentials(authorization: str | None, scheme: str) -> str:
    if not authorization:
        raise AuthError(f"missing credentials: send 'Authorization: {scheme} …'")
    given, _, value = authorization.partition(" ")
    if given.lower() != scheme.lower() or not value.strip():
        raise AuthError(f"unsupported authorization scheme {given[:20]!r}; expected {scheme}")
    return value.strip()


@dataclass
class BearerTokenAuth(Authenticator):
    """Any of a fixed set of bearer tokens."""

    tokens: Iterable[str]

    def __post_init__(self) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in self.tokens]
        if not self._digests:
            raise ConfigError("bearer auth needs at least one token")

    def check(self, authorization: str | None) -> str:
        token = _credentials(authorization, "Bearer")
        digest = hashlib.sha256(token.encode()).digest()
        if not any(hmac.compare_digest(digest, known) for known in self._digests):
            raise AuthError("invalid bearer token")
        return "token"


@dataclass
class JwtAuth(Authenticator):
    """JWT bearer tokens: HS256 (``key`` = shared secret) or RS256 (``key`` = PEM public key)."""

    key: str | bytes
    algorithm: str = "HS256"
    audience: str | None = None
    issuer: str | None = None
    required_scope: str | None = None
    leeway_s: float = 0.0

    def __post_init__(self) -> None:
        if self.algorithm not in ("HS256", "RS256"):
            raise ConfigError(f"JWT algorithm {self.algorithm!r} is not supported; use HS256 "
                              "or RS256")
        secret = self.key.encode() if isinstance(self.key, str) else self.key
        if self.algorithm == "HS256" and len(secret) < MIN_HS256_SECRET:
            raise ConfigError(f"the HS256 secret has {len(secret)} bytes; it needs at least "
                              f"{MIN_HS256_SECRET} (e.g. 'openssl rand -hex 32')")

    def check(self, authorization: str | None) -> str:
        import jwt

        token = _credentials(authorization, "Bearer")
        try:
            claims = jwt.decode(
                token, self.key, algorithms=[self.algorithm], audience=self.audience,
                issuer=self.issuer, leeway=self.leeway_s,
                options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise AuthError("JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"JWT audience is not {self.audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"JWT lacks the required claim {exc.claim!r}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid JWT: {exc}") from None
        if float(claims.get("exp", 0)) > time.time() + MAX_TOKEN_LIFETIME_S:
            raise AuthError(f"JWT expires more than {MAX_TOKEN_LIFETIME_S // 86400} days ahead; "
                            "issue tokens that expire sooner")
        if self.required_scope is not None:
            scopes = str(claims.get("scope", "")).split()
            if self.required_scope not in scopes:
                raise ForbiddenError(f"token lacks the scope {self.required_scope!r}")
        return str(claims.get("sub", "jwt"))


@dataclass
class BasicAuth(Authenticator):
    """HTTP basic auth; passwords given in clear or as ``sha256:<hex>``."""

    users: Mapping[str, str] = field(default_factory=dict)
    scheme = "Basic"

    def check(self, authorization: str | None) -> str:
        value = _credentials(authorization, "Basic")
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("basic credentials are not valid base64 'user:password'") from None
        stored = self.users.get(user)
        if not sep or stored is None or not _password_ok(password, stored):
            raise AuthError("invalid user name or password")
        return user


def hash_password(password: str) -> str:
    """``scrypt:SALT:HASH`` (hex) of ``password``: what to store in ``basic:USER:…``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)  # type: ignore[arg-type]
    return f"scrypt:{salt.hex()}:{digest.hex()}"


def _password_ok(password: str, stored: str) -> bool:
    if stored.startswith("scrypt:"):
        try:
            _, salt, expected = stored.split(":")
            digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt),
                                    **_SCRYPT)  # type: ignore[arg-type]
        except ValueError:
            return False
        return hmac.compare_digest(digest.hex(), expected)
    if stored.startswith("sha256:"):
        digest_hex = hashlib.sha256(password.encode()).hexdigest()
        return hmac.compare_digest(digest_hex, stored[7:])
    return hmac.compare_digest(password.encode(), stored.encode())


def _secret(value: str) -> str:
    """``@FILE`` -> the file's content (stripped); anything else as given."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {value[1:]}: {exc.strerror or exc}") \
            from None


def parse_auth_option(text: str | None) -> Authenticator | None:
    """Build an authenticator from a CLI option.

    ``token:SECRET`` · ``jwt-hs256:SECRET[,aud=AUD][,scope=S]`` ·
    ``jwt-rs256:PUBLIC.pem[,aud=AUD][,scope=S]`` · ``basic:USER:PASSWORD[;USER:PASSWORD…]``;
    after the first colon, ``@FILE`` reads the rest from a file.
    """
    if not text:
        return None
    kind, _, rest = text.partition(":")
    rest = _secret(rest)
    if kind == "token" and rest:
        return BearerTokenAuth([rest])
    if kind in ("jwt-hs256", "jwt-rs256") and rest:
        first, *options = rest.split(",")
        opts = dict(o.split("=", 1) for o in options if "=" in o)
        if kind == "jwt-rs256":
            try:
                key: str | bytes = Path(first).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the JWT public key {first}: {exc}") from None
        else:
            key = first
        return JwtAuth(key, "RS256" if kind == "jwt-rs256" else "HS256", opts.get("aud"),
                       opts.get("iss"), opts.get("scope"))
    if kind == "basic" and rest:
        users = dict(pair.split(":", 1) for pair in rest.split(";") if ":" in pair)
        if users:
            return BasicAuth(users)
    raise ConfigError(f"cannot parse --auth {text.split(':')[0]!r}…; use token:SECRET, "
                      "jwt-hs256:SECRET[,aud=A], jwt-rs256:KEY.pem[,aud=A] or basic:USER:PASS")


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable only from this machine (what decides if
    it may run without authentication)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
