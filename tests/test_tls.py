"""TLS on the proxy's listeners: certificates chosen by SNI, ALPN to HTTP/2, mutual TLS with the
client's certificate on ``session.tls``, plain and TLS listeners in one process, reloading
certificates under an open connection, and handshakes that fail or stall."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import HOST, port_accepts, raw_connect, wait_closed, wait_until
from ferroxy import Proxy, ResponseHeader, Session, TlsConfig


class Certs:
    """A CA and certificates it issued, written as PEM files under ``directory``."""

    def __init__(self, directory: Path, ca: trustme.CA | None = None) -> None:
        self.directory = directory
        self.ca = ca or trustme.CA()
        self.ca_file = directory / f"ca-{id(self.ca)}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *names: str) -> TlsConfig:
        cert = self.ca.issue_cert(name, *names)
        stem = self.directory / name.replace("*", "star")
        cert.cert_chain_pems[0].write_to_path(f"{stem}.crt")
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(f"{stem}.crt", append=True)
        cert.private_key_pem.write_to_path(f"{stem}.key")
        return TlsConfig(cert=f"{stem}.crt", key=f"{stem}.key")

    def client_context(self, *, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def tls_app(upstream_addr: str, tls: Any) -> type[Proxy]:
    """An app that reports what the handshake settled in response headers."""

    class App(Proxy):
        upstream = upstream_addr

        def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: Any
        ) -> None:
            info = session.tls
            h = upstream_response.headers
            h["x-scheme"] = session.client_conn.scheme
            if info is None:
                h["x-tls"] = "none"
                return
            h["x-tls"] = f"{info.version} {info.alpn} {info.sni}"
            h["x-cipher"] = info.cipher or ""
            cert = info.client_cert
            if cert is not None:
                h["x-client-subject"] = cert.subject
                h["x-client-sans"] = ",".join(cert.sans)
                h["x-client-fingerprint"] = cert.sha256_fingerprint
                h["x-client-serial"] = cert.serial
                h["x-client-pem-starts"] = cert.pem.splitlines()[0]

    App.tls = tls
    return App


def served_certificate(port: int, context: ssl.SSLContext, server_name: str | None) -> dict:
    """Handshake with ``server_name`` and return the certificate the proxy chose."""
    context.check_hostname = False
    with (
        socket.create_connection((HOST, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        cert = tls.getpeercert()
        assert cert is not None
        return cert


def dns_names(cert: dict) -> list[str]:
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def test_certificate_chosen_by_sni_among_three(certs, ferroxy_upstream, ferroxy_proxy) -> None:
    default = certs.issue("default.test", "localhost")
    exact = certs.issue("a.example.test")
    wildcard = certs.issue("*.b.example.test")
    # Listed after the wildcard that also covers it: the exact name still wins.
    exact_under_wildcard = certs.issue("z.b.example.test")
    chain = [default, exact, wildcard, exact_under_wildcard]
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, chain))
    assert proxy.url.startswith("https://")
    port = proxy.port
    context = certs.client_context()
    assert dns_names(served_certificate(port, context, "a.example.test")) == ["a.example.test"]
    assert dns_names(served_certificate(port, context, "A.Example.TEST")) == ["a.example.test"]
    assert dns_names(served_certificate(port, context, "x.b.example.test")) == ["*.b.example.test"]
    assert dns_names(served_certificate(port, context, "z.b.example.test")) == ["z.b.example.test"]
    # A wildcard covers one label only; an unknown name, and no name, get the first.
    assert dns_names(served_certificate(port, context, "y.x.b.example.test")) == [
        "default.test",
        "localhost",
    ]
    assert dns_names(served_certificate(port, context, "other.test")) == [
        "default.test",
        "localhost",
    ]
    assert dns_names(served_certificate(port, context, None)) == ["default.test", "localhost"]

    # And the request is proxied, with what the handshake settled on session.tls.
    with httpx.Client(verify=certs.client_context(), timeout=10) as client:
        r = client.get(f"https://localhost:{port}/hello")
    assert r.status_code == 200 and r.json()["path"] == "/hello"
    version, alpn, sni = r.headers["x-tls"].split(" ")
    assert version in ("TLSv1.3", "TLSv1.2") and alpn == "http/1.1" and sni == "localhost"
    assert r.headers["x-scheme"] == "https"
    assert r.json()["headers"]["x-forwarded-proto"] == "https"
    # Named as OpenSSL (and so nginx's $ssl_protocol and $ssl_cipher) names them.
    with socket.create_connection((HOST, port), timeout=5) as raw:
        context = certs.client_context()
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /cipher HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(4096)
            cipher, version, _ = tls.cipher()
    assert f"x-tls: {version} ".encode() in head
    assert f"x-cipher: {cipher}\r\n".encode() in head


def test_http2_over_tls_by_alpn(certs, ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, certs.issue("localhost")))
    with httpx.Client(http2=True, verify=certs.client_context(), timeout=10) as client:
        responses = [client.get(f"https://localhost:{proxy.port}/h2/{i}") for i in range(5)]
    for i, r in enumerate(responses):
        assert r.http_version == "HTTP/2" and r.json()["path"] == f"/h2/{i}"
        assert r.headers["x-tls"].split(" ")[1] == "h2"


def test_plain_and_tls_listeners_in_one_process(certs, ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(
        tls_app(ferroxy_upstream.addr, certs.issue("localhost")),
        listen=f"{HOST}:0",
        tls_listen=[f"{HOST}:0"],
    )
    plain_url, tls_url = proxy.urls
    assert plain_url.startswith("http://") and tls_url.startswith("https://")
    plain = httpx.get(plain_url + "/p", timeout=10)
    assert plain.headers["x-tls"] == "none" and plain.headers["x-scheme"] == "http"
    secure = httpx.get(
        tls_url.replace(HOST, "localhost") + "/s", verify=certs.client_context(), timeout=10
    )
    assert secure.headers["x-scheme"] == "https"
    assert secure.json()["headers"]["x-forwarded-proto"] == "https"


def client_identity(certs: Certs, name: str) -> tuple[str, str, trustme.LeafCert]:
    leaf = certs.ca.issue_cert(name)
    stem = certs.directory / f"client-{name}"
    leaf.cert_chain_pems[0].write_to_path(f"{stem}.crt")
    leaf.private_key_pem.write_to_path(f"{stem}.key")
    return f"{stem}.crt", f"{stem}.key", leaf


def test_mutual_tls_required(certs, tmp_path, ferroxy_upstream, ferroxy_proxy) -> None:
    client_ca = trustme.CA()
    client_certs = Certs(_subdir(tmp_path, "clients"), client_ca)
    server = certs.issue("localhost")
    tls = TlsConfig(
        cert=server.cert, key=server.key, client_ca=client_certs.ca_file, client_auth="required"
    )
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, tls))
    url = f"https://localhost:{proxy.port}/mtls"

    cert_file, key_file, _ = client_identity(client_certs, "alice@example.test")
    context = certs.client_context()
    context.load_cert_chain(cert_file, key_file)
    r = httpx.get(url, verify=context, timeout=10)
    assert r.status_code == 200
    assert "alice@example.test" in r.headers["x-client-sans"]
    assert r.headers["x-client-pem-starts"] == "-----BEGIN CERTIFICATE-----"
    assert len(r.headers["x-client-fingerprint"]) == 64 and r.headers["x-client-serial"]

    # Without a certificate, or with one another CA signed, the handshake is refused.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=certs.client_context(), timeout=10)
    stranger = Certs(_subdir(tmp_path, "strangers"))
    cert_file, key_file, _ = client_identity(stranger, "mallory.test")
    context = certs.client_context()
    context.load_cert_chain(cert_file, key_file)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=context, timeout=10)
    # The proxy still serves the next client.
    context = certs.client_context()
    context.load_cert_chain(*client_identity(client_certs, "bob.test")[:2])
    assert httpx.get(url, verify=context, timeout=10).status_code == 200


def test_mutual_tls_optional(certs, tmp_path, ferroxy_upstream, ferroxy_proxy) -> None:
    client_certs = Certs(_subdir(tmp_path, "clients"))
    server = certs.issue("localhost")
    tls = TlsConfig(
        cert=server.cert, key=server.key, client_ca=client_certs.ca_file, client_auth="optional"
    )
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, tls))
    url = f"https://localhost:{proxy.port}/optional"
    anonymous = httpx.get(url, verify=certs.client_context(), timeout=10)
    assert anonymous.status_code == 200 and "x-client-subject" not in anonymous.headers
    context = certs.client_context()
    context.load_cert_chain(*client_identity(client_certs, "carol.test")[:2])
    known = httpx.get(url, verify=context, timeout=10)
    assert "carol.test" in known.headers["x-client-sans"]
    # Optional is not "anything goes": a certificate from another CA is refused.
    strangers = Certs(_subdir(tmp_path, "strangers"))
    context = certs.client_context()
    context.load_cert_chain(*client_identity(strangers, "mallory.test")[:2])
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=context, timeout=10)


def _subdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir(exist_ok=True)
    return path


def test_certificate_reload_keeps_open_connections(
    certs, tmp_path, ferroxy_upstream, ferroxy_proxy
) -> None:
    first = certs.issue("localhost")
    app = tls_app(ferroxy_upstream.addr, first)()
    proxy = ferroxy_proxy(app)
    url = f"https://localhost:{proxy.port}"
    with httpx.Client(verify=certs.client_context(), timeout=10) as kept:
        assert kept.get(url + "/before").status_code == 200

        # New files from another CA at the same paths, then a reload.
        renewed = Certs(_subdir(tmp_path, "renewed"))
        fresh = renewed.issue("localhost")
        Path(str(first.cert)).write_bytes(Path(str(fresh.cert)).read_bytes())
        Path(str(first.key)).write_bytes(Path(str(fresh.key)).read_bytes())
        app.reload_tls()

        # The connection open across the reload keeps serving ...
        r = kept.get(url + "/after")
        assert r.status_code == 200 and r.json()["connection"] == 1
        # ... and new handshakes get the new certificate.
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/old-ca", verify=certs.client_context(), timeout=10)
        assert (
            httpx.get(url + "/new", verify=renewed.client_context(), timeout=10).status_code == 200
        )

        # A broken file is refused by name, and the certificate in use stays.
        Path(str(first.key)).write_text("not a key")
        with pytest.raises(ValueError, match=r"localhost\.key"):
            app.reload_tls()
        assert (
            httpx.get(url + "/kept", verify=renewed.client_context(), timeout=10).status_code == 200
        )


def test_plain_http_and_stalled_handshakes_cost_nothing(
    certs, ferroxy_upstream, ferroxy_proxy, ferroxy_logs
) -> None:
    tls = certs.issue("localhost")
    tls = TlsConfig(cert=tls.cert, key=tls.key, handshake_timeout=0.5)
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, tls))

    # Plain HTTP to the TLS port: closed, and logged.
    sock = raw_connect(proxy.port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    closed, _ = wait_closed(sock, 5)
    sock.close()
    assert closed
    wait_until(lambda: any("TLS handshake failed" in r.getMessage() for r in ferroxy_logs.records))

    # A client that connects and says nothing is closed after the handshake timeout.
    sock = raw_connect(proxy.port)
    started = time.monotonic()
    closed, _ = wait_closed(sock, 5)
    sock.close()
    assert closed and time.monotonic() - started < 4
    wait_until(lambda: any("timed out" in r.getMessage() for r in ferroxy_logs.records))

    assert port_accepts(proxy.port)
    r = httpx.get(
        f"https://localhost:{proxy.port}/still", verify=certs.client_context(), timeout=10
    )
    assert r.status_code == 200


def test_bad_tls_config_names_the_field(certs, tmp_path, ferroxy_upstream, ferroxy_proxy) -> None:
    good = certs.issue("localhost")
    other = certs.issue("other.test")
    missing = TlsConfig(cert=tmp_path / "missing.crt", key=good.key)
    with pytest.raises(ValueError, match=r"missing\.crt"):
        ferroxy_proxy(tls_app(ferroxy_upstream.addr, missing))
    mismatched = TlsConfig(cert=good.cert, key=other.key)
    with pytest.raises(ValueError, match="does not go with"):
        ferroxy_proxy(tls_app(ferroxy_upstream.addr, mismatched))
    no_ca = TlsConfig(cert=good.cert, key=good.key, client_auth="required")
    with pytest.raises(ValueError, match="client_ca"):
        ferroxy_proxy(tls_app(ferroxy_upstream.addr, no_ca))
    strict = TlsConfig(cert=other.cert, key=other.key, client_ca=good.cert, client_auth="required")
    with pytest.raises(ValueError, match=r"tls\[1\]\.client_ca"):
        ferroxy_proxy(tls_app(ferroxy_upstream.addr, [good, strict]))
    with pytest.raises(ValueError, match="tls_listen"):
        ferroxy_proxy(tls_app(ferroxy_upstream.addr, None), tls_listen=f"{HOST}:0")
    wrong_types: list[tuple[TlsConfig, str]] = [
        (TlsConfig(cert=1, key=good.key), r"TlsConfig\.cert must be a path, got int"),  # type: ignore[arg-type]
        (TlsConfig(cert=good.cert, key=good.key, handshake_timeout="5"), "handshake_timeout"),  # type: ignore[arg-type]
    ]
    for config, message in wrong_types:
        with pytest.raises(TypeError, match=message):
            ferroxy_proxy(tls_app(ferroxy_upstream.addr, config))


def test_cli_tls_cert_and_sighup_reload(certs, tmp_path, ferroxy_upstream) -> None:
    import signal

    from conftest import fixed_upstream_app, run_cli

    served = certs.issue("localhost")
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with run_cli(spec, "--tls-cert", str(served.cert), "--tls-key", str(served.key)) as cli:
        url = f"https://localhost:{cli.port}/via-cli"
        r = httpx.get(url, verify=certs.client_context(), timeout=10)
        assert r.status_code == 200 and r.json()["path"] == "/via-cli"
        banner = f"ferroxy listening on https://{HOST}:{cli.port}"
        assert wait_until(lambda: banner in cli.stderr(), timeout=5), cli.describe()

        renewed = Certs(_subdir(tmp_path, "renewed"))
        fresh = renewed.issue("localhost")
        Path(str(served.cert)).write_bytes(Path(str(fresh.cert)).read_bytes())
        Path(str(served.key)).write_bytes(Path(str(fresh.key)).read_bytes())
        cli.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "TLS certificates reloaded" in cli.stderr(), timeout=5)
        r = httpx.get(url, verify=renewed.client_context(), timeout=10)
        assert r.status_code == 200


def test_a_stalled_handshake_does_not_hold_the_shutdown(certs, ferroxy_upstream) -> None:
    from ferroxy.testing import start_proxy

    proxy = start_proxy(tls_app(ferroxy_upstream.addr, certs.issue("localhost")), grace_period=20)
    sock = raw_connect(proxy.port)  # connects, and never says hello
    try:
        wait_until(lambda: port_accepts(proxy.port))
        started = time.monotonic()
        proxy.stop()
        took = time.monotonic() - started
    finally:
        sock.close()
    assert took < 5, f"shutdown waited {took:.1f}s on a client stuck before its handshake"


def test_an_idle_tls_connection_is_closed_at_shutdown_with_close_notify(
    certs, ferroxy_upstream
) -> None:
    """An idle keep-alive TLS connection neither holds the shutdown nor is cut without TLS's
    close_notify (a client that checks for truncation sees a clean end)."""
    from ferroxy.testing import start_proxy

    proxy = start_proxy(tls_app(ferroxy_upstream.addr, certs.issue("localhost")), grace_period=20)
    raw = socket.create_connection((HOST, proxy.port), timeout=5)
    context = certs.client_context()
    tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
    try:
        tls.sendall(b"GET /idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        while not received.endswith(b"}"):
            received += tls.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        proxy.stop()
        took = time.monotonic() - started
        # What is left is the end of the stream: close_notify, not an abrupt EOF (which
        # raises SSLEOFError with suppress_ragged_eofs=False).
        assert tls.recv(65536) == b""
    finally:
        tls.close()
    assert took < 5, f"shutdown waited {took:.1f}s on an idle TLS connection"


def test_connection_close_over_tls_ends_with_close_notify(
    certs, ferroxy_upstream, ferroxy_proxy
) -> None:
    proxy = ferroxy_proxy(tls_app(ferroxy_upstream.addr, certs.issue("localhost")))
    raw = socket.create_connection((HOST, proxy.port), timeout=5)
    context = certs.client_context()
    with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET /bye HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := tls.recv(65536):  # SSLEOFError here if the proxy skipped close_notify
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and b'"path":"/bye"' in received


def test_a_keepalive_timeout_over_tls_ends_with_close_notify(
    certs, ferroxy_upstream, ferroxy_proxy
) -> None:
    proxy = ferroxy_proxy(
        tls_app(ferroxy_upstream.addr, certs.issue("localhost")), keepalive_timeout=0.5
    )
    for send_a_request in (True, False):
        raw = socket.create_connection((HOST, proxy.port), timeout=5)
        context = certs.client_context()
        tls = context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
        with tls:
            if send_a_request:
                tls.sendall(b"GET /once HTTP/1.1\r\nHost: localhost\r\n\r\n")
                received = b""
                while not received.endswith(b"}"):
                    received += tls.recv(65536)
            # Idle past the keep-alive timeout: closed, with close_notify (SSLEOFError without).
            assert tls.recv(65536) == b"", send_a_request
