"""``Proxy.connection_filter``: a client refused by the app's hook (sync or async) or by a
declarative ``IPAccess`` gets its connection closed unanswered, before any TLS handshake and
after the PROXY protocol header, and no hook or upstream sees it; one allowed is proxied."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import HOST, raw_connect, read_response, simple_request, wait_closed, wait_until
from ferroxy import Proxy, ResponseHeader, Session, TlsConfig, filters
from ferroxy.testing import EchoServer
from proxy_protocol_client import v1_header, v2_header


def refused(port: int, first_bytes: bytes = b"", host: str = HOST) -> bool:
    """Whether a connection to ``port`` (sending ``first_bytes``) is closed with nothing
    answered."""
    with socket.create_connection((host, port), timeout=5) as sock:
        if first_bytes:
            sock.sendall(first_bytes)
        closed, data = wait_closed(sock, 5)
    assert data == b"", f"a refused client got {data!r}"
    return closed


def get_status(port: int, first_bytes: bytes = b"", host: str = HOST) -> int:
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(first_bytes + simple_request("GET", "/hello"))
        return read_response(sock.makefile("rb")).status


class Reporting(Proxy):
    """Reports the client address hooks see (``x-client``)."""

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        upstream_response.headers["x-client"] = session.client_addr


def hooked_app(upstream: str, decide: Any) -> tuple[type[Proxy], list[str]]:
    """An app whose ``connection_filter`` records each client it is asked about and answers
    ``decide(client_addr)``."""
    asked: list[str] = []

    class App(Reporting):
        def connection_filter(self, client_addr: str) -> bool:
            asked.append(client_addr)
            return bool(decide(client_addr))

    App.upstream = upstream
    return App, asked


def test_a_refused_client_is_closed_unanswered_and_the_upstream_sees_nothing(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, ferroxy_logs: Any
) -> None:
    app, asked = hooked_app(ferroxy_upstream.addr, lambda addr: False)
    proxy = ferroxy_proxy(app)
    assert refused(proxy.port, simple_request("GET", "/refused"))
    assert len(asked) == 1 and asked[0].startswith(f"{HOST}:")
    assert ferroxy_upstream.connections == 0 and ferroxy_upstream.requests == 0
    wait_until(lambda: "refused by the connection filter" in ferroxy_logs.dump())
    assert asked[0] in ferroxy_logs.dump(), "the log names the client"


def test_an_allowed_client_is_proxied_and_the_hook_runs_once_per_connection(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    app, asked = hooked_app(ferroxy_upstream.addr, lambda addr: True)
    proxy = ferroxy_proxy(app)
    with httpx.Client(timeout=10) as client:
        responses = [client.get(f"{proxy.url}/keep/{i}") for i in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    # One keep-alive connection, three requests: one call, with session.client_addr's form.
    assert asked == [responses[0].headers["x-client"]]
    assert ferroxy_upstream.requests == 3


def test_an_async_hook_decides_after_awaiting(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    asked: list[str] = []

    class App(Reporting):
        upstream = ferroxy_upstream.addr
        allow_next = False

        async def connection_filter(self, client_addr: str) -> bool:
            await asyncio.sleep(0.01)
            asked.append(client_addr)
            allowed = self.allow_next
            type(self).allow_next = True
            return allowed

    proxy = ferroxy_proxy(App)
    assert refused(proxy.port, simple_request("GET", "/first"))
    assert get_status(proxy.port) == 200
    assert len(asked) == 2
    assert ferroxy_upstream.requests == 1


def test_connections_wait_for_an_async_hook_concurrently(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    class App(Reporting):
        upstream = ferroxy_upstream.addr

        async def connection_filter(self, client_addr: str) -> bool:
            await asyncio.sleep(0.5)
            return True

    proxy = ferroxy_proxy(App)
    statuses: list[int] = []
    clients = [
        threading.Thread(target=lambda: statuses.append(get_status(proxy.port))) for _ in range(8)
    ]
    started = time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(10)
    # Eight half-second checks one after another would take 4 s.
    assert statuses == [200] * 8 and time.monotonic() - started < 3.0


def test_a_hook_that_raises_refuses_and_the_proxy_keeps_serving(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, ferroxy_logs: Any
) -> None:
    calls = []

    class App(Reporting):
        upstream = ferroxy_upstream.addr

        def connection_filter(self, client_addr: str) -> bool:
            calls.append(client_addr)
            if len(calls) == 1:
                raise RuntimeError("the allow-list service is down")
            if len(calls) == 2:
                return "yes"  # type: ignore[return-value]
            return True

    proxy = ferroxy_proxy(App)
    assert refused(proxy.port, simple_request("GET", "/raises"))
    wait_until(lambda: "the allow-list service is down" in ferroxy_logs.dump())
    raised = [r for r in ferroxy_logs.records if r.exc_info]
    assert raised and "hook connection_filter raised" in raised[0].getMessage()
    # Anything but a bool refuses too (fail closed).
    assert refused(proxy.port, simple_request("GET", "/wrong-type"))
    wait_until(lambda: "returned str" in ferroxy_logs.dump())
    assert get_status(proxy.port) == 200
    assert ferroxy_upstream.requests == 1


def test_a_hook_past_hook_timeout_refuses(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, ferroxy_logs: Any
) -> None:
    class App(Reporting):
        upstream = ferroxy_upstream.addr

        async def connection_filter(self, client_addr: str) -> bool:
            await asyncio.sleep(30)
            return True

    proxy = ferroxy_proxy(App, hook_timeout=0.2)
    assert refused(proxy.port, simple_request("GET", "/slow"))
    wait_until(lambda: "hook_timeout" in ferroxy_logs.dump())
    assert ferroxy_upstream.requests == 0


def test_a_blocking_hook_runs_off_the_loop(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    import ferroxy

    threads: list[str] = []

    class App(Reporting):
        upstream = ferroxy_upstream.addr

        @ferroxy.blocking
        def connection_filter(self, client_addr: str) -> bool:
            threads.append(threading.current_thread().name)
            return True

    proxy = ferroxy_proxy(App)
    assert get_status(proxy.port) == 200
    assert threads and threads[0].startswith("ferroxy-blocking")


@pytest.mark.parametrize(
    ("access", "served"),
    [
        (filters.IPAccess(allow=["10.0.0.0/8"]), False),
        (filters.IPAccess(allow=["10.0.0.0/8", "127.0.0.1"]), True),
        (filters.IPAccess(deny=["127.0.0.0/8"]), False),
        (filters.IPAccess(deny=["10.0.0.0/8", "::1"]), True),
        # deny wins over an allow that also matches
        (filters.IPAccess(allow=["127.0.0.0/8"], deny=["127.0.0.1/32"]), False),
    ],
)
def test_declarative_allow_and_deny(
    access: filters.IPAccess, served: bool, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr
        connection_filter = access

    proxy = ferroxy_proxy(App)
    if served:
        assert get_status(proxy.port) == 200
        assert ferroxy_upstream.requests == 1
    else:
        assert refused(proxy.port, simple_request("GET", "/denied"))
        assert ferroxy_upstream.connections == 0
    # Run in Rust: no Python call, whatever the verdict.
    assert proxy.python_calls == 0


def test_declarative_ipv6(ferroxy_upstream: EchoServer, ferroxy_proxy: Any) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr
        connection_filter = filters.IPAccess(allow=["::1/128"])

    allowed = ferroxy_proxy(App, listen="[::1]:0")
    assert get_status(allowed.port, host="::1") == 200
    refusing = ferroxy_proxy(
        App, listen="[::1]:0", connection_filter=filters.IPAccess(deny=["::1"])
    )
    assert refused(refusing.port, simple_request("GET", "/v6"), host="::1")
    # An IPv4 allow-list refuses an IPv6 client.
    v4_only = ferroxy_proxy(
        App, listen="[::1]:0", connection_filter=filters.IPAccess(allow=["127.0.0.0/8"])
    )
    assert refused(v4_only.port, host="::1")
    assert ferroxy_upstream.requests == 1


def test_bad_cidrs_are_named() -> None:
    with pytest.raises(ValueError, match=r'IPAccess\.allow\[1\]: "10\.0\.0\.300/8" is not a CIDR'):
        filters.IPAccess(allow=["10.0.0.0/8", "10.0.0.300/8"])
    with pytest.raises(ValueError, match=r"IPAccess\.deny\[0\]"):
        filters.IPAccess(deny=["localhost"])
    with pytest.raises(ValueError, match="give allow= or deny="):
        filters.IPAccess()
    with pytest.raises(TypeError, match=r"IPAccess\.allow must be a list of str"):
        filters.IPAccess(allow="10.0.0.0/8")


def test_a_connection_filter_that_is_neither_is_refused(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr
        connection_filter = ("10.0.0.0/8",)  # type: ignore[assignment]

    with pytest.raises(
        TypeError, match=r"App\.connection_filter must be a ferroxy\.filters\.IPAccess"
    ):
        ferroxy_proxy(App)
    with pytest.raises(TypeError, match=r"connection_filter must be a ferroxy\.filters\.IPAccess"):
        ferroxy_proxy(Reporting, upstream=ferroxy_upstream.addr, connection_filter=print)


def test_the_filter_sees_the_proxy_protocol_source(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    app, asked = hooked_app(ferroxy_upstream.addr, lambda addr: not addr.startswith("203.0.113."))
    proxy = ferroxy_proxy(app, proxy_protocol=True)
    dst = (HOST, proxy.port)
    assert refused(proxy.port, v1_header(("203.0.113.7", 51000), dst) + simple_request("GET", "/"))
    assert get_status(proxy.port, v2_header(("198.51.100.20", 40000), dst)) == 200
    assert asked == ["203.0.113.7:51000", "198.51.100.20:40000"]

    class Declared(Proxy):
        upstream = ferroxy_upstream.addr
        connection_filter = filters.IPAccess(allow=["2001:db8::/32"])

    declared = ferroxy_proxy(Declared, proxy_protocol=True)
    v6 = (("2001:db8::5", 443), ("2001:db8::1", 8080))
    assert get_status(declared.port, v2_header(*v6)) == 200
    # The balancer itself (127.0.0.1) is not on the list: its clients are what counts.
    v4 = (("192.0.2.1", 1234), (HOST, declared.port))
    assert refused(declared.port, v1_header(*v4) + simple_request("GET", "/"))
    assert ferroxy_upstream.requests == 2


def write_cert(directory: Path, ca: trustme.CA) -> TlsConfig:
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    return TlsConfig(cert=directory / "cert.pem", key=directory / "key.pem")


def test_refused_before_the_tls_handshake(
    tmp_path: Path, ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    ca = trustme.CA()
    app, asked = hooked_app(ferroxy_upstream.addr, lambda addr: len(asked) > 2)
    app.tls = write_cert(tmp_path, ca)
    proxy = ferroxy_proxy(app)
    # Closed at once, though a TLS listener waits for the client's hello otherwise.
    with raw_connect(proxy.port) as sock:
        closed, data = wait_closed(sock, 2)
    assert closed and data == b""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        socket.create_connection((HOST, proxy.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass
    assert len(asked) == 2
    # Allowed now: served over TLS, three requests on one connection, one call.
    with httpx.Client(verify=context, timeout=10) as client:
        for i in range(3):
            assert client.get(f"https://localhost:{proxy.port}/tls/{i}").status_code == 200
    assert len(asked) == 3
    assert ferroxy_upstream.requests == 3


def test_the_engine_takes_a_hook_or_a_declared_filter_not_both() -> None:
    from ferroxy import _core

    with pytest.raises(ValueError, match="give one or the other"):
        _core.Server(
            object(),  # type: ignore[arg-type]
            hooks=["connection_filter"],
            connection_filter=filters.IPAccess(allow=["::1"]),
        )
