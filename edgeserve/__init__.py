"""edgeserve: convert trained models for edge devices, serve them offline, roll them out over MQTT.

This core package holds the contracts every part shares: the model package format and its
signatures, hardware profiles, the MQTT topic and message contract, telemetry sketches, errors and
the ``edgeserve`` CLI. The parts are ``edgeserve.converters``, ``edgeserve.device_agent`` and
``edgeserve.fleet``; they import this core, never each other. ``edgeserve.demo`` ties them
together. This core imports no part (``tests/core/test_layering.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .errors import EdgeserveError
    from .manifest import Artifact, Manifest, TensorSpec
    from .package import Package, PackageLimits, PackageWriter, open_package
    from .profiles import HardwareProfile, list_profiles, load_profile
    from .signing import TrustStore, generate_keypair, load_private_key, load_public_key

# Re-exports load on first use (PEP 562): ``import edgeserve.errors`` on a device must not pay for
# cryptography and the package reader (docs/benchmarks.md, "Agent footprint").
_LAZY = {
    "EdgeserveError": "errors",
    "Artifact": "manifest", "Manifest": "manifest", "TensorSpec": "manifest",
    "Package": "package", "PackageLimits": "package", "PackageWriter": "package",
    "open_package": "package",
    "HardwareProfile": "profiles", "list_profiles": "profiles", "load_profile": "profiles",
    "TrustStore": "signing", "generate_keypair": "signing", "load_private_key": "signing",
    "load_public_key": "signing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "Artifact",
    "EdgeserveError",
    "HardwareProfile",
    "Manifest",
    "Package",
    "PackageLimits",
    "PackageWriter",
    "TensorSpec",
    "TrustStore",
    "__version__",
    "generate_keypair",
    "list_profiles",
    "load_private_key",
    "load_profile",
    "load_public_key",
    "open_package",
]
