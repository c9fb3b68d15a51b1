"""Per-Peer upstream timeouts and downstream (client-facing) timeouts."""

from __future__ import annotations

import asyncio
import time

import httpx
from conftest import (
    raw_connect,
    read_head,
    read_response,
    simple_request,
    wait_closed,
    wait_until,
)
from ferroxy import Peer, Proxy


def test_peer_timeout_properties() -> None:
    p = Peer(
        "127.0.0.1:9", connect_timeout=1.5, read_timeout=2.5, write_timeout=3.5, idle_timeout=4.5
    )
    assert p.addr == "127.0.0.1:9"
    assert (p.connect_timeout, p.read_timeout, p.write_timeout, p.idle_timeout) == (
        1.5,
        2.5,
        3.5,
        4.5,
    )
    d = Peer("localhost:80")
    assert (d.connect_timeout, d.read_timeout, d.write_timeout, d.idle_timeout) == (
        5.0,
        60.0,
        60.0,
        60.0,
    )


def test_read_timeout_is_per_peer(ferroxy_upstream, ferroxy_proxy) -> None:
    impatient = Peer(ferroxy_upstream.addr, read_timeout=0.2)
    patient = Peer(ferroxy_upstream.addr, read_timeout=3.0)

    class App(Proxy):
        def upstream_peer(self, session, ctx):
            return impatient if session.req.query == "impatient" else patient

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        start = time.monotonic()
        r = c.get("/delay/700?impatient")
        fast_fail = time.monotonic() - start
        assert r.status_code == 504
        assert fast_fail < 0.65, f"read_timeout=0.2 answered after {fast_fail:.2f}s"

        r = c.get("/delay/700?patient")
        assert r.status_code == 200, "read_timeout=3.0 must let a 0.7 s response through"
        assert r.json()["path"] == "/delay/700"


def test_read_timeout_applies_on_reused_pooled_connection(ferroxy_upstream, ferroxy_proxy) -> None:
    """The Peer returned for *this* request sets the timeout, even when the request rides a
    pooled connection first opened for a Peer (same address) with other timeouts: read
    timeouts are not part of the pool key, and are armed per request."""

    class App(Proxy):
        def upstream_peer(self, session, ctx):
            if session.req.query == "impatient":
                return Peer(ferroxy_upstream.addr, read_timeout=0.3)
            return Peer(ferroxy_upstream.addr)

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/warm").status_code == 200  # pools a connection with the default 60 s
        start = time.monotonic()
        r = c.get("/delay/1500?impatient")
        elapsed = time.monotonic() - start
    assert r.status_code == 504, f"got {r.status_code} after {elapsed:.2f}s (read_timeout=0.3)"
    assert elapsed < 1.2
    assert ferroxy_upstream.requests == 2
    assert ferroxy_upstream.connections == 1, "the impatient request did not reuse the pooled one"


def test_read_timeout_applies_between_reads_not_total(ferroxy_upstream, ferroxy_proxy) -> None:
    """A long body that keeps flowing is not cut by a short read_timeout."""

    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr, read_timeout=0.5)

    proxy = ferroxy_proxy(App)
    n = 20_000_000
    total = 0
    next_pause = 0
    start = time.monotonic()
    with httpx.Client(timeout=30) as c, c.stream("GET", proxy.url + f"/bytes/{n}") as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            total += len(chunk)
            if total >= next_pause:  # not a wait: read steadily but slowly, ~1.6 s in all
                time.sleep(0.02)
                next_pause += 256 * 1024
    elapsed = time.monotonic() - start
    assert total == n
    assert elapsed > 1.0, "the transfer was too fast to exercise the timeout"


def test_peer_idle_timeout_expires_pooled_connection(ferroxy_upstream, ferroxy_proxy) -> None:
    short_idle = Peer(ferroxy_upstream.addr, idle_timeout=0.3)

    class App(Proxy):
        upstream = short_idle

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/a").status_code == 200
        assert c.get("/b").status_code == 200
        assert ferroxy_upstream.connections == 1
        time.sleep(1.0)  # not a wait: the connection must sit idle past its idle_timeout
        assert c.get("/c").status_code == 200
    assert ferroxy_upstream.connections == 2, (
        "a pooled connection idle longer than Peer.idle_timeout must not be reused"
    )


def test_client_read_timeout_half_request_line(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, client_read_timeout=0.5)
    sock = raw_connect(proxy.port)
    with sock:
        sock.sendall(b"GET /sta")
        start = time.monotonic()
        closed, data = wait_closed(sock, timeout=4)
        elapsed = time.monotonic() - start
    assert closed, "a client stalled mid request line was not disconnected"
    assert elapsed < 3.0, f"disconnected after {elapsed:.2f}s with client_read_timeout=0.5"
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:200]
    # other clients are unaffected
    assert httpx.get(proxy.url + "/ok", timeout=10).status_code == 200


def test_client_read_timeout_stalled_body(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, client_read_timeout=0.5)
    sock = raw_connect(proxy.port)
    with sock:
        sock.sendall(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 10)
        closed, data = wait_closed(sock, timeout=5)
    assert closed, "a client stalled mid body was not disconnected"
    if data:
        assert not data.startswith(b"HTTP/1.1 200"), "a truncated upload must not succeed"


def test_client_read_timeout_does_not_cut_active_client(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, client_read_timeout=0.5)

    def slow_body():
        for _ in range(6):
            time.sleep(0.2)  # not a wait: a client that trickles, each pause < the timeout
            yield b"x" * 100

    r = httpx.post(proxy.url + "/trickle", content=slow_body(), timeout=10)
    assert r.status_code == 200
    assert r.json()["body_length"] == 600


def test_keepalive_timeout_closes_idle_client_connection(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, keepalive_timeout=0.5)
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(simple_request("GET", "/ka"))
        assert read_response(rfile).status == 200
        start = time.monotonic()
        closed, _ = wait_closed(sock, timeout=4)
        elapsed = time.monotonic() - start
    assert closed, "an idle keep-alive connection outlived keepalive_timeout"
    assert 0.3 < elapsed < 3.0, f"closed after {elapsed:.2f}s with keepalive_timeout=0.5"


# ---------------------------------------------------------------- timers count silence only


def test_long_response_outlives_client_read_timeout(ferroxy_upstream, ferroxy_proxy) -> None:
    """client_read_timeout bounds the client's silence while sending; a response that takes
    longer than it to stream (the client reading all along) must not be cut."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, client_read_timeout=0.3)
    received = 0
    started = time.monotonic()
    with httpx.Client(timeout=10) as c, c.stream("GET", f"{proxy.url}/bytes/{8 << 20}") as r:
        for chunk in r.iter_bytes(64 << 10):
            received += len(chunk)
            time.sleep(0.01)  # a slow reader: the download lasts well past 0.3 s
    assert time.monotonic() - started > 0.6
    assert received == 8 << 20


def test_idle_pooled_connection_does_not_count_against_read_timeout(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    """A connection idle in the pool for longer than read_timeout serves the next request
    with the full read_timeout."""

    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr, read_timeout=0.6)

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/first").status_code == 200
        time.sleep(0.9)  # not a wait: idle in the pool for longer than read_timeout
        assert c.get("/delay/300").status_code == 200
    assert ferroxy_upstream.connections == 1


def test_slow_upload_longer_than_read_timeout(ferroxy_upstream, ferroxy_proxy) -> None:
    """read_timeout is the wait for the upstream after the request is sent, not a cap on the
    whole exchange: a trickled upload lasting longer still gets its answer."""

    class App(Proxy):
        upstream = Peer(ferroxy_upstream.addr, read_timeout=0.3)

    proxy = ferroxy_proxy(App)

    def trickle():
        for _ in range(8):
            time.sleep(0.1)  # not a wait: the upload lasts longer than read_timeout in all
            yield b"x" * 1000

    r = httpx.post(f"{proxy.url}/upload", content=trickle(), timeout=10)
    assert r.status_code == 200
    assert r.json()["body_length"] == 8000


def test_client_stalling_mid_body_gets_408(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def logging(self, session, error, ctx):
            kinds.append(None if error is None else error.kind)

    kinds: list[str | None] = []
    proxy = ferroxy_proxy(App, client_read_timeout=0.3)
    sock = raw_connect(proxy.port)
    sock.sendall(b"POST /stall HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
    with sock, sock.makefile("rb") as rfile:
        answer = read_response(rfile)
        closed, after = wait_closed(sock, timeout=3)
    assert answer.status == 408, (answer.status, answer.body[:80])
    assert (answer.header("connection") or "").lower() == "close"
    assert closed and after == b"", "the connection must close after the 408"
    assert wait_until(lambda: kinds, timeout=3), "the logging hook never ran"
    assert kinds == ["client_timeout"]


def test_client_body_timeout_starts_when_the_body_is_read(ferroxy_upstream, ferroxy_proxy) -> None:
    """Hooks may take longer than client_read_timeout before anyone reads the body: that wait
    is not the client's silence. With ``Expect: 100-continue`` the client sends nothing until
    the proxy asks for the body, which it does only once the hooks are done."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session, ctx):
            await asyncio.sleep(0.8)  # the scenario: a hook slower than client_read_timeout

    proxy = ferroxy_proxy(App, client_read_timeout=0.4)
    with raw_connect(proxy.port) as sock:
        sock.sendall(
            b"POST /late-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        rfile = sock.makefile("rb")
        _, status, _, _ = read_head(rfile)
        assert status == 100, f"expected 100 Continue once the hooks were done, got {status}"
        sock.sendall(b"hello")
        r = read_response(rfile)
    assert r.status == 200, r
    assert r.json()["body_length"] == 5
