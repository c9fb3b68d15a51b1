"""The hook bridge under load: many phases in flight from the engine's threads at once must
all come back (a lost wake-up would leave them waiting forever)."""

from __future__ import annotations

import asyncio

import pytest
from ferroxy import Proxy

CONNECTIONS = 64
REQUESTS_PER_CONNECTION = 120


class Tagger(Proxy):
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        # Counted in the hook itself: python_calls counts phases handed to the bridge,
        # not phases Python ran to the end.
        self.completed = 0

    def response_filter(self, session, upstream_response, ctx):
        upstream_response.headers["x-tag"] = "1"
        self.completed += 1


class AsyncTagger(Tagger):
    async def response_filter(self, session, upstream_response, ctx):
        await asyncio.sleep(0)
        upstream_response.headers["x-tag"] = "1"
        self.completed += 1


async def _keep_alive_client(port: int, requests: int) -> int:
    """Send ``requests`` GETs one after another on one connection; returns how many came
    back tagged by the hook."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    tagged = 0
    try:
        for i in range(requests):
            writer.write(f"GET /load/{i} HTTP/1.1\r\nHost: load\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            fields = dict(
                line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if line
            )
            length = int(fields.get("content-length", fields.get("Content-Length", "0")))
            await reader.readexactly(length)
            tagged += fields.get("x-tag") == "1"
    finally:
        writer.close()
    return tagged


@pytest.mark.parametrize("app_class", [Tagger, AsyncTagger])
def test_every_phase_comes_back_under_load(ferroxy_upstream, ferroxy_proxy, app_class) -> None:
    app = app_class(ferroxy_upstream.addr)
    proxy = ferroxy_proxy(app, threads=2, access_log=False)

    async def load() -> list[int]:
        clients = (
            _keep_alive_client(proxy.port, REQUESTS_PER_CONNECTION) for _ in range(CONNECTIONS)
        )
        # A lost wake-up shows up as this timeout.
        return await asyncio.wait_for(asyncio.gather(*clients), timeout=60)

    tagged = asyncio.run(load())
    total = CONNECTIONS * REQUESTS_PER_CONNECTION
    assert sum(tagged) == total, f"{total - sum(tagged)} responses came back untagged"
    assert app.completed == total, f"{app_class.__name__}: the hook ran {app.completed} times"
    assert proxy.python_calls == total
