"""Anti-rollback survives removal: once a device installed a release of a model, an older signed
release of it is refused for the life of the cache, whatever was removed in between (as TUF and
Uptane keep version counters)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.device_agent.agent import Agent
from edgeserve.errors import RollbackError
from edgeserve.testing import KeyPair
from tests.device_agent.models import build_mlp_package


@pytest.fixture
def packages(tmp_path: Path, keypair: KeyPair) -> dict[int, Path]:
    return {release: build_mlp_package(tmp_path / f"toy-{release}.edgepkg", keypair,
                                       f"{release}.0.0", release, seed=release, tflite=False)
            for release in (1, 2)}


@pytest.mark.parametrize("how", ["whole model", "each version"])
def test_an_older_release_is_refused_after_the_model_was_removed(
        tmp_path: Path, keypair: KeyPair, packages: dict[int, Path], how: str) -> None:
    """Install release 2, remove the model (at once or version by version): release 1, validly
    signed, is still refused, also after the agent restarts on the same cache."""
    cache = tmp_path / "cache"
    with Agent(cache, "generic-cpu", [keypair.public_path]) as agent:
        agent.install(packages[2])
        if how == "whole model":
            agent.remove("toy", force=True)
        else:
            agent.remove("toy", "2.0.0", force=True)
        assert not agent.list_models()
        with pytest.raises(RollbackError, match="release 1, older than the release 2"):
            agent.install(packages[1])
    with Agent(cache, "generic-cpu", [keypair.public_path]) as restarted, \
            pytest.raises(RollbackError):
        restarted.install(packages[1])


def test_the_same_or_a_newer_release_still_installs(tmp_path: Path, keypair: KeyPair,
                                                    packages: dict[int, Path]) -> None:
    """The floor blocks only older releases: reinstalling the removed release works."""
    with Agent(tmp_path / "cache", "generic-cpu", [keypair.public_path]) as agent:
        agent.install(packages[2])
        agent.remove("toy", force=True)
        assert agent.install(packages[2]).version == "2.0.0"
