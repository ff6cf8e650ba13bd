"""The test mechanics themselves (tests/support.py): waits that follow progress, and say what
did not happen."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.support import wait_for_count, wait_until


def test_a_wait_that_keeps_moving_outlasts_its_timeout() -> None:
    """With a progress measure, a slow but moving condition is met after more than the timeout."""
    counter = itertools.count()
    ticks: list[int] = []

    def tick() -> int:
        ticks.append(next(counter))
        return len(ticks)

    started = time.monotonic()
    wait_until(lambda: tick() >= 12, 0.3, "twelve ticks", progress=lambda: len(ticks),
               interval=0.05)
    assert time.monotonic() - started > 0.3


def test_a_stalled_wait_fails_naming_what_and_where_it_stopped() -> None:
    """A measure that stops moving fails after the stall timeout, with the target and value."""
    values = iter([1, 2, 3])
    with pytest.raises(AssertionError, match=r"5 windows stored \(target 5\).*stuck at 3"):
        wait_for_count(lambda: next(values, 3), 5, 0.2, "5 windows stored", interval=0.02)


def test_a_plain_wait_fails_with_what_did_not_happen() -> None:
    """Without progress the timeout bounds the whole wait and the message says what was awaited."""
    with pytest.raises(AssertionError, match="did not happen within 0.1 s: the impossible"):
        wait_until(lambda: False, 0.1, "the impossible", interval=0.02)
