"""TLS to upstreams: verification (and its failures, as 502s with a log line saying why),
client certificates, SNI, HTTP/2 chosen by ALPN, and pool keys that keep TLS settings apart."""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import LogCapture
from ferroxy import Peer, Proxy
from ferroxy.testing import EchoServer, start_upstream


@dataclass
class Pki:
    """A CA the proxy is told about, its server certificate files, and a second CA."""

    ca: str
    cert: str
    key: str
    directory: Path
    authority: trustme.CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    authority = trustme.CA()
    server = authority.issue_cert("localhost", "alt.test")
    authority.cert_pem.write_to_path(str(directory / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))
    return Pki(
        ca=str(directory / "ca.pem"),
        cert=str(directory / "server.pem"),
        key=str(directory / "server.key"),
        directory=directory,
        authority=authority,
    )


@pytest.fixture
def tls_upstream(pki: Pki) -> Iterator[EchoServer]:
    with start_upstream(tls_cert=pki.cert, tls_key=pki.key) as upstream:
        yield upstream


def peer_app(make_peer: Callable[[Any], Peer]) -> type[Proxy]:
    class App(Proxy):
        def upstream_peer(self, session, ctx):
            return make_peer(session)

    return App


def fixed_peer(peer: Peer) -> type[Proxy]:
    return peer_app(lambda session: peer)


def test_tls_upstream_with_ca(tls_upstream, pki, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(fixed_peer(Peer(tls_upstream.addr, tls=True, sni="localhost", ca=pki.ca)))
    r = httpx.get(proxy.url + "/secure", timeout=10)
    assert r.status_code == 200, r.text
    echo = r.json()
    assert echo["tls"] is True and echo["path"] == "/secure"
    assert echo["version"] == "HTTP/1.1"


def test_sni_defaults_to_the_host_of_addr(tls_upstream, pki, ferroxy_proxy) -> None:
    peer = Peer(f"localhost:{tls_upstream.port}", tls=True, ca=pki.ca)
    assert peer.sni is None and peer.tls and peer.ca == pki.ca
    proxy = ferroxy_proxy(fixed_peer(peer))
    echo = httpx.get(proxy.url + "/", timeout=10).json()
    assert echo["tls"] is True and echo["sni"] == "localhost"


def test_empty_sni_sends_none_and_an_ip_literal_sends_none(
    tls_upstream, pki, ferroxy_proxy
) -> None:
    by_name = Peer(f"localhost:{tls_upstream.port}", tls=True, sni="", ca=pki.ca)
    # The certificate names no IP: the chain is checked, the name cannot be.
    by_ip = Peer(tls_upstream.addr, tls=True, ca=pki.ca, verify_hostname=False)
    proxy = ferroxy_proxy(peer_app(lambda s: by_name if s.req.path == "/name" else by_ip))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for path in ["/name", "/ip"]:
            echo = c.get(path).json()
            assert echo["tls"] is True and echo["sni"] is None, path


def test_a_stalled_tls_handshake_counts_against_the_connect_timeout(ferroxy_proxy) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        peer = Peer(addr, tls=True, sni="localhost", connect_timeout=0.3)
        proxy = ferroxy_proxy(fixed_peer(peer))
        started = time.monotonic()
        assert httpx.get(proxy.url + "/", timeout=10).status_code == 504
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def failed_handshake(ferroxy_logs: LogCapture, ferroxy_proxy: Any, peer: Peer, cause: str) -> None:
    proxy = ferroxy_proxy(fixed_peer(peer))
    assert httpx.get(proxy.url + "/", timeout=10).status_code == 502
    logged = ferroxy_logs.wait_for(lambda rec: cause in rec.getMessage(), timeout=5)
    assert logged, ferroxy_logs.dump()
    assert "tls_handshake" in logged[0].getMessage()


def test_wrong_hostname_is_502_and_logged(ferroxy_logs, tls_upstream, pki, ferroxy_proxy) -> None:
    peer = Peer(tls_upstream.addr, tls=True, sni="wrong.test", ca=pki.ca)
    failed_handshake(ferroxy_logs, ferroxy_proxy, peer, "wrong hostname")


def test_unknown_ca_is_502_and_logged(ferroxy_logs, tls_upstream, ferroxy_proxy) -> None:
    # No ca=: the webpki roots, which never signed trustme's CA.
    peer = Peer(tls_upstream.addr, tls=True, sni="localhost")
    failed_handshake(ferroxy_logs, ferroxy_proxy, peer, "unknown CA")


def test_expired_certificate_is_502_and_logged(ferroxy_logs, pki, ferroxy_proxy) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = pki.authority.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )
    cert, key = pki.directory / "expired.pem", pki.directory / "expired.key"
    expired.cert_chain_pems[0].write_to_path(str(cert))
    expired.private_key_pem.write_to_path(str(key))
    with start_upstream(tls_cert=str(cert), tls_key=str(key)) as upstream:
        peer = Peer(upstream.addr, tls=True, sni="localhost", ca=pki.ca)
        failed_handshake(ferroxy_logs, ferroxy_proxy, peer, "expired")


def test_verify_cert_false_accepts_an_unknown_ca(tls_upstream, ferroxy_proxy) -> None:
    peer = Peer(tls_upstream.addr, tls=True, sni="localhost", verify_cert=False)
    proxy = ferroxy_proxy(fixed_peer(peer))
    assert httpx.get(proxy.url + "/", timeout=10).json()["tls"] is True


def test_verify_hostname_false_accepts_another_name_not_another_ca(
    tls_upstream, pki, ferroxy_proxy
) -> None:
    other_ca = Peer(tls_upstream.addr, tls=True, sni="wrong.test", verify_hostname=False)
    ok = Peer(tls_upstream.addr, tls=True, sni="wrong.test", ca=pki.ca, verify_hostname=False)
    proxy = ferroxy_proxy(peer_app(lambda s: ok if s.req.path == "/ok" else other_ca))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/ok").json()["tls"] is True
        assert c.get("/other-ca").status_code == 502, "the chain must still be checked"


def test_client_certificate_for_an_upstream_that_requires_one(pki, ferroxy_proxy) -> None:
    client_authority = trustme.CA()
    client = client_authority.issue_cert("client.test")
    client_ca, cert, key = (
        pki.directory / n for n in ("client-ca.pem", "client.pem", "client.key")
    )
    client_authority.cert_pem.write_to_path(str(client_ca))
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    with start_upstream(tls_cert=pki.cert, tls_key=pki.key, client_ca=str(client_ca)) as upstream:
        with_cert = Peer(
            upstream.addr, tls=True, sni="localhost", ca=pki.ca, client_cert=(str(cert), str(key))
        )
        assert with_cert.client_cert == (str(cert), str(key))
        without = Peer(upstream.addr, tls=True, sni="localhost", ca=pki.ca)
        proxy = ferroxy_proxy(peer_app(lambda s: with_cert if s.req.path == "/cert" else without))
        with httpx.Client(base_url=proxy.url, timeout=10) as c:
            echo = c.get("/cert").json()
            assert echo["client_cert"] is True and echo["tls"] is True
            assert c.get("/no-cert").status_code == 502


def test_alpn_h2_without_tls_is_cleartext_http2(ferroxy_upstream, ferroxy_proxy) -> None:
    peer = Peer(ferroxy_upstream.addr, alpn="h2")
    assert peer.alpn == "h2" and not peer.tls
    proxy = ferroxy_proxy(fixed_peer(peer))
    echo = httpx.get(proxy.url + "/", timeout=10).json()
    assert echo["version"] == "HTTP/2.0" and echo["tls"] is False


def test_alpn_h2_h1_over_tls_is_http2(tls_upstream, pki, ferroxy_proxy) -> None:
    peer = Peer(tls_upstream.addr, tls=True, sni="localhost", ca=pki.ca, alpn="h2,h1")
    proxy = ferroxy_proxy(fixed_peer(peer))
    echo = httpx.get(proxy.url + "/", timeout=10).json()
    assert echo["version"] == "HTTP/2.0" and echo["tls"] is True


def test_alpn_h1_over_tls_is_http1(tls_upstream, pki, ferroxy_proxy) -> None:
    peer = Peer(tls_upstream.addr, tls=True, sni="localhost", ca=pki.ca, alpn="h1")
    proxy = ferroxy_proxy(fixed_peer(peer))
    assert httpx.get(proxy.url + "/", timeout=10).json()["version"] == "HTTP/1.1"


def test_concurrent_requests_share_one_h2_upstream_connection(
    tls_upstream, pki, ferroxy_proxy
) -> None:
    peer = Peer(tls_upstream.addr, tls=True, sni="localhost", ca=pki.ca, alpn="h2,h1")
    proxy = ferroxy_proxy(fixed_peer(peer))

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=proxy.url, timeout=20, limits=limits) as c:
            return await asyncio.gather(*(c.get(f"/delay/50?n={i}") for i in range(100)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 100
    assert {r.json()["version"] for r in responses} == {"HTTP/2.0"}
    assert tls_upstream.connections == 1


@pytest.mark.parametrize(
    "differing",
    [{"sni": "alt.test"}, {"verify_hostname": False}, {"alpn": "h2,h1"}],
    ids=["sni", "verify_hostname", "alpn"],
)
def test_peers_differing_in_tls_settings_do_not_share_connections(
    tls_upstream, pki, ferroxy_proxy, differing: dict[str, Any]
) -> None:
    first = Peer(tls_upstream.addr, tls=True, sni="localhost", ca=pki.ca)
    second = Peer(tls_upstream.addr, **{"tls": True, "sni": "localhost", "ca": pki.ca, **differing})
    proxy = ferroxy_proxy(peer_app(lambda s: first if s.req.path == "/first" else second))
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        seen = [c.get(path).json()["connection"] for path in ["/first", "/second"] * 2]
    assert seen[0] == seen[2] and seen[1] == seen[3], "each peer reuses its own connection"
    assert seen[0] != seen[1], f"{differing} must not share a connection"
    assert tls_upstream.connections == 2


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"alpn": "h3"}, "Peer.alpn"),
        ({"alpn": "h2,h1"}, "Peer.alpn"),
        ({"tls": True, "ca": "/nonexistent/ca.pem"}, "Peer.ca: cannot read"),
        (
            {"tls": True, "client_cert": ("/nonexistent/c.pem", "/nonexistent/c.key")},
            "Peer.client_cert",
        ),
        ({"tls": True, "sni": "not a name"}, "Peer.sni"),
        ({"ca": "ca.pem"}, "Peer.ca"),
    ],
)
def test_bad_tls_options_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Peer("127.0.0.1:443", **options)


def test_a_ca_file_that_is_not_pem_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"Peer\.ca: .*bad\.pem"):
        Peer("127.0.0.1:443", tls=True, ca=str(bad))
