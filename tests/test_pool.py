"""Upstream connection pooling: reuse across requests and client connections, concurrency,
idle expiry, pool size, and recovery from a connection the upstream dropped."""

from __future__ import annotations

import contextlib
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
    # No wait needed: a connection is back in the pool by the time its client has the whole
    # response (what test_100_sequential_requests_use_one_upstream_connection relies on).
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
        time.sleep(1.0)  # not a wait: the connection must sit idle past pool_idle_timeout
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


def test_connection_still_uploading_is_not_reused(ferroxy_proxy) -> None:
    """An upstream may answer before it has read the request body. That connection is busy
    until the upload ends, so it must not go back to the pool: the next request would wait
    on it (here: until the stalled uploader's timeout)."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def answer_early() -> None:
        # Answers as soon as a request head is in, then keeps reading whatever comes.
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

            def serve(conn: socket.socket = conn) -> None:
                buf = b""
                with contextlib.suppress(OSError):
                    while True:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                        while b"\r\n\r\n" in buf:
                            _, buf = buf.split(b"\r\n\r\n", 1)
                            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            buf = b""  # the rest is body (or the next head): good enough here

            threading.Thread(target=serve, daemon=True).start()

    threading.Thread(target=answer_early, daemon=True).start()
    upstream_addr = f"127.0.0.1:{listener.getsockname()[1]}"

    class App(Proxy):
        upstream = upstream_addr

    proxy = ferroxy_proxy(App)
    try:
        uploader = socket.create_connection(("127.0.0.1", proxy.port))
        uploader.sendall(
            b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 10
        )
        uploader.settimeout(5)
        assert uploader.recv(65536).startswith(b"HTTP/1.1 200")  # answered; upload stalls
        started = time.monotonic()
        r = httpx.get(f"{proxy.url}/next", timeout=5)
        assert r.status_code == 200 and r.text == "ok"
        assert time.monotonic() - started < 2
        assert len(accepted) == 2  # the busy connection was not reused
        uploader.close()
    finally:
        listener.close()
