"""The servers' listening sockets say TCP, so asyncio's own loop turns Nagle off.

asyncio sets TCP_NODELAY only on sockets whose ``proto`` is IPPROTO_TCP, and an accepted socket
inherits its listener's. A listener made with proto 0 gave every connection Nagle: an HTTP
answer written in two parts (headers, body) then waited ~40 ms for the client's delayed ACK,
22 requests/s on one connection for the agent without uvloop and for the fleet's web API.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from edgeserve.device_agent.server.runner import _bind
from edgeserve.fleet.web.server import listen_socket


async def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio's own loop."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = writer.get_extra_info("socket")
        seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_client, sock=sock)
    try:
        host, port = sock.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        return value
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("make", [
    lambda: _bind("127.0.0.1", 0),
    lambda: listen_socket("127.0.0.1", 0),
], ids=["agent", "fleet-web"])
def test_accepted_connections_have_nagle_off_on_asyncios_loop(
        make: Callable[[], socket.socket]) -> None:
    sock = make()
    assert sock.proto == socket.IPPROTO_TCP
    loop = asyncio.new_event_loop()  # the standard library's loop, not uvloop
    try:
        assert loop.run_until_complete(_accepted_nodelay(sock)) != 0
    finally:
        loop.close()
