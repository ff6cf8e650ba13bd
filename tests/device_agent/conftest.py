"""Session-scoped real packages (ONNX + TFLite made here) and profiles for the agent tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.profiles import HardwareProfile, load_profile
from edgeserve.testing import KeyPair, make_keypair

from .models import build_conv_package, build_mlp_package, write_profile


@pytest.fixture(scope="session")
def agent_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys, packages v1/v2 of the toy MLP, the conv model and test profiles (built once)."""
    root = tmp_path_factory.mktemp("agent-assets")
    key = make_keypair(root / "keys", "signer")
    memo: dict[str, bytes] = {}
    assets = {
        "root": root,
        "public_key": key.public_path,
        "private_key": key.private_path,
        "pkg_v1": build_mlp_package(root / "toy-1.0.0.edgepkg", key, cache=memo),
        "pkg_v2": build_mlp_package(root / "toy-1.1.0.edgepkg", key, "1.1.0", 2, seed=11,
                                    cache=memo),
        "pkg_v3": build_mlp_package(root / "toy-1.2.0.edgepkg", key, "1.2.0", 3, seed=13,
                                    tflite=False),
        "conv": build_conv_package(root / "conv.edgepkg", key),
        "profile_tflite": write_profile(root / "profiles", "test-tflite", """
[[artifacts]]
format = "tflite"
precision = "fp32"
"""),
        "profile_int8": write_profile(root / "profiles", "test-int8", """
[[artifacts]]
format = "tflite"
precision = "int8"
quantization = "full-integer"
io_dtype = "int8"
"""),
    }
    return assets


@pytest.fixture(scope="session")
def signer(agent_assets: dict[str, Path]) -> KeyPair:
    from edgeserve.signing import key_id, load_public_key
    public = agent_assets["public_key"]
    return KeyPair(agent_assets["private_key"], public, key_id(load_public_key(public)))


@pytest.fixture(scope="session")
def tflite_profile(agent_assets: dict[str, Path]) -> HardwareProfile:
    return load_profile(agent_assets["profile_tflite"])


@pytest.fixture(scope="session")
def int8_profile(agent_assets: dict[str, Path]) -> HardwareProfile:
    return load_profile(agent_assets["profile_int8"])
