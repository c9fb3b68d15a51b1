"""The ferroxy apps the benchmark runs, one per mode. The upstream comes from the
FERROXY_BENCH_UPSTREAM environment variable (``host:port``)."""

from __future__ import annotations

import os

from ferroxy import Peer, Proxy, RequestHeader, ResponseHeader, Session

UPSTREAM = Peer(os.environ.get("FERROXY_BENCH_UPSTREAM", "127.0.0.1:18080"))


class RustPath(Proxy):
    """Mode 1: a static upstream and no hooks: no Python runs per request."""

    upstream = UPSTREAM


class SyncHook(Proxy):
    """Mode 2: one sync hook, response_filter setting a header."""

    upstream = UPSTREAM

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: None
    ) -> None:
        upstream_response.headers["x-proxy"] = "ferroxy"


class AsyncHook(Proxy):
    """Mode 3: one async hook, request_filter reading a header and returning None."""

    upstream = UPSTREAM

    async def request_filter(self, session: Session, ctx: None) -> None:
        session.req.headers.get("user-agent")


class AllHooks(Proxy):
    """Mode 4: every foundation hook overridden, all sync."""

    def new_ctx(self) -> dict[str, str]:
        return {}

    def request_filter(self, session: Session, ctx: dict[str, str]) -> None:
        ctx["ua"] = session.req.headers.get("user-agent") or ""

    def upstream_peer(self, session: Session, ctx: dict[str, str]) -> Peer:
        return UPSTREAM

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: dict[str, str]
    ) -> None:
        upstream_request.headers["x-forwarded-by"] = "ferroxy"

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: dict[str, str]
    ) -> None:
        upstream_response.headers["x-proxy"] = "ferroxy"

    def logging(self, session: Session, error: object, ctx: dict[str, str]) -> None:
        pass
