"""What a forward hop must do to a request: hop-by-hop headers removed, X-Forwarded-*
set, Host, method, path, query and body preserved; upstream statuses passed through."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest
from conftest import HOST, raw_connect, read_response
from ferroxy import Proxy


def _echo_via_raw(port: int, request: bytes) -> dict[str, Any]:
    sock = raw_connect(port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(request)
        resp = read_response(rfile)
    assert resp.status == 200, (resp.status, resp.body[:500])
    return resp.json()


def _names(echo: dict[str, Any]) -> list[str]:
    return [k.lower() for k, _ in echo["header_list"]]


@pytest.fixture
def plain_proxy(ferroxy_upstream, ferroxy_proxy):
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    return ferroxy_proxy(App)


def test_hop_by_hop_headers_not_forwarded(plain_proxy) -> None:
    echo = _echo_via_raw(
        plain_proxy.port,
        b"GET /hop HTTP/1.1\r\n"
        b"Host: example.test\r\n"
        b"Connection: keep-alive, X-Custom-Hop, x-other-hop\r\n"
        b"X-Custom-Hop: secret1\r\n"
        b"X-Other-Hop: secret2\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"TE: gzip\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        b"X-End-To-End: kept\r\n"
        b"\r\n",
    )
    names = _names(echo)
    for hop in (
        "connection",
        "x-custom-hop",
        "x-other-hop",
        "keep-alive",
        "te",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
    ):
        assert hop not in names, f"hop-by-hop header {hop!r} reached the upstream: {names}"
    assert echo["headers"]["x-end-to-end"] == "kept"


def test_te_trailers_and_trailer_go_on(plain_proxy) -> None:
    """A client that accepts trailers is heard by the upstream (gRPC servers need it), with
    TE's transfer codings dropped; `Trailer` is end to end (RFC 9110 section 6.6.2)."""
    echo = _echo_via_raw(
        plain_proxy.port,
        b"GET /te HTTP/1.1\r\nHost: example.test\r\nConnection: TE\r\n"
        b"TE: gzip, trailers\r\nTrailer: X-Checksum\r\n\r\n",
    )
    assert echo["headers"]["te"] == "trailers"
    assert echo["headers"]["trailer"] == "X-Checksum"


def test_upgrade_header_not_forwarded(plain_proxy) -> None:
    echo = _echo_via_raw(
        plain_proxy.port,
        b"GET /upgrade HTTP/1.1\r\nHost: example.test\r\nUpgrade: h2c-not-really\r\n"
        b"X-After: 1\r\n\r\n",
    )
    names = _names(echo)
    assert "upgrade" not in names, names
    assert echo["headers"]["x-after"] == "1"


def test_client_transfer_encoding_not_copied(ferroxy_upstream, ferroxy_proxy) -> None:
    """The client's Transfer-Encoding is hop-by-hop: the hook's upstream_request does not
    carry it, and on the wire the upstream sees at most the proxy's own single 'chunked'
    framing (never duplicated, never alongside Content-Length) and the exact body."""
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def upstream_request_filter(self, session, upstream_request, ctx):
            seen["te"] = upstream_request.headers.get_all("transfer-encoding")
            seen["client_te"] = session.req.headers.get_all("transfer-encoding")

    proxy = ferroxy_proxy(App)
    body = b"hello chunked world"
    echo = _echo_via_raw(
        proxy.port,
        b"POST /te HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n8\r\n chunked\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert seen["client_te"] == ["chunked"]
    assert seen["te"] == [], f"upstream_request still carries Transfer-Encoding: {seen['te']}"
    te = [v for k, v in echo["header_list"] if k.lower() == "transfer-encoding"]
    cl = [v for k, v in echo["header_list"] if k.lower() == "content-length"]
    assert te in ([], ["chunked"]), te
    assert not (te and cl), f"upstream got both Transfer-Encoding and Content-Length: {te} {cl}"
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_x_forwarded_for_set_and_appended(plain_proxy) -> None:
    with httpx.Client(base_url=plain_proxy.url, timeout=10) as c:
        fresh = c.get("/xff").json()
        appended = c.get("/xff", headers={"X-Forwarded-For": "203.0.113.7"}).json()
        chain = c.get("/xff", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2"}).json()
    assert fresh["headers"]["x-forwarded-for"] == HOST
    assert appended["headers"]["x-forwarded-for"] == f"203.0.113.7, {HOST}"
    assert chain["headers"]["x-forwarded-for"] == f"203.0.113.7, 198.51.100.2, {HOST}"


def test_x_forwarded_proto_and_host_and_host_kept(plain_proxy) -> None:
    echo = _echo_via_raw(
        plain_proxy.port,
        b"GET /fwd HTTP/1.1\r\nHost: shop.example.test:8443\r\n\r\n",
    )
    h = echo["headers"]
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == "shop.example.test:8443"
    assert h["host"] == "shop.example.test:8443", "Host must be kept as the client sent it"
    assert _names(echo).count("host") == 1


def test_x_forwarded_proto_overrides_client_value(plain_proxy) -> None:
    """The proxy speaks plain http to its client, so a client-supplied 'https' is not
    believed (a header spoofing check)."""
    r = httpx.get(plain_proxy.url + "/p", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    values = [v for k, v in r.json()["header_list"] if k.lower() == "x-forwarded-proto"]
    assert values == ["http"], values


def test_method_path_query_and_body_preserved(plain_proxy) -> None:
    body = bytes(range(256)) * 100
    with httpx.Client(base_url=plain_proxy.url, timeout=10) as c:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            r = c.request(method, "/a%20b/c%2Fd/%E2%9C%93?x=1&y=%2F&z=a+b&empty=", content=body)
            assert r.status_code == 200
            echo = r.json()
            assert echo["method"] == method
            assert echo["path"] == "/a%20b/c%2Fd/%E2%9C%93"
            assert echo["query"] == "x=1&y=%2F&z=a+b&empty="
            assert echo["body_length"] == len(body)
            assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        r = c.options("/opt")
        assert r.json()["method"] == "OPTIONS"


def test_end_to_end_headers_order_and_duplicates_preserved(plain_proxy) -> None:
    sent = [("x-e2e", "1"), ("accept", "text/plain"), ("x-e2e", "2"), ("cookie", "a=b")]
    r = httpx.get(plain_proxy.url + "/e2e", headers=sent, timeout=10)
    lst = [(k.lower(), v) for k, v in r.json()["header_list"]]
    assert [v for k, v in lst if k == "x-e2e"] == ["1", "2"]
    assert ("accept", "text/plain") in lst
    assert ("cookie", "a=b") in lst


@pytest.mark.parametrize("status", [201, 301, 404, 418, 500, 503])
def test_upstream_status_passed_through(plain_proxy, status: int) -> None:
    r = httpx.get(plain_proxy.url + f"/status/{status}", timeout=10, follow_redirects=False)
    assert r.status_code == status


def test_upstream_204_has_no_body_and_connection_reusable(plain_proxy) -> None:
    sock = raw_connect(plain_proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_response(rfile)
        assert resp.status == 204
        assert resp.body == b""
        sock.sendall(b"GET /after-204 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_response(rfile)
        assert resp.status == 200
        assert resp.json()["path"] == "/after-204"


def test_response_framing_headers_consistent(plain_proxy) -> None:
    """The client gets a well-framed response: one Content-Length matching the body, or
    chunked, never both."""
    sock = raw_connect(plain_proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_response(rfile)
    assert resp.status == 200
    cl, te = resp.header_all("content-length"), resp.header_all("transfer-encoding")
    assert not (cl and te), resp.headers
    assert len(cl) <= 1
    if cl:
        assert int(cl[0]) == 1000
    assert len(resp.body) == 1000
