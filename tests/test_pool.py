"""Upstream connection pooling: reuse across requests and client connections, concurrency,
idle expiry, pool size, and recovery from a connection the upstream dropped."""

from __future__ import annotations

import threading
import time

import httpx
from conftest import wait_until
from ferroxy import Proxy


def _app(addr: str) -> type[Proxy]:
    class App(Proxy):
        upstream = addr

    return App


def _concurrent_gets(url: str, n: int) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        code = httpx.get(url, timeout=10).status_code
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return statuses


def test_100_sequential_requests_use_one_upstream_connection(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr))
    conn_ids = set()
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for i in range(100):
            r = c.get(f"/seq/{i}")
            assert r.status_code == 200
            conn_ids.add(r.json()["connection"])
    assert ferroxy_upstream.requests == 100
    assert ferroxy_upstream.connections == 1, (
        f"100 sequential requests opened {ferroxy_upstream.connections} upstream connections"
    )
    assert len(conn_ids) == 1


def test_pool_shared_across_client_connections(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr))
    for i in range(20):
        with httpx.Client(timeout=10) as c:  # a new downstream connection each time
            assert c.get(proxy.url + f"/fresh/{i}").status_code == 200
    assert ferroxy_upstream.connections == 1


def test_pool_shared_between_h1_and_h2_clients(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/h1").status_code == 200
    with httpx.Client(base_url=proxy.url, http1=False, http2=True, timeout=10) as c:
        for _ in range(5):
            assert c.get("/h2").status_code == 200
    assert ferroxy_upstream.connections == 1


def test_concurrent_requests_then_reuse(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr))
    assert _concurrent_gets(proxy.url + "/delay/400", 3) == [200] * 3
    assert ferroxy_upstream.connections == 3, "3 overlapping requests need 3 upstream connections"
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(10):
            assert c.get("/after").status_code == 200
    assert ferroxy_upstream.connections == 3, "idle pooled connections must be reused"


def test_pool_max_idle_per_peer(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr), pool_max_idle_per_peer=1)
    assert _concurrent_gets(proxy.url + "/delay/400", 3) == [200] * 3
    assert ferroxy_upstream.connections == 3
    time.sleep(0.1)
    assert _concurrent_gets(proxy.url + "/delay/400", 3) == [200] * 3
    assert ferroxy_upstream.connections == 5, (
        "with pool_max_idle_per_peer=1 only one connection survives a burst, so the second "
        f"burst of 3 needs 2 new ones (3 + 2 = 5); saw {ferroxy_upstream.connections}"
    )


def test_pool_idle_timeout_expires_connections(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr), pool_idle_timeout=0.3)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/one").status_code == 200
        assert c.get("/two").status_code == 200
        assert ferroxy_upstream.connections == 1
        time.sleep(1.0)
        assert c.get("/three").status_code == 200
    assert ferroxy_upstream.connections == 2, "a connection idle past pool_idle_timeout was reused"


def test_dropped_upstream_connection_not_reused(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(_app(ferroxy_upstream.addr))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/warm").status_code == 200
        try:
            with c.stream("GET", "/close") as r:
                r.read()
        except httpx.HTTPError:
            pass
    # a fresh client connection: the proxy may have closed the previous one
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for i in range(5):
            r = c.get(f"/after-close/{i}")
            assert r.status_code == 200, f"request {i} after an upstream drop got {r.status_code}"
    assert wait_until(lambda: ferroxy_upstream.connections == 2, timeout=1), (
        f"expected one new upstream connection after the drop, saw {ferroxy_upstream.connections}"
    )
