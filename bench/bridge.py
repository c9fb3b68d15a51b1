"""Micro-benchmark of the hook bridge alone: response_filter round trips from a tokio thread
to the Python loop thread and back, with no sockets or HTTP.

    python bench/bridge.py [--trips 200000]

Prints microseconds per round trip for a sync and an async hook, with one trip in flight
(latency: every trip pays the wake-up) and with 64 in flight (throughput: trips batch).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from ferroxy import Proxy, ResponseHeader, Session, _core
from ferroxy.server import _LoopServer

#: Printed, with exit status 3, when the installed ferroxy was built without the benchmark.
NOT_BUILT = (
    "this ferroxy was built without the bridge benchmark; rebuild it with\n"
    "    MATURIN_PEP517_ARGS='--features bridge-bench' pip install --no-deps ."
)


class SyncHook(Proxy):
    upstream = "127.0.0.1:9"

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: None
    ) -> None:
        upstream_response.headers["x-proxy"] = "ferroxy"


class AsyncHook(Proxy):
    upstream = "127.0.0.1:9"

    async def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: None
    ) -> None:
        upstream_response.headers["x-proxy"] = "ferroxy"


def measure(app: type[Proxy], trips: int, in_flight: int, repeats: int) -> float:
    """Median microseconds per round trip over ``repeats`` runs."""
    loop = asyncio.new_event_loop()
    try:
        served = _LoopServer(app, loop, {})
        server = served.server
        loop.add_reader(server.fileno(), server.run_pending)
        runs = []
        for _ in range(repeats):
            elapsed = loop.run_until_complete(
                loop.run_in_executor(None, server.bench_bridge, trips, in_flight)
            )
            runs.append(elapsed / trips * 1e6)
        loop.remove_reader(server.fileno())
        return statistics.median(runs)
    finally:
        loop.close()


def main() -> None:
    if not hasattr(_core.Server, "bench_bridge"):
        print(NOT_BUILT, file=sys.stderr)
        sys.exit(3)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for app in (SyncHook, AsyncHook):
        for in_flight in (1, 64):
            us = measure(app, args.trips, in_flight, args.repeats)
            print(f"{app.__name__:9} in_flight={in_flight:<3} {us:6.2f} us per round trip")


if __name__ == "__main__":
    main()
