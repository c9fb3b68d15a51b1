"""The hooks a Proxy subclass overrides: order, ctx, sync and async, what each one can
change, and routing per request."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import HOST, free_port, raw_connect, read_response, simple_request, wait_until
from ferroxy import Peer, Proxy, Response

ORDER = [
    "new_ctx",
    "request_filter",
    "upstream_peer",
    "upstream_request_filter",
    "response_filter",
    "logging",
]


def _recording_app(upstream_addr: str, calls: list[str], use_async: bool) -> type[Proxy]:
    if use_async:

        class AsyncApp(Proxy):
            async def new_ctx(self) -> Any:
                await asyncio.sleep(0)
                calls.append("new_ctx")
                return {}

            async def request_filter(self, session, ctx):
                await asyncio.sleep(0.01)  # not a wait: this hook really suspends
                calls.append("request_filter")
                return None

            async def upstream_peer(self, session, ctx):
                await asyncio.sleep(0)
                calls.append("upstream_peer")
                return Peer(upstream_addr)

            async def upstream_request_filter(self, session, upstream_request, ctx):
                await asyncio.sleep(0)
                calls.append("upstream_request_filter")

            async def response_filter(self, session, upstream_response, ctx):
                await asyncio.sleep(0)
                calls.append("response_filter")
                upstream_response.headers["x-async"] = "yes"

            async def logging(self, session, error, ctx):
                await asyncio.sleep(0)
                calls.append("logging")

        return AsyncApp

    class SyncApp(Proxy):
        def new_ctx(self) -> Any:
            calls.append("new_ctx")
            return {}

        def request_filter(self, session, ctx):
            calls.append("request_filter")
            return None

        def upstream_peer(self, session, ctx):
            calls.append("upstream_peer")
            return Peer(upstream_addr)

        def upstream_request_filter(self, session, upstream_request, ctx):
            calls.append("upstream_request_filter")

        def response_filter(self, session, upstream_response, ctx):
            calls.append("response_filter")
            upstream_response.headers["x-async"] = "no"

        def logging(self, session, error, ctx):
            calls.append("logging")

    return SyncApp


@pytest.mark.parametrize("use_async", [False, True], ids=["def", "async-def"])
def test_hook_order(ferroxy_upstream, ferroxy_proxy, use_async: bool) -> None:
    calls: list[str] = []
    proxy = ferroxy_proxy(_recording_app(ferroxy_upstream.addr, calls, use_async))
    r = httpx.get(proxy.url + "/order", timeout=10)
    assert r.status_code == 200
    assert r.headers.get("x-async") == ("yes" if use_async else "no")
    assert wait_until(lambda: "logging" in calls, timeout=2), f"logging never ran: {calls}"
    assert calls == ORDER

    calls.clear()
    assert httpx.get(proxy.url + "/order2", timeout=10).status_code == 200
    assert wait_until(lambda: "logging" in calls, timeout=2)
    assert calls == ORDER, "the second request must run the same hooks once each"


def test_ctx_flows_through_hooks_and_is_per_request(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: list[tuple[str, int, Any]] = []
    counter = iter(range(1000))

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def new_ctx(self):
            return {"n": next(counter)}

        def request_filter(self, session, ctx):
            ctx["path"] = session.req.path
            seen.append(("request_filter", id(ctx), session.ctx is ctx))

        def response_filter(self, session, upstream_response, ctx):
            seen.append(("response_filter", id(ctx), ctx.get("path")))
            upstream_response.headers["x-ctx-n"] = str(ctx["n"])

        def logging(self, session, error, ctx):
            seen.append(("logging", id(ctx), dict(ctx)))

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r1 = c.get("/first")
        r2 = c.get("/second")
    assert (r1.headers["x-ctx-n"], r2.headers["x-ctx-n"]) == ("0", "1")
    assert wait_until(lambda: sum(1 for s in seen if s[0] == "logging") == 2, timeout=2), seen

    rf = [s for s in seen if s[0] == "request_filter"]
    resp = [s for s in seen if s[0] == "response_filter"]
    logs = [s for s in seen if s[0] == "logging"]
    assert all(s[2] is True for s in rf), "session.ctx must be the ctx from new_ctx()"
    assert [s[2] for s in resp] == ["/first", "/second"]
    assert [s[2] for s in logs] == [{"n": 0, "path": "/first"}, {"n": 1, "path": "/second"}]
    # the same object in every hook of a request
    assert rf[0][1] == resp[0][1] == logs[0][1]
    assert rf[1][1] == resp[1][1] == logs[1][1]


def test_request_filter_short_circuits(ferroxy_upstream, ferroxy_proxy) -> None:
    logged: list[Any] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            if session.req.path == "/deny":
                return Response(
                    451,
                    headers=[("x-reason", "legal"), ("x-reason", "second")],
                    body="nope: ünïcode",
                )
            if session.req.path == "/dict-headers":
                return Response(
                    200, headers={"Content-Type": "text/plain", "X-Gen": "1"}, body=b"gen"
                )
            return None

        def logging(self, session, error, ctx):
            logged.append((session.req.path, error))

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get("/deny")
        assert r.status_code == 451
        assert r.headers.get_list("x-reason") == ["legal", "second"]
        assert r.content == "nope: ünïcode".encode()
        assert r.headers.get("content-length") == str(len(r.content))

        r = c.get("/dict-headers")
        assert r.status_code == 200
        assert r.content == b"gen"
        assert r.headers.get("content-type") == "text/plain"
        assert r.headers.get("x-gen") == "1"

        assert ferroxy_upstream.requests == 0, "a request_filter Response must not be proxied"
        assert ferroxy_upstream.connections == 0

        assert c.get("/pass").status_code == 200
        assert ferroxy_upstream.requests == 1
    assert wait_until(lambda: len(logged) == 3, timeout=2), logged
    assert all(err is None for _, err in logged), "a generated response is not an error"


def test_response_object_properties() -> None:
    r = Response(404, headers={"X-A": "1"}, body="missing")
    assert r.status == 404
    assert r.body == b"missing"
    assert r.headers["x-a"] == "1"
    assert Response(204).body == b""


def test_upstream_peer_may_return_str(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        def upstream_peer(self, session, ctx):
            return ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/str-peer", timeout=10)
    assert r.status_code == 200
    assert r.json()["path"] == "/str-peer"


@pytest.mark.parametrize("kind", ["peer", "str"])
def test_upstream_class_attribute(ferroxy_upstream, ferroxy_proxy, kind: str) -> None:
    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr) if kind == "peer" else ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/attr", timeout=10)
    assert r.status_code == 200
    assert r.json()["path"] == "/attr"
    assert proxy.python_calls == 0


def test_upstream_instance_attribute_wins(ferroxy_upstream, ferroxy_proxy) -> None:
    """An app instance's own ``upstream`` is the one served, over its class's."""

    class App(Proxy):
        upstream = f"{HOST}:{free_port()}"  # nothing listens here: a 502 if this were used

    app = App()
    app.upstream = ferroxy_upstream.addr
    proxy = ferroxy_proxy(app)
    r = httpx.get(proxy.url + "/instance", timeout=10)
    assert r.status_code == 200
    assert r.json()["path"] == "/instance"
    assert proxy.python_calls == 0, "an instance's upstream is routed in Rust too"


def test_routing_per_request(ferroxy_upstream, ferroxy_proxy) -> None:
    from ferroxy.testing import start_upstream

    other = start_upstream()
    try:
        other_addr = other.addr

        class App(Proxy):
            def upstream_peer(self, session, ctx):
                if session.req.path.startswith("/b/"):
                    return Peer(other_addr)
                return Peer(ferroxy_upstream.addr)

        proxy = ferroxy_proxy(App)
        with httpx.Client(base_url=proxy.url, timeout=10) as c:
            for i in range(3):
                assert c.get(f"/a/{i}").status_code == 200
            for i in range(2):
                assert c.get(f"/b/{i}").status_code == 200
        assert ferroxy_upstream.requests == 3
        assert other.requests == 2
    finally:
        other.stop()


def test_session_request_fields(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            req = session.req
            seen.update(
                method=req.method,
                path=req.path,
                query=req.query,
                version=req.version,
                uri=req.uri,
                client_addr=req.client_addr,
                session_client_addr=session.client_addr,
                host=req.headers.get("host"),
            )

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        local_port = sock.getsockname()[1]
        body = b"abc"
        sock.sendall(
            b"POST /some/path?a=1&b=two HTTP/1.1\r\nHost: example.test:8443\r\n"
            b"Content-Length: 3\r\n\r\n" + body
        )
        resp = read_response(rfile)
    assert resp.status == 200
    assert seen == {
        "method": "POST",
        "path": "/some/path",
        "query": "a=1&b=two",
        "version": "HTTP/1.1",
        "uri": "/some/path?a=1&b=two",
        "client_addr": f"{HOST}:{local_port}",
        "session_client_addr": f"{HOST}:{local_port}",
        "host": "example.test:8443",
    }


def test_upstream_request_filter_rewrites(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def upstream_request_filter(self, session, upstream_request, ctx):
            seen["xff"] = upstream_request.headers.get("x-forwarded-for")
            seen["client_path"] = session.req.path
            upstream_request.method = "PUT"
            upstream_request.path = "/rewritten" + upstream_request.path
            upstream_request.query = "k=v"
            upstream_request.headers["x-rewritten"] = "1"

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/orig?drop=me", timeout=10)
    assert r.status_code == 200
    echo = r.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/rewritten/orig"
    assert echo["query"] == "k=v"
    assert echo["headers"]["x-rewritten"] == "1"
    assert seen["client_path"] == "/orig", "session.req must still show the client's request"
    assert seen["xff"] == HOST, "upstream_request should already carry X-Forwarded-For"


def test_session_upstream_request_builds_forwarded_request(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            up = session.upstream_request()
            seen["path"] = up.path
            seen["xfp"] = up.headers.get("x-forwarded-proto")
            seen["conn"] = "connection" in up.headers

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/built", headers={"Connection": "keep-alive"}, timeout=10)
    assert r.status_code == 200
    assert seen == {"path": "/built", "xfp": "http", "conn": False}


def test_response_filter_changes_status_and_headers(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: list[int] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session, upstream_response, ctx):
            seen.append(upstream_response.status)
            if upstream_response.status == 404:
                upstream_response.status = 410
            upstream_response.headers["x-seen-status"] = str(seen[-1])

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get("/status/404")
        assert r.status_code == 410
        assert r.headers["x-seen-status"] == "404"
        r = c.get("/status/201")
        assert r.status_code == 201
        assert r.headers["x-seen-status"] == "201"
    assert seen == [404, 201]


def test_async_hooks_run_concurrently(ferroxy_upstream, ferroxy_proxy) -> None:
    """An ``async def`` hook that awaits must not block other requests' hooks."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session, ctx):
            await asyncio.sleep(0.5)  # not a wait: a slow hook, for four requests to overlap
            return None

    proxy = ferroxy_proxy(App)
    results: list[int] = []

    def one() -> None:
        results.append(httpx.get(proxy.url + "/concurrent", timeout=10).status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    elapsed = time.monotonic() - start
    assert results == [200] * 4
    assert elapsed < 1.5, f"4 requests with a 0.5 s async hook took {elapsed:.2f}s (serialised?)"


def test_new_ctx_async_value_used(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def new_ctx(self):
            await asyncio.sleep(0)
            return {"token": "t-123"}

        def upstream_request_filter(self, session, upstream_request, ctx):
            upstream_request.headers["x-token"] = ctx["token"]

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/ctx", timeout=10)
    assert r.status_code == 200
    assert r.json()["headers"]["x-token"] == "t-123"


def test_hooks_see_keepalive_requests_separately(ferroxy_upstream, ferroxy_proxy) -> None:
    paths: list[str] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            paths.append(session.req.path)

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        for p in ("/k1", "/k2", "/k3"):
            sock.sendall(simple_request("GET", p))
            assert read_response(rfile).status == 200
    assert paths == ["/k1", "/k2", "/k3"]


def test_single_worker_runtime_serves_hooks_and_stops(ferroxy_upstream, ferroxy_proxy) -> None:
    """threads=1 runs the engine on a current-thread runtime of its own: hooks, pooling and
    a graceful stop work there as on the multi-thread one."""
    import asyncio

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session, ctx):
            await asyncio.sleep(0)

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers["x-single"] = "1"

    proxy = ferroxy_proxy(App, threads=1)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for i in range(20):
            r = c.get(f"/n{i}")
            assert r.status_code == 200 and r.headers["x-single"] == "1"
    assert ferroxy_upstream.connections == 1
    proxy.stop(grace_period=1.0)
