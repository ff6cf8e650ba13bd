"""The HTTP server takes a body that has arrived without arming a timer, and one still on its
way under a timeout (device_agent/server/http.py ``_now_or_later``): the two paths must behave
as a plain ``await`` would, results, exceptions and cancellation alike."""

from __future__ import annotations

import asyncio

import pytest

from edgeserve.device_agent.server.http import _now_or_later


def test_a_coroutine_that_does_not_suspend_is_answered_at_once() -> None:
    async def ready() -> dict[str, object]:
        return {"type": "http.request", "body": b"x"}

    value, later = _now_or_later(ready())
    assert later is None and value == {"type": "http.request", "body": b"x"}


def test_a_suspended_coroutine_resumes_with_its_result_and_its_errors() -> None:
    async def main() -> None:
        event = asyncio.Event()

        async def waits(fail: bool) -> str:
            await event.wait()
            await asyncio.sleep(0)  # a second suspension after the first
            if fail:
                raise ValueError("broken body")
            return "done"

        value, later = _now_or_later(waits(False))
        assert value is None and later is not None
        failing = _now_or_later(waits(True))[1]
        assert failing is not None
        asyncio.get_running_loop().call_later(0.01, event.set)
        assert await later == "done"
        with pytest.raises(ValueError, match="broken body"):
            await failing

    asyncio.run(main())


def test_a_timeout_cancels_the_waiting_coroutine() -> None:
    async def main() -> list[str]:
        seen: list[str] = []

        async def never() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        _, later = _now_or_later(never())
        assert later is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await later
        return seen

    assert asyncio.run(main()) == ["cancelled"]


def test_an_awaitable_that_is_not_a_coroutine_is_left_to_await() -> None:
    async def main() -> None:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        value, later = _now_or_later(future)
        assert value is None and later is future
        future.set_result(7)
        assert await later == 7

    asyncio.run(main())
