"""``ferroxy.Listener``: one process with a plain listener, a TLS listener with its own
certificates and a PROXY-protocol listener, each serving as it says; given in the ``listen``
option or ``Proxy.listen``, beside plain addresses and the tls/tls_listen/proxy_protocol
shorthands; conflicting listeners refused by field."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import (
    HOST,
    free_port,
    read_response,
    simple_request,
    wait_closed,
    wait_for_port,
    write_app,
)
from ferroxy import Listener, Proxy, ResponseHeader, Session, TlsConfig
from ferroxy.testing import EchoServer
from proxy_protocol_client import v1_header


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.directory = directory

    def issue(self, name: str) -> TlsConfig:
        leaf = self.ca.issue_cert(name)
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return TlsConfig(cert=cert, key=key)

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def reporting_app(upstream: str) -> type[Proxy]:
    class App(Proxy):
        def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: Any
        ) -> None:
            upstream_response.headers["x-client"] = session.client_addr
            upstream_response.headers["x-scheme"] = session.client_conn.scheme
            info = session.tls
            upstream_response.headers["x-sni"] = "" if info is None else info.sni or ""

    App.upstream = upstream
    return App


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def served_names(port: int, context: ssl.SSLContext, name: str) -> list[str]:
    context.check_hostname = False
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def proxied_client(port: int, src: tuple[str, int]) -> str:
    """Send a PROXY header naming ``src``, then a request; the client the proxy saw."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(v1_header(src, (HOST, port)) + simple_request("GET", "/pp"))
        response = read_response(sock.makefile("rb"))
    assert response.status == 200
    client = response.header("x-client")
    assert client is not None
    return client


def test_plain_tls_and_proxy_protocol_listeners_in_one_server(
    certs: Certs, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    # The app's own tls is for its plain-string addresses; the Listener has its own.
    app = reporting_app(ferroxy_upstream.addr)
    app.tls = certs.issue("app.localhost")
    proxy = ferroxy_proxy(
        app,
        listen=[
            Listener(f"{HOST}:0"),
            Listener(f"{HOST}:0", tls=[certs.issue("localhost")]),
            Listener(f"{HOST}:0", proxy_protocol=True),
            f"{HOST}:0",
        ],
    )
    plain, tls, proxied, shorthand = proxy.urls
    assert [u.split("://")[0] for u in proxy.urls] == ["http", "https", "http", "https"]

    r = httpx.get(plain + "/plain", timeout=10)
    assert r.status_code == 200 and r.headers["x-scheme"] == "http"

    secure = f"https://localhost:{port_of(tls)}/tls"
    r = httpx.get(secure, verify=certs.context(), timeout=10)
    assert r.status_code == 200 and r.headers["x-scheme"] == "https"
    assert r.headers["x-sni"] == "localhost"
    assert served_names(port_of(tls), certs.context(), "localhost") == ["localhost"]
    assert served_names(port_of(shorthand), certs.context(), "x") == ["app.localhost"]

    assert proxied_client(port_of(proxied), ("203.0.113.7", 51000)) == "203.0.113.7:51000"
    # Only that one expects a header: the plain one answers a request without.
    with socket.create_connection((HOST, port_of(proxied)), timeout=5) as sock:
        sock.sendall(simple_request("GET", "/no-header"))
        closed, data = wait_closed(sock, 5)
    assert closed and data == b""
    assert ferroxy_upstream.requests == 3


def test_proxy_listen_declares_the_listeners(
    certs: Certs, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    app = reporting_app(ferroxy_upstream.addr)
    app.listen = [
        f"{HOST}:0",
        Listener(f"{HOST}:0", tls=certs.issue("localhost"), proxy_protocol=True),
    ]
    proxy = ferroxy_proxy(app)
    plain, tls = proxy.urls
    assert plain.startswith("http://") and tls.startswith("https://")
    assert httpx.get(plain + "/", timeout=10).status_code == 200
    # PROXY header first, then the TLS handshake, on the one listener that has both.
    port = port_of(tls)
    with socket.create_connection((HOST, port), timeout=5) as raw:
        raw.sendall(v1_header(("198.51.100.9", 6000), (HOST, port)))
        with certs.context().wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(simple_request("GET", "/both"))
            response = read_response(sock.makefile("rb"))
    assert response.header("x-client") == "198.51.100.9:6000"
    assert response.header("x-scheme") == "https"

    # The listen option wins over the app's.
    overridden = ferroxy_proxy(app, listen=f"{HOST}:0")
    assert len(overridden.urls) == 1 and overridden.url.startswith("http://")


def test_the_shorthands_keep_working_beside_listeners(
    certs: Certs, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    app = reporting_app(ferroxy_upstream.addr)
    app.tls = certs.issue("localhost")
    proxy = ferroxy_proxy(
        app,
        listen=[f"{HOST}:0", Listener(f"{HOST}:0")],
        tls_listen=f"{HOST}:0",
        proxy_protocol=True,
    )
    # With tls_listen, the plain-string address is plain; the Listener keeps its own
    # settings (no PROXY header), the shorthand ones expect one.
    assert [u.split("://")[0] for u in proxy.urls] == ["http", "http", "https"]
    string_addr, own, _ = proxy.urls
    assert proxied_client(port_of(string_addr), ("192.0.2.5", 80)) == "192.0.2.5:80"
    assert httpx.get(own + "/", timeout=10).status_code == 200


def test_conflicting_listeners_are_refused_by_field(
    certs: Certs, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    app = reporting_app(ferroxy_upstream.addr)
    app.tls = certs.issue("localhost")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        addr = f"{HOST}:{taken.getsockname()[1]}"
    with pytest.raises(ValueError, match=rf"tls_listen: {addr} is already listen\[1\]"):
        ferroxy_proxy(app, listen=[f"{HOST}:0", Listener(addr, tls=app.tls)], tls_listen=addr)
    with pytest.raises(ValueError, match=rf"listen\[1\]: {addr} is already listen\[0\]"):
        ferroxy_proxy(app, listen=[addr, Listener(addr, proxy_protocol=True)])
    with pytest.raises(TypeError, match="tls_listen must be a str or a list of str"):
        ferroxy_proxy(app, tls_listen=[Listener(f"{HOST}:0")])
    with pytest.raises(ValueError, match=r"listen\[0\]\.addr: empty listen address"):
        ferroxy_proxy(app, listen=[Listener("")])
    with pytest.raises(ValueError, match=r"listen\.tls: an empty list"):
        ferroxy_proxy(app, listen=Listener(f"{HOST}:0", tls=[]))
    with pytest.raises(
        TypeError, match=r"listen\[0\] must be a str or a ferroxy\.Listener, not int"
    ):
        ferroxy_proxy(app, listen=[8080])
    with pytest.raises(TypeError, match=r"listen must be a str, a ferroxy\.Listener, or a list"):
        ferroxy_proxy(app, listen=8080)
    with pytest.raises(TypeError, match=r"Listener\.proxy_protocol must be a bool"):
        Listener(f"{HOST}:0", proxy_protocol="yes")  # type: ignore[arg-type]


def test_reload_tls_rereads_a_listeners_own_certificates(
    certs: Certs, tmp_path: Path, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    own = certs.issue("localhost")
    proxy = ferroxy_proxy(
        reporting_app(ferroxy_upstream.addr), listen=Listener(f"{HOST}:0", tls=own)
    )
    assert served_names(proxy.port, certs.context(), "localhost") == ["localhost"]
    renewed = certs.ca.issue_cert("renewed.localhost")
    renewed.cert_chain_pems[0].write_to_path(str(own.cert))
    renewed.private_key_pem.write_to_path(str(own.key))
    proxy.reload_tls()
    assert served_names(proxy.port, certs.context(), "localhost") == ["renewed.localhost"]


def test_the_cli_serves_the_apps_listen(tmp_path: Path, ferroxy_upstream: EchoServer) -> None:
    port = free_port()
    spec = write_app(
        tmp_path,
        f"""
        import ferroxy

        class App(ferroxy.Proxy):
            upstream = "{ferroxy_upstream.addr}"
            listen = [ferroxy.Listener("{HOST}:{port}")]
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferroxy", spec, "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        assert httpx.get(f"http://{HOST}:{port}/cli", timeout=10).status_code == 200
    finally:
        proc.kill()
        proc.wait(timeout=10)
