"""Failures a user sees: upstream refused / dropped / slow, malformed requests, hooks that
raise or return the wrong type, fail_to_proxy and the logging hook's error."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from conftest import (
    LogCapture,
    free_port,
    raw_connect,
    read_response,
    simple_request,
    wait_closed,
    wait_until,
)
from ferroxy import Peer, Proxy, Response


def _refused_addr() -> str:
    return f"127.0.0.1:{free_port()}"


def test_connect_refused_is_502(ferroxy_proxy) -> None:
    addr = _refused_addr()

    class App(Proxy):
        upstream = Peer(addr, connect_timeout=10.0)

    proxy = ferroxy_proxy(App)
    start = time.monotonic()
    r = httpx.get(proxy.url + "/x", timeout=15)
    elapsed = time.monotonic() - start
    assert r.status_code == 502
    assert len(r.content) < 4096
    assert elapsed < 2.0, (
        f"a refused connect must fail fast, not wait connect_timeout ({elapsed:.1f}s)"
    )
    # the proxy keeps serving
    assert httpx.get(proxy.url + "/y", timeout=15).status_code == 502


def test_upstream_drops_mid_response_is_visible(ferroxy_upstream, ferroxy_proxy) -> None:
    """/close drops the upstream connection after its head and 1000 of the 1000000 bytes it
    announced: the head is already on its way, so the client must see the body cut short
    (a transport error), never a clean but short response."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    received = 0
    with httpx.Client(base_url=proxy.url, timeout=10) as c, c.stream("GET", "/close") as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == "1000000"
        with pytest.raises(httpx.TransportError):
            for chunk in r.iter_raw():
                received += len(chunk)
    assert received < 1_000_000
    # and the proxy still serves afterwards
    assert httpx.get(proxy.url + "/ok", timeout=10).status_code == 200


def test_read_timeout_is_504(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr, read_timeout=0.2)

    proxy = ferroxy_proxy(App)
    start = time.monotonic()
    r = httpx.get(proxy.url + "/delay/2000", timeout=10)
    elapsed = time.monotonic() - start
    assert r.status_code == 504
    assert len(r.content) < 1024, "the timeout page should be short"
    assert elapsed < 1.5, f"504 took {elapsed:.2f}s with read_timeout=0.2"


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nThis is not a header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["garbage", "bad-header-line", "bad-content-length", "control-char-in-path"],
)
def test_malformed_request_gets_400_and_close(ferroxy_upstream, ferroxy_proxy, raw: bytes) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    with sock:
        sock.sendall(raw)
        closed, data = wait_closed(sock, timeout=3)
    assert data.startswith(b"HTTP/1.1 400"), f"expected 'HTTP/1.1 400', got {data[:200]!r}"
    assert closed, "the connection must close after a 400 for a malformed request"
    assert ferroxy_upstream.requests == 0
    assert httpx.get(proxy.url + "/still-up", timeout=10).status_code == 200


@pytest.mark.parametrize("use_async", [False, True], ids=["def", "async-def"])
def test_hook_raising_gives_500_and_logs_traceback(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy, use_async: bool
) -> None:
    if use_async:

        class App(Proxy):
            upstream = ferroxy_upstream.addr

            async def request_filter(self, session, ctx):
                if session.req.path == "/boom":
                    raise RuntimeError("kaboom-in-request-filter")
                return None

    else:

        class App(Proxy):  # type: ignore[no-redef]
            upstream = ferroxy_upstream.addr

            def request_filter(self, session, ctx):
                if session.req.path == "/boom":
                    raise RuntimeError("kaboom-in-request-filter")
                return None

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get("/boom")
        assert r.status_code == 500
        assert "kaboom" not in r.text, "the exception text must not leak to the client"
        assert c.get("/fine").status_code == 200, "the proxy must keep serving after a hook error"
    recs = ferroxy_logs.wait_for(lambda rec: "kaboom-in-request-filter" in LogCapture.text(rec))
    assert recs, f"no log record with the exception\n{ferroxy_logs.dump()}"
    text = LogCapture.text(recs[0])
    assert "Traceback" in text and "RuntimeError" in text, f"traceback not logged:\n{text}"
    assert recs[0].name.startswith("ferroxy")


@pytest.mark.parametrize("hook", ["upstream_request_filter", "response_filter"])
def test_later_hook_raising_gives_500(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy, hook: str
) -> None:
    def boom(self, session, *args):
        if session.req.path == "/boom":
            raise ValueError(f"kaboom-in-{hook}")

    App = type("App", (Proxy,), {"upstream": ferroxy_upstream.addr, hook: boom})
    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/boom").status_code == 500
        assert c.get("/fine").status_code == 200
    assert ferroxy_logs.wait_for(lambda rec: f"kaboom-in-{hook}" in LogCapture.text(rec)), (
        ferroxy_logs.dump()
    )


def test_upstream_peer_raising_gives_502(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy
) -> None:
    class App(Proxy):
        def upstream_peer(self, session, ctx):
            if session.req.path == "/boom":
                raise LookupError("no-route-kaboom")
            return Peer(ferroxy_upstream.addr)

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/boom").status_code == 502
        assert c.get("/fine").status_code == 200
    recs = ferroxy_logs.wait_for(lambda rec: "no-route-kaboom" in LogCapture.text(rec))
    assert recs and "Traceback" in LogCapture.text(recs[0]), ferroxy_logs.dump()


def test_wrong_return_type_request_filter(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            if session.req.path == "/bad":
                return 42
            return None

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/bad").status_code == 500
        assert c.get("/fine").status_code == 200
    recs = ferroxy_logs.wait_for(
        lambda rec: "request_filter" in LogCapture.text(rec) and "int" in LogCapture.text(rec)
    )
    assert recs, f"no log names the hook and the type returned\n{ferroxy_logs.dump()}"
    assert "request_filter returned int" in LogCapture.text(recs[0]), LogCapture.text(recs[0])


def test_wrong_return_type_upstream_peer(ferroxy_logs: LogCapture, ferroxy_proxy) -> None:
    class App(Proxy):
        def upstream_peer(self, session, ctx):
            return 8080

    proxy = ferroxy_proxy(App)
    assert httpx.get(proxy.url + "/bad", timeout=10).status_code == 502
    recs = ferroxy_logs.wait_for(lambda rec: "upstream_peer returned int" in LogCapture.text(rec))
    assert recs, f"no log names upstream_peer and int\n{ferroxy_logs.dump()}"


def test_fail_to_proxy_custom_error_page(ferroxy_upstream, ferroxy_proxy) -> None:
    down = _refused_addr()
    seen: list[tuple[str, str | None, int, str]] = []

    class App(Proxy):
        def upstream_peer(self, session, ctx):
            if session.req.query == "slow":
                return Peer(ferroxy_upstream.addr, read_timeout=0.2)
            return Peer(down)

        def fail_to_proxy(self, session, error, ctx):
            seen.append(
                (error.kind, error.peer.addr if error.peer else None, error.status, error.message)
            )
            if session.req.path == "/default":
                return None
            return Response(
                503,
                headers={"content-type": "text/plain", "retry-after": "5"},
                body=f"custom: {error.kind}".encode(),
            )

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get("/custom")
        assert r.status_code == 503
        assert r.text == "custom: connect_refused"
        assert r.headers["retry-after"] == "5"

        r = c.get("/default")
        assert r.status_code == 502, "fail_to_proxy returning None keeps the default page"

        r = c.get("/delay/2000?slow")
        assert r.status_code == 503
        assert r.text == "custom: read_timeout"

    assert [s[0] for s in seen] == ["connect_refused", "connect_refused", "read_timeout"]
    assert seen[0][1] == down, "error.peer must be the peer that failed"
    assert seen[0][2] == 502
    assert seen[2][2] == 504
    assert seen[0][3], "error.message must describe the failure"


def test_logging_hook_error_none_on_success_kind_on_failure(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    down = _refused_addr()
    logged: list[tuple[str, Any]] = []

    class App(Proxy):
        def request_filter(self, session, ctx):
            if session.req.path == "/hook-fails":
                raise RuntimeError("expected failure")
            return None

        def upstream_peer(self, session, ctx):
            if session.req.path == "/down":
                return Peer(down)
            if session.req.query == "slow":
                return Peer(ferroxy_upstream.addr, read_timeout=0.2)
            return Peer(ferroxy_upstream.addr)

        def logging(self, session, error, ctx):
            logged.append((session.req.path, None if error is None else (error.kind, error.status)))

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/ok").status_code == 200
        assert c.get("/down").status_code == 502
        assert c.get("/delay/2000?slow").status_code == 504
        assert c.get("/hook-fails").status_code == 500
        assert c.get("/status/500").status_code == 500
        # The engine queues a request's logging call before it reads the next request on
        # the connection, and Python runs the queue in order: once this one is logged, a
        # second call for any earlier request would have been made too.
        assert c.get("/last").status_code == 200
    assert wait_until(lambda: ("/last", None) in logged, timeout=2), logged
    assert dict(logged) == {
        "/ok": None,
        "/down": ("connect_refused", 502),
        "/delay/2000": ("read_timeout", 504),
        "/hook-fails": ("hook_error", 500),
        "/status/500": None,  # an upstream 500 is a proxied response, not a proxy error
        "/last": None,
    }
    assert len(logged) == 6, f"logging must run exactly once per request: {logged}"


def test_logging_hook_sees_upstream_drop(ferroxy_upstream, ferroxy_proxy) -> None:
    logged: list[Any] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def logging(self, session, error, ctx):
            logged.append(None if error is None else error.kind)

    proxy = ferroxy_proxy(App)
    try:
        with httpx.Client(timeout=10) as c, c.stream("GET", proxy.url + "/close") as r:
            r.read()
    except httpx.HTTPError:
        pass
    assert wait_until(lambda: logged, timeout=2)
    assert logged[0] is not None, "a request whose upstream dropped mid-response is not a success"
    assert logged[0] == "upstream_closed", logged


def test_logging_hook_raising_is_harmless(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def logging(self, session, error, ctx):
            raise RuntimeError("logging-hook-kaboom")

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/a").status_code == 200
        assert c.get("/b").status_code == 200
    assert ferroxy_logs.wait_for(lambda rec: "logging-hook-kaboom" in LogCapture.text(rec)), (
        ferroxy_logs.dump()
    )


def test_keepalive_connection_survives_hook_error(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            if session.req.path == "/boom":
                raise RuntimeError("boom")

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(simple_request("GET", "/boom"))
        assert read_response(rfile).status == 500
        sock.sendall(simple_request("GET", "/after"))
        resp = read_response(rfile)
        assert resp.status == 200
        assert resp.json()["path"] == "/after"


def test_logging_runs_when_the_client_leaves_mid_phase(ferroxy_upstream, ferroxy_proxy) -> None:
    """The logging hook always runs last, even when the client disconnects while a hook
    is still working on its request."""
    import asyncio

    in_hook = threading.Event()

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session, ctx):
            in_hook.set()
            await asyncio.sleep(0.5)  # not a wait: the hook is still busy when the client leaves

        def logging(self, session, error, ctx):
            seen.append((session.req.path, None if error is None else error.kind))

    seen: list[tuple[str, str | None]] = []
    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    sock.sendall(b"GET /gone HTTP/1.1\r\nhost: x\r\n\r\n")
    assert in_hook.wait(timeout=3), "the request never reached request_filter"
    sock.close()
    assert wait_until(lambda: seen, timeout=3), "the logging hook never ran"
    assert seen == [("/gone", "downstream_closed")]


def test_connect_method_is_refused(ferroxy_upstream, ferroxy_proxy) -> None:
    """A reverse proxy does not tunnel: CONNECT gets 405 and reaches no upstream."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
    assert read_response(sock.makefile("rb")).status == 405
    assert ferroxy_upstream.requests == 0
