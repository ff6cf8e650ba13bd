"""``--loop``: which event loop the agent's servers run, and the errors for what cannot be had."""

from __future__ import annotations

import importlib.util

import pytest

from edgeserve.device_agent.server.runner import event_loop
from edgeserve.errors import ConfigError


def test_auto_is_uvloop_when_installed_else_asyncios() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    assert event_loop("auto") == ("uvloop" if installed else "asyncio")
    assert event_loop("asyncio") == "asyncio"


def test_uvloop_asked_for_but_missing_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvloop" else real(name, *a))
    assert event_loop("auto") == "asyncio"
    with pytest.raises(ConfigError, match=r"uvloop is not installed.*--loop asyncio"):
        event_loop("uvloop")


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown event loop 'trio'; choose one of auto"):
        event_loop("trio")
