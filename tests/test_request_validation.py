"""Requests the proxy must refuse (RFC 9112 sections 3.2 and 6, as nginx does): what a proxy
and the server behind it could frame or route in two ways. Each is refused before any hook or
upstream sees it, and the connection closes after the answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import raw_connect, read_response, simple_request, wait_closed, wait_until
from ferroxy import Proxy, ProxyError, Session


@pytest.fixture
def seen() -> list[tuple[str, Any]]:
    """What the app's hooks saw, in order: ("request", Host) per request_filter call and
    ("error", error) per logging call."""
    return []


@pytest.fixture
def proxy(ferroxy_upstream, ferroxy_proxy, seen):
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: Any) -> None:
            seen.append(("request", session.req.headers.get("host")))

        def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
            seen.append(("error", error))

    return ferroxy_proxy(App)


def exchange(port: int, raw: bytes, linger: float = 3.0) -> tuple[int, dict[str, str], bool]:
    """Send ``raw`` on a fresh connection: the status, the response headers, and whether the
    proxy closed the connection within ``linger`` seconds of answering."""
    sock = raw_connect(port)
    with sock:
        sock.sendall(raw)
        response = read_response(sock.makefile("rb"))
        closed, _ = wait_closed(sock, timeout=linger)
    return response.status, dict(response.headers), closed


def assert_refused(proxy, upstream, seen, raw: bytes, status: int = 400) -> None:
    requests_before = upstream.requests
    got, _, closed = exchange(proxy.port, raw)
    assert got == status, f"{raw!r} got {got}"
    assert closed, f"the connection stayed open after refusing {raw!r}"
    assert not [s for s in seen if s[0] == "request"], "request_filter saw a refused request"
    assert upstream.requests == requests_before, f"{raw!r} reached the upstream"


def test_a_second_host_header_cannot_bypass_a_host_check(proxy, ferroxy_upstream, seen) -> None:
    raw = b"GET /admin HTTP/1.1\r\nHost: public.example\r\nHost: admin.internal\r\n\r\n"
    assert_refused(proxy, ferroxy_upstream, seen, raw)
    error = wait_until(lambda: [e for kind, e in seen if kind == "error"], timeout=5)
    assert error and (error[0].kind, error[0].side) == ("invalid_request", "client")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET http://public.example/ HTTP/1.1\r\nHost: admin.internal\r\n\r\n",
        b"GET / HTTP/1.1\r\nUser-Agent: no-host\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@admin.internal\r\n\r\n",
        b"GET http://public.example/ HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: public.example:99999\r\n\r\n",
    ],
    ids=[
        "host-disagrees-with-target",
        "http11-without-host",
        "userinfo-in-host",
        "absolute-target-without-host",
        "port-out-of-range",
    ],
)
def test_hosts_that_leave_two_answers_are_refused(proxy, ferroxy_upstream, seen, raw) -> None:
    assert_refused(proxy, ferroxy_upstream, seen, raw)


def test_an_absolute_target_and_a_matching_host_are_proxied(proxy, ferroxy_upstream) -> None:
    raw = b"GET http://Public.Example/x HTTP/1.1\r\nHost: public.example:80\r\n\r\n"
    status, _, _ = exchange(proxy.port, raw, linger=0)
    assert status == 200
    assert ferroxy_upstream.requests == 1


def test_http10_needs_no_host(proxy, ferroxy_upstream) -> None:
    status, _, _ = exchange(proxy.port, b"GET / HTTP/1.0\r\n\r\n", linger=0)
    assert status == 200


@pytest.mark.parametrize(
    "header",
    [
        b"Content_Length: 5",
        b"Transfer_Encoding: chunked",
        b"Transfer---Encoding: chunked",
        b"X_Forwarded_For: 6.6.6.6",
        b"\xa0Content-Length: 5",
        b" Content-Length: 5",
    ],
    ids=[
        "content_length",
        "transfer_encoding",
        "transfer---encoding",
        "x_forwarded_for",
        "nbsp",
        "folded",
    ],
)
def test_framing_header_lookalikes_are_refused(
    proxy, ferroxy_upstream, seen, header: bytes
) -> None:
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n" + header + b"\r\n\r\nhello"
    assert_refused(proxy, ferroxy_upstream, seen, raw)


@pytest.mark.parametrize(
    ("codings", "status"),
    [
        (b"Transfer-Encoding: gzip, chunked", 501),
        (b"Transfer-Encoding: chunked, chunked", 400),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", 400),
    ],
    ids=["gzip-chunked", "chunked-twice", "two-headers"],
)
def test_only_one_final_chunked_coding_is_accepted(
    proxy, ferroxy_upstream, seen, codings: bytes, status: int
) -> None:
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\n" + codings + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert_refused(proxy, ferroxy_upstream, seen, raw, status)


def test_a_get_with_a_body_is_forwarded_cleanly_then_the_connection_closes(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock:
        # A server in front that ignores a GET's body would read "GET /next" as a request.
        sock.sendall(
            b"GET /first HTTP/1.1\r\nHost: x\r\nContent-Length: 23\r\n\r\n"
            b"GET /next HTTP/1.1\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        response = read_response(sock.makefile("rb"))
        assert response.status == 200
        echoed = response.json()
        assert echoed["path"] == "/first"
        assert echoed["body_length"] == 23, echoed
        assert response.header("connection") == "close"
        closed, rest = wait_closed(sock, timeout=3)
    assert closed, "the connection stayed open after a GET with a body"
    assert rest == b"", "the request after the GET was answered too"


@pytest.mark.parametrize(
    "split", [None, 40, 1], ids=["one-read", "split-mid-line", "first-byte-alone"]
)
def test_two_equal_content_lengths_are_framed_once_then_the_connection_closes(
    proxy, split: int | None
) -> None:
    head = b"POST /twice HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"
    sock = raw_connect(proxy.port)
    with sock:
        if split is None:
            sock.sendall(head + b"hello")
        else:
            # The second Content-Length line arrives in two reads.
            sock.sendall(head[:split])
            time.sleep(0.05)
            sock.sendall(head[split:] + b"hello")
        response = read_response(sock.makefile("rb"))
        assert response.status == 200
        echoed = response.json()
        assert echoed["body_length"] == 5
        assert echoed["headers"]["content-length"] == "5", "the upstream got one length"
        assert response.header("connection") == "close"
        closed, _ = wait_closed(sock, timeout=3)
    assert closed, "the connection stayed open after two Content-Length lines"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
    ],
    ids=["bad-size", "overflow", "missing-crlf"],
)
def test_a_malformed_chunked_body_is_the_clients_fault(
    proxy, ferroxy_upstream, seen, body: bytes
) -> None:
    # One good request first: its upstream connection is pooled, and the bad one takes it.
    status, _, _ = exchange(proxy.port, simple_request("GET", "/warm"), linger=0)
    assert status == 200
    assert ferroxy_upstream.connections == 1
    raw = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    status, _, closed = exchange(proxy.port, raw)
    assert status == 400
    assert closed, "the connection stayed open after a malformed body"
    errors = wait_until(lambda: [e for kind, e in seen if kind == "error" and e], timeout=5)
    assert [(e.kind, e.side) for e in errors] == [("invalid_request", "client")]
    # The upstream connection that carried part of it is not handed to the next request.
    status, _, _ = exchange(proxy.port, simple_request("GET", "/next"), linger=0)
    assert status == 200
    assert ferroxy_upstream.connections == 2


def test_refusals_do_not_stop_the_proxy(proxy, ferroxy_upstream) -> None:
    bad = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    threads = [threading.Thread(target=exchange, args=(proxy.port, bad)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status, _, closed = exchange(proxy.port, simple_request("GET", "/ok"), linger=0.3)
    assert status == 200
    assert not closed, "a good request's connection was closed"
