"""ferroxy.testing.simulate: an app's real phases with no sockets, as mitmproxy's tflow does."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from ferroxy import Proxy, ProxyError, RequestHeader, Response, ResponseHeader, Session
from ferroxy.__main__ import load_target
from ferroxy.testing import request, simulate

UPSTREAM = "127.0.0.1:8081"

# The README's example app, as the README's simulate examples test it.
App = load_target(str(Path(__file__).resolve().parent.parent / "examples" / "hello.py") + ":App")


def test_blocked() -> None:
    out = simulate(App, request("GET", "/blocked"))
    assert out.status == 403 and out.upstream_request is None
    assert out.body == b"blocked\n"
    assert out.peer is None and out.error is None


def test_served_by() -> None:
    out = simulate(
        App,
        request("GET", "/a?b=1", headers={"x-user": "u1"}, body=b""),
        upstream=Response(200, headers={"content-type": "text/plain"}, body=b"hi"),
    )
    assert out.headers["x-served-by"] == "ferroxy" and out.body == b"hi"
    assert out.headers["content-type"] == "text/plain"
    assert out.upstream_request is not None
    assert out.upstream_request.headers["x-forwarded-for"] == "127.0.0.1"
    assert (out.upstream_request.path, out.upstream_request.query) == ("/a", "b=1")
    assert out.upstream_request.headers["x-user"] == "u1"
    assert out.peer is not None and out.peer.addr == UPSTREAM


def test_default_upstream_is_an_empty_200_and_bodies_reach_it() -> None:
    class Fixed(Proxy):
        upstream = UPSTREAM

    out = simulate(Fixed, request("POST", "/up", body=b"payload", client_addr="10.1.2.3:4444"))
    assert (out.status, out.body) == (200, b"")
    assert out.upstream_body == b"payload"
    assert out.upstream_request is not None
    assert out.upstream_request.method == "POST"
    assert out.upstream_request.headers["x-forwarded-for"] == "10.1.2.3"


def test_upstream_request_filter_edits_what_is_sent() -> None:
    class Rewrite(Proxy):
        upstream = UPSTREAM

        def upstream_request_filter(
            self, session: Session, upstream_request: RequestHeader, ctx: Any
        ) -> None:
            upstream_request.headers["x-added"] = "1"
            upstream_request.path = "/rewritten"
            del upstream_request.headers["x-secret"]

    out = simulate(Rewrite, request("GET", "/orig", headers={"x-secret": "s"}))
    assert out.upstream_request is not None
    assert out.upstream_request.path == "/rewritten"
    assert out.upstream_request.headers["x-added"] == "1"
    assert "x-secret" not in out.upstream_request.headers


def test_async_hooks_that_really_suspend() -> None:
    class Slow(Proxy):
        upstream = UPSTREAM

        async def request_filter(self, session: Session, ctx: Any) -> None:
            await asyncio.sleep(0.01)
            session.req.headers["x-waited"] = "yes"

        async def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: Any
        ) -> None:
            await asyncio.sleep(0.01)
            upstream_response.status = 201

    out = simulate(Slow(), request("GET", "/"))
    assert out.status == 201
    assert out.upstream_request is not None
    assert out.upstream_request.headers["x-waited"] == "yes"


def test_failures_reach_fail_to_proxy_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    seen: dict[str, Any] = {}

    class Failing(Proxy):
        upstream = UPSTREAM

        def new_ctx(self) -> dict[str, str]:
            return {"made": "yes"}

        def request_filter(self, session: Session, ctx: dict[str, str]) -> None:
            raise ValueError("boom")

        def fail_to_proxy(
            self, session: Session, error: ProxyError, ctx: dict[str, str]
        ) -> Response:
            seen["fail"] = (error.kind, ctx["made"])
            return Response(503, body=b"sorry")

        def logging(self, session: Session, error: ProxyError | None, ctx: dict[str, str]) -> None:
            seen["logging"] = error.kind if error else None

    with caplog.at_level(logging.ERROR, logger="ferroxy"):
        out = simulate(Failing, request("GET", "/"))
    assert (out.status, out.body) == (503, b"sorry")
    assert out.error is not None and out.error.kind == "hook_error"
    assert out.upstream_request is None
    assert seen == {"fail": ("hook_error", "yes"), "logging": "hook_error"}
    assert any("ValueError: boom" in r.getMessage() or r.exc_info for r in caplog.records)


def test_needs_no_network() -> None:
    """Nothing listens on the upstream's port: a real exchange would be a 502."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"

    class Dead(Proxy):
        upstream = dead

    out = simulate(Dead, request("GET", "/x"), upstream=Response(204))
    assert out.status == 204 and out.error is None
    assert out.peer is not None and out.peer.addr == dead


def test_bad_requests_are_refused_by_field() -> None:
    with pytest.raises(ValueError, match="path must start with '/'"):
        simulate(App, request("GET", "no-slash"))
    with pytest.raises(ValueError, match="client_addr"):
        simulate(App, request("GET", "/", client_addr="nowhere"))


def test_an_async_logging_hook_runs_to_its_end() -> None:
    done: list[str] = []

    class Logged(Proxy):
        upstream = UPSTREAM

        async def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
            await asyncio.sleep(0.01)  # really suspends: a task on the loop
            done.append(session.req.path)

    out = simulate(Logged, request("GET", "/logged"))
    assert out.status == 200
    assert done == ["/logged"], "simulate returned before the logging hook finished"
