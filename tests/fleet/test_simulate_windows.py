"""The simulator's windows (no broker needed): the contract's own bytes, numbered without gaps,
stamped with the minutes they were recorded in, and the same bytes when sent again."""

from __future__ import annotations

import time

import pytest

from edgeserve.contract import Window
from edgeserve.errors import ConfigError
from edgeserve.fleet.simulate import SimDevice, SimSettings, Simulator, window_bytes
from edgeserve.mqtt import BrokerSettings


def _device() -> SimDevice:
    sim = Simulator(SimSettings(BrokerSettings(), "acme", 2, models={"toy": "1.0.0"}))
    return sim.devices[0]


def test_windows_are_what_the_contract_encodes_and_stay_the_same() -> None:
    """A backlog of 5 covers the last 5 minutes, seq 1-5; a window recorded later is this
    minute's; after a version change new windows name it and old ones keep theirs; every
    window's bytes are ``Window.model_dump_json`` of themselves, and identical when rebuilt."""
    device = _device()
    minute = (time.time() // 60) * 60
    device.record(5)
    first = [device.window(q) for q in range(1, 6)]
    windows = [Window.model_validate_json(raw) for raw in first]
    assert [w.seq for w in windows] == [1, 2, 3, 4, 5]
    assert [w.start for w in windows] == [minute - 60 * k for k in (4, 3, 2, 1, 0)]
    assert all(w.end == w.start + 60 for w in windows)
    assert all(w.model_dump_json(exclude_none=True).encode() == raw
               for w, raw in zip(windows, first, strict=True))
    assert {w.version for w in windows if w.model} == {"1.0.0"}
    device.models["toy"] = "2.0.0"
    device.record(1)
    device.record(1)
    later = [Window.model_validate_json(device.window(q)) for q in (6, 7)]
    assert [w.version for w in later] == ["2.0.0", "2.0.0"]
    assert later[0].start == later[1].start >= minute
    assert [device.window(q) for q in range(1, 6)] == first
    health = Window.model_validate_json(window_bytes(8, minute, {"toy": "1.0.0"}))  # every 8th
    assert health.model is None and health.health is not None


def test_bad_settings_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="--devices 0 is out of range"):
        SimSettings(BrokerSettings(), "acme", 0)
    with pytest.raises(ConfigError, match="batch of 2000 windows"):
        SimSettings(BrokerSettings(), "acme", 1, batch_windows=2000)
    with pytest.raises(Exception, match="device id"):
        SimSettings(BrokerSettings(), "acme", 1, prefix="bad/")
