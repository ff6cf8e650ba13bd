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


def test_windows_of_another_length_align_to_it_as_an_agent_s_do() -> None:
    """``window_s=5``: a backlog covers the last five 5-second windows, a window recorded now
    starts at the current multiple of 5, and every window is 5 s long (an agent run with
    ``window_s`` 5, which a rollout gate can judge within seconds of a canary's switch)."""
    sim = Simulator(SimSettings(BrokerSettings(), "acme", 1, models={"toy": "1.0.0"},
                                window_s=5.0))
    device = sim.devices[0]
    now = time.time()
    device.record(3)
    device.record(1)
    windows = [Window.model_validate_json(device.window(q)) for q in range(1, 5)]
    current = (now // 5) * 5
    assert [w.start for w in windows[:3]] in ([current - 10, current - 5, current],
                                              [current - 5, current, current + 5])
    assert windows[3].start == windows[2].start
    assert all(w.end - w.start == 5.0 for w in windows)
    assert all(w.model_dump_json(exclude_none=True).encode() == device.window(w.seq)
               for w in windows)


def test_bad_settings_are_refused_clearly() -> None:
    with pytest.raises(ConfigError, match="window_s 0.1 is out of range"):
        SimSettings(BrokerSettings(), "acme", 1, window_s=0.1)
    with pytest.raises(ConfigError, match="--devices 0 is out of range"):
        SimSettings(BrokerSettings(), "acme", 0)
    with pytest.raises(ConfigError, match="batch of 2000 windows"):
        SimSettings(BrokerSettings(), "acme", 1, batch_windows=2000)
    with pytest.raises(Exception, match="device id"):
        SimSettings(BrokerSettings(), "acme", 1, prefix="bad/")
