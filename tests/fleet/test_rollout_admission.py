"""Rollout admission: devices that cannot run the package, and gates that can never decide, are
refused when the rollout is created, naming the devices and the fix."""

from __future__ import annotations

import pytest

from edgeserve.errors import ConfigError
from edgeserve.fleet.rollouts.admission import DeviceFit, admit
from edgeserve.manifest import Manifest
from edgeserve.testing import make_manifest

ONNX_AND_TFLITE = [
    {"id": "onnx-fp32", "format": "onnx", "precision": "fp32", "path": "artifacts/m.onnx",
     "profiles": ["raspberry-pi-5"]},
    {"id": "tflite-fp32", "format": "tflite", "precision": "fp32", "path": "artifacts/m.tflite",
     "profiles": ["pixel-8"]},
]


@pytest.fixture
def manifest() -> Manifest:
    return make_manifest("iris", "2.0.0", 2, artifacts=ONNX_AND_TFLITE)


def spec(**kw: object) -> dict[str, object]:
    return {"model": "iris", "version": "2.0.0", "stages": [50, 100], "gates": [], **kw}


def test_devices_whose_profile_finds_an_artifact_are_admitted(manifest: Manifest) -> None:
    """A Pi 5 takes the ONNX artifact and a Pixel 8 the TFLite one: both fit."""
    devices = [DeviceFit("pi", "raspberry-pi-5", "1.0.0"), DeviceFit("phone", "pixel-8", None)]
    result = admit(spec(), devices, manifest)
    assert result.fitting == ["pi", "phone"] and not result.unfit and not result.notes


def test_a_device_that_cannot_run_the_package_is_refused_by_name(manifest: Manifest) -> None:
    """An iPhone (Core ML only) gets no artifact: the rollout is refused naming it and the fix;
    --only-fitting narrows the scope to the others, saying so."""
    devices = [DeviceFit("pi", "raspberry-pi-5", "1.0.0"),
               DeviceFit("iphone-3", "iphone-15-pro", "1.0.0")]
    with pytest.raises(ConfigError) as err:
        admit(spec(), devices, manifest)
    assert "1 of 2 device(s) in scope cannot run iris 2.0.0" in str(err.value)
    assert "iphone-3 (profile iphone-15-pro" in str(err.value) and "--only-fitting" in str(err.value)
    narrowed = admit(spec(), devices, manifest, only_fitting=True)
    assert narrowed.spec["selector"] == {"devices": ["pi"]}
    assert "left out: iphone-3" in narrowed.notes[0]


def test_no_fitting_device_at_all_is_refused_even_when_narrowing(manifest: Manifest) -> None:
    """Narrowing to nothing is not a rollout."""
    with pytest.raises(ConfigError, match="none of the 1 device"):
        admit(spec(), [DeviceFit("iphone-3", "iphone-15-pro", None)], manifest,
              only_fitting=True)


def test_devices_the_fleet_cannot_check_stay_in_scope_and_are_listed(manifest: Manifest) -> None:
    """An unknown custom profile, or none reported yet, cannot be checked: kept, noted."""
    devices = [DeviceFit("pi", "raspberry-pi-5", None), DeviceFit("lab", "my-board", None),
               DeviceFit("new", None, None)]
    result = admit(spec(), devices, manifest)
    assert result.fitting == ["pi"] and set(result.unchecked) == {"lab", "new"}
    assert "'my-board' is not known" in result.unchecked["lab"]


def test_no_device_in_scope_is_refused(manifest: Manifest) -> None:
    """A rollout with nobody to roll out to says how to find devices."""
    with pytest.raises(ConfigError, match="no device is in the scope"):
        admit(spec(), [], manifest)


@pytest.mark.parametrize(("devices", "stages", "why"), [
    ([DeviceFit("pi", "raspberry-pi-5", "1.0.0")], [1, 10, 50, 100], "no control can exist"),
    ([DeviceFit(f"pi{i}", "raspberry-pi-5", "1.0.0") for i in range(4)], [100],
     "no control can exist"),
    ([DeviceFit(f"pi{i}", "raspberry-pi-5", None) for i in range(4)], [25, 100],
     "no device in scope runs iris yet"),
])
def test_a_relative_gate_without_a_possible_control_is_refused(
        manifest: Manifest, devices: list[DeviceFit], stages: list[float], why: str) -> None:
    """One device, a single 100 % stage, or a first deployment: 'x*control' could never pass."""
    gated = spec(stages=stages, gates=["p95_ms<=1.2*control"])
    with pytest.raises(ConfigError, match=why) as err:
        admit(gated, devices, manifest)
    assert "absolute bound" in str(err.value)
    admit(spec(stages=stages, gates=["p95_ms<=20"]), devices, manifest)  # absolute: fine


def test_a_relative_gate_with_a_control_is_admitted(manifest: Manifest) -> None:
    """Ten devices on 1.0.0, a 10 % first stage: nine stay behind as the control."""
    devices = [DeviceFit(f"pi{i}", "raspberry-pi-5", "1.0.0") for i in range(10)]
    admit(spec(stages=[10, 100], gates=["p95_ms<=1.2*control"]), devices, manifest)
