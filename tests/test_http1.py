"""HTTP/1.1 on the downstream side: keep-alive, Connection: close, HTTP/1.0, Content-Length
and chunked bodies both ways, HEAD, Expect: 100-continue and pipelining."""

from __future__ import annotations

import hashlib
import os
import socket

import httpx
import pytest
from conftest import (
    expected_pattern,
    raw_connect,
    read_head,
    read_response,
    simple_request,
    wait_closed,
)
from ferroxy import Proxy


@pytest.fixture
def proxy(ferroxy_upstream, ferroxy_proxy):
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    return ferroxy_proxy(App)


def test_keep_alive_serves_many_requests_on_one_connection(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        for i in range(5):
            sock.sendall(simple_request("GET", f"/ka/{i}"))
            resp = read_response(rfile)
            assert resp.status == 200
            assert resp.json()["path"] == f"/ka/{i}"
            assert (resp.header("connection") or "").lower() != "close"


def test_keep_alive_survives_an_idle_pause(proxy) -> None:
    """An idle connection gives its buffers back (after 250-500 ms) and keeps its socket: the
    next request on it is served as if nothing happened, pipelined ones included."""
    import time

    sock = raw_connect(proxy.port)
    with sock:
        rfile = sock.makefile("rb")
        sock.sendall(simple_request("GET", "/first"))
        assert read_response(rfile).status == 200
        time.sleep(0.8)  # the idle time is what is under test
        sock.sendall(simple_request("GET", "/second") + simple_request("GET", "/third"))
        assert read_response(rfile).json()["path"] == "/second"
        assert read_response(rfile).json()["path"] == "/third"


def test_a_closing_response_to_a_client_that_pauses_is_not_cut(proxy) -> None:
    """While a slow reader leaves our writes waiting, the connection is not idle, however
    quiet: the rest of a Connection: close response is still sent, byte for byte."""
    import time

    size = 3_000_000
    sock = raw_connect(proxy.port, timeout=10)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(simple_request("GET", f"/bytes/{size}", extra="Connection: close\r\n"))
        time.sleep(1.5)  # not reading: the pause is what is under test
        response = read_response(sock.makefile("rb"))
    assert response.status == 200
    assert response.body == expected_pattern(size)


def test_connection_close_is_honoured(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(simple_request("GET", "/bye", extra="Connection: close\r\n"))
        resp = read_response(rfile)
        assert resp.status == 200
        closed, extra = wait_closed(sock, timeout=3)
    assert closed, "the proxy kept the connection open after Connection: close"
    assert extra == b""


def test_http10_request(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n")
        resp = read_response(rfile)
        assert resp.version.startswith("HTTP/1.")
        assert resp.status == 200
        assert resp.json()["path"] == "/old"
        closed, _ = wait_closed(sock, timeout=3)
    assert closed, "an HTTP/1.0 request without keep-alive must end with the connection closed"


def test_content_length_request_body(proxy) -> None:
    body = os.urandom(100_000)
    r = httpx.post(proxy.url + "/cl", content=body, timeout=10)
    assert r.status_code == 200
    echo = r.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["headers"].get("content-length") == str(len(body)), (
        "a request with Content-Length should reach the upstream with the same Content-Length"
    )


def test_chunked_request_body_httpx(proxy) -> None:
    parts = [os.urandom(n) for n in (1, 10, 1000, 65536, 3, 200_000)]

    def gen():
        yield from parts

    r = httpx.post(proxy.url + "/chunked", content=gen(), timeout=10)
    assert r.status_code == 200
    echo = r.json()
    body = b"".join(parts)
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_with_extensions_and_trailers_raw(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(
            b"POST /chunked-raw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n"
            b"6\r\n world\r\n"
            b"0\r\nX-Trailer: t\r\n\r\n"
        )
        resp = read_response(rfile)
        assert resp.status == 200
        echo = resp.json()
        assert echo["body_length"] == 11
        assert echo["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
        # the connection is still usable after a chunked request
        sock.sendall(simple_request("GET", "/after-chunked"))
        assert read_response(rfile).json()["path"] == "/after-chunked"


@pytest.mark.parametrize("n", [0, 1, 250, 251, 70_000, 3_000_001])
def test_streamed_response_body_exact(proxy, n: int) -> None:
    sock = raw_connect(proxy.port, timeout=10)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(simple_request("GET", f"/bytes/{n}"))
        resp = read_response(rfile)
    assert resp.status == 200
    assert len(resp.body) == n
    assert resp.body == expected_pattern(n)


def test_head_request_has_no_body_and_keeps_connection_in_sync(proxy) -> None:
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(simple_request("HEAD", "/bytes/5000"))
        resp = read_response(rfile, head=True)
        assert resp.status == 200
        sock.sendall(simple_request("GET", "/after-head"))
        resp = read_response(rfile)
        assert resp.status == 200, "bytes after a HEAD response: the HEAD response had a body?"
        assert resp.json()["path"] == "/after-head"


def test_expect_100_continue(proxy) -> None:
    body = b"hello world"
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(
            b"POST /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        sock.settimeout(3)
        try:
            _, status, _, _ = read_head(rfile)
        except TimeoutError:
            pytest.fail("no '100 Continue' within 3 s of a request with Expect: 100-continue")
        assert status == 100, f"expected an interim 100 Continue first, got {status}"
        sock.settimeout(10)
        sock.sendall(body)
        resp = read_response(rfile)
    assert resp.status == 200
    echo = resp.json()
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_pipelining_three_requests_in_one_write(proxy) -> None:
    sock = raw_connect(proxy.port, timeout=10)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(
            simple_request("GET", "/delay/300")
            + simple_request("GET", "/p2?n=2")
            + b"POST /p3 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
        )
        paths = []
        for _ in range(3):
            resp = read_response(rfile)
            assert resp.status == 200
            paths.append(resp.json()["path"])
    assert paths == ["/delay/300", "/p2", "/p3"], "pipelined responses must come back in order"


def test_large_request_headers_accepted(proxy) -> None:
    big = "v" * 6000
    r = httpx.get(proxy.url + "/big-header", headers={"x-big": big}, timeout=10)
    assert r.status_code == 200
    assert r.json()["headers"]["x-big"] == big
