"""edgeserve: convert trained models for edge devices, serve them offline, roll them out over MQTT.

This core package holds the contracts every part shares: the model package format and its
signatures, hardware profiles, the MQTT topic and message contract, telemetry sketches, errors and
the ``edgeserve`` CLI. The parts are ``edgeserve.converters``, ``edgeserve.device_agent`` and
``edgeserve.fleet``; they import this core, never each other. ``edgeserve.demo`` ties them
together. This core imports no part (``tests/core/test_layering.py``).
"""

from __future__ import annotations

from ._version import __version__
from .errors import EdgeserveError
from .manifest import Artifact, Manifest, TensorSpec
from .package import Package, PackageLimits, PackageWriter, open_package
from .profiles import HardwareProfile, list_profiles, load_profile
from .signing import TrustStore, generate_keypair, load_private_key, load_public_key

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
