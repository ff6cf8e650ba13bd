"""With auth on, the fleet's artifact endpoint no longer serves models to anyone: a device
fetches the version its signed desired state names with the download token in it, operators
with their credentials, nobody else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edgeserve.contract import Desired
from edgeserve.device_agent.agent import Agent
from edgeserve.device_agent.updates.updater import Updater
from edgeserve.fleet.artifact_tokens import ArtifactTokens
from edgeserve.fleet.artifacts import ArtifactStore
from edgeserve.fleet.store import Store
from edgeserve.fleet.web.app import create_app
from edgeserve.fleet.web.artifacts import package_base_url
from edgeserve.fleet.web.server import ServerHandle, start_server
from edgeserve.testing import KeyPair, make_keypair
from tests.device_agent.models import build_mlp_package
from tests.fleet.conftest import AUTH, PasswordAuth


@pytest.fixture
def protected(tmp_path: Path, keypair: KeyPair,
              web_store: Store) -> Iterator[tuple[ServerHandle, ArtifactStore, ArtifactTokens]]:
    artifacts = ArtifactStore(tmp_path / "artifacts", keypair.trust)
    for version, release in (("1.0.0", 1), ("2.0.0", 2)):
        artifacts.publish(build_mlp_package(tmp_path / f"toy-{version}.edgepkg", keypair,
                                            version, release, seed=release, tflite=False))
    tokens = ArtifactTokens.from_key(make_keypair(tmp_path / "fleet", "fleet").private)
    handle = start_server(create_app(web_store, artifacts, authenticator=PasswordAuth(),
                                     protect_artifacts=True, artifact_tokens=tokens))
    try:
        yield handle, artifacts, tokens
    finally:
        handle.stop()


def test_only_a_token_for_that_version_or_credentials_open_it(
        protected: tuple[ServerHandle, ArtifactStore, ArtifactTokens]) -> None:
    """No credentials: 401; cam-7's token for 1.0.0 opens 1.0.0 (Range too) but not 2.0.0; an
    altered token opens nothing; the operator's credentials open everything."""
    handle, _, tokens = protected
    base = f"{handle.url}/v1/packages/toy"

    def get(path: str, token: str | None = None, **kw: object) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(f"{base}/{path}", headers=headers, timeout=10, **kw)  # type: ignore[arg-type]

    token = tokens.mint("cam-7", "toy", "1.0.0")
    assert get("1.0.0/manifest.json").status_code == 401
    assert get("1.0.0/manifest.json", token).status_code == 200
    ranged = requests.get(f"{base}/1.0.0/files/artifacts/toy.onnx", timeout=10,
                          headers={"Authorization": f"Bearer {token}", "Range": "bytes=10-"})
    assert ranged.status_code == 206
    assert get("2.0.0/manifest.json", token).status_code == 401
    assert get("1.0.0/manifest.json", token[:-1] + ("0" if token[-1] != "0" else "1")
               ).status_code == 401
    assert requests.get(f"{handle.url}/v1/packages", timeout=10).status_code == 401
    assert requests.get(f"{handle.url}/v1/packages", auth=AUTH, timeout=10).status_code == 200


def test_a_device_fetches_with_the_token_its_desired_state_carries(
        tmp_path: Path, keypair: KeyPair,
        protected: tuple[ServerHandle, ArtifactStore, ArtifactTokens]) -> None:
    """The updater sends the token of the version it fetches and installs it; without one the
    fleet says 401, which retrying cannot fix (failed at once)."""
    handle, artifacts, tokens = protected
    published = artifacts.get("toy", "1.0.0")

    def desired(revision: int, token: str | None) -> Desired:
        return Desired.model_validate({"v": 1, "revision": revision, "models": {"toy": {
            "active": "1.0.0", "health": {"min_inferences": 0}, "versions": {"1.0.0": {
                "release": published.release, "manifest_sha256": published.manifest_sha256,
                "url": package_base_url(handle.url, "toy", "1.0.0"), "token": token}}}}})

    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path]) as agent:
        updater = Updater(agent, "cam-7", tmp_path / "updater")
        refused = updater.apply(desired(1, None)).models["toy"]
        assert refused.state == "failed" and refused.last_error is not None
        assert "401" in refused.last_error.message
        done = updater.apply(desired(2, tokens.mint("cam-7", "toy", "1.0.0")))
        assert done.models["toy"].state == "committed"
        assert agent.active_version("toy") == "1.0.0"
