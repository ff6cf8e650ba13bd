"""Secrets handled as a careful operator would: slow salted password hashes, HS256 secrets long
enough to resist guessing, tokens that expire within reason, secrets kept out of ``ps``."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner

from edgeserve.auth import JwtAuth, hash_password, parse_auth_option
from edgeserve.cli import cli
from edgeserve.errors import AuthError, ConfigError


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_passwords_are_stored_as_salted_scrypt_hashes() -> None:
    """Two hashes of one password differ (salt); each checks the password and nothing else;
    the CLI prints one."""
    first, second = hash_password("hunter2-long"), hash_password("hunter2-long")
    assert first.startswith("scrypt:") and first != second
    auth = parse_auth_option(f"basic:ops:{first}")
    assert auth is not None and auth.check(basic("ops", "hunter2-long")) == "ops"
    with pytest.raises(AuthError):
        auth.check(basic("ops", "hunter3-long"))
    printed = CliRunner().invoke(cli, ["keys", "hash-password", "--password", "s3cret"])
    assert printed.exit_code == 0 and printed.output.startswith("scrypt:")


def test_a_short_hs256_secret_is_refused() -> None:
    """A 13-byte shared secret is brute-forceable: refused at start, with the fix."""
    with pytest.raises(ConfigError, match="at least 32"):
        parse_auth_option("jwt-hs256:thirteen-byte")


def test_a_token_that_expires_in_the_far_future_is_refused() -> None:
    """exp = 10^20 is not a token but a bug or a forgery."""
    auth = JwtAuth("k" * 32, "HS256")
    good = jwt.encode({"sub": "ops", "exp": time.time() + 3600}, "k" * 32, "HS256")
    assert auth.check(f"Bearer {good}") == "ops"
    forever = jwt.encode({"sub": "ops", "exp": 10**20}, "k" * 32, "HS256")
    with pytest.raises(AuthError, match="expires more than"):
        auth.check(f"Bearer {forever}")


def test_a_secret_can_come_from_a_file(tmp_path: Path) -> None:
    """'token:@FILE' reads the secret, so it never shows on the command line."""
    (tmp_path / "token").write_text("from-a-file\n")
    auth = parse_auth_option(f"token:@{tmp_path / 'token'}")
    assert auth is not None and auth.check("Bearer from-a-file") == "token"
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        parse_auth_option(f"token:@{tmp_path / 'missing'}")
