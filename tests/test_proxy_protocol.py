"""PROXY protocol listeners: the client address a load balancer in front sends (v1 or v2)
reaches hooks and the upstream; a connection without a valid header is closed."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import pytest
import trustme
from conftest import HOST, raw_connect, read_response, simple_request, wait_closed, wait_until
from ferroxy import Proxy, ResponseHeader, Session, TlsConfig
from proxy_protocol_client import v1_header, v2_header


def reporting_app(upstream_addr: str) -> type[Proxy]:
    class App(Proxy):
        upstream = upstream_addr

        def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: Any
        ) -> None:
            upstream_response.headers["x-client"] = session.client_addr

    return App


def ask(port: int, header: bytes) -> tuple[str | None, dict[str, Any]]:
    """Send ``header`` then a request; the client address the proxy saw, and the echo."""
    with raw_connect(port) as sock:
        sock.sendall(header + simple_request("GET", "/pp"))
        response = read_response(sock.makefile("rb"))
    assert response.status == 200
    return response.header("x-client"), json.loads(response.body)


@pytest.fixture
def proxy(ferroxy_upstream, ferroxy_proxy):
    return ferroxy_proxy(reporting_app(ferroxy_upstream.addr), proxy_protocol=True)


def test_v1_and_v2_client_addresses_reach_hooks_and_the_upstream(proxy) -> None:
    dst = (HOST, proxy.port)
    client, echo = ask(proxy.port, v1_header(("203.0.113.7", 51000), dst))
    assert client == "203.0.113.7:51000"
    assert echo["headers"]["x-forwarded-for"] == "203.0.113.7"
    client, _ = ask(proxy.port, v2_header(("198.51.100.20", 40000), dst))
    assert client == "198.51.100.20:40000"
    client, echo = ask(proxy.port, v2_header(("2001:db8::5", 443), ("2001:db8::1", 8080)))
    assert client == "[2001:db8::5]:443"
    assert echo["headers"]["x-forwarded-for"] == "2001:db8::5"


def test_a_local_header_keeps_the_connections_own_address(proxy) -> None:
    # A balancer's own health check: LOCAL (v2), or UNKNOWN (v1).
    client, _ = ask(proxy.port, v2_header(("0.0.0.0", 0), ("0.0.0.0", 0), local=True))
    assert client is not None and client.startswith(f"{HOST}:")
    client, _ = ask(proxy.port, b"PROXY UNKNOWN\r\n")
    assert client is not None and client.startswith(f"{HOST}:")


def test_a_connection_without_a_header_is_refused(proxy, ferroxy_logs) -> None:
    for first_bytes in (simple_request("GET", "/no-header"), b"PROXY TCP4 nonsense\r\n"):
        with raw_connect(proxy.port) as sock:
            sock.sendall(first_bytes)
            closed, data = wait_closed(sock, 5)
        assert closed and data == b"", "nothing is answered before a valid header"
    wait_until(lambda: any("PROXY" in r.getMessage() for r in ferroxy_logs.records))
    client, _ = ask(proxy.port, v1_header(("192.0.2.1", 1234), (HOST, proxy.port)))
    assert client == "192.0.2.1:1234"


def test_proxy_protocol_before_tls(tmp_path, ferroxy_upstream, ferroxy_proxy) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    app = reporting_app(ferroxy_upstream.addr)
    app.tls = TlsConfig(cert=tmp_path / "c.pem", key=tmp_path / "k.pem")
    proxy = ferroxy_proxy(app, proxy_protocol=True)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection((HOST, proxy.port), timeout=5) as raw:
        raw.sendall(v1_header(("203.0.113.9", 60000), (HOST, proxy.port)))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(simple_request("GET", "/tls"))
            response = read_response(tls.makefile("rb"))
    assert response.status == 200 and response.header("x-client") == "203.0.113.9:60000"
