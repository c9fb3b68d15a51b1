"""The hook bridge under load: many phases in flight from the engine's threads at once must
all come back (a lost wake-up would leave them waiting forever)."""

from __future__ import annotations

import asyncio

from ferroxy import Proxy
from ferroxy.server import _LoopServer


class Tagger(Proxy):
    upstream = "127.0.0.1:9"

    def __init__(self) -> None:
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


def _round_trips(app: Proxy, trips: int, in_flight: int) -> int:
    """Drive ``trips`` response_filter round trips through the bridge; returns the phases
    handed to Python. A lost wake-up shows up as the 60 s timeout."""
    loop = asyncio.new_event_loop()
    try:
        served = _LoopServer(app, loop, {})
        server = served.server
        loop.add_reader(server.fileno(), server.run_pending)
        work = loop.run_in_executor(None, server.bench_bridge, trips, in_flight)
        loop.run_until_complete(asyncio.wait_for(work, timeout=60))
        loop.remove_reader(server.fileno())
        return server.python_calls
    finally:
        loop.close()


def test_every_phase_comes_back_under_load() -> None:
    for app in (Tagger(), AsyncTagger()):
        handed_over = _round_trips(app, trips=20_000, in_flight=64)
        assert app.completed == 20_000, f"{type(app).__name__}: the hook ran {app.completed} times"
        assert handed_over == 20_000
