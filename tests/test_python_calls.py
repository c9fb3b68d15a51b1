"""Only overridden hooks cost a call into Python (ProxyServer.python_calls)."""

from __future__ import annotations

import time

import httpx
from ferroxy import Peer, Proxy


def test_no_hooks_means_no_python_calls(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr)

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for i in range(50):
            assert c.get(f"/n/{i}").status_code == 200
    assert ferroxy_upstream.requests == 50
    assert proxy.python_calls == 0


def test_response_filter_only_is_one_call_per_request(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers["x-rf"] = "1"

    proxy = ferroxy_proxy(App)
    n = 30
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for i in range(n):
            r = c.get(f"/rf/{i}")
            assert r.status_code == 200 and r.headers["x-rf"] == "1"
    assert proxy.python_calls == n


def test_calls_grow_with_requests_not_time(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            return None

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/a").status_code == 200
        first = proxy.python_calls
        assert first >= 1
        # Not a wait: time passes, with a keep-alive connection open and the server's own
        # timers running, and must add no call.
        time.sleep(1.2)
        assert proxy.python_calls == first
        for _ in range(9):
            assert c.get("/a").status_code == 200
    assert proxy.python_calls == 10 * first
