"""What the engine's seams show users: connection facts, several listeners and inherited
sockets, errors that say whose fault, and hooks batched into as few trips as possible."""

from __future__ import annotations

import socket
import threading
from typing import Any

import httpx
import pytest
from conftest import HOST, raw_connect, wait_until
from ferroxy import Proxy, ProxyError, RequestHeader, ResponseHeader, Session


def test_connection_facts_in_hooks(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: list[dict[str, Any]] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: Any) -> None:
            seen.append({"before": session.server_conn})

        def response_filter(
            self, session: Session, upstream_response: ResponseHeader, ctx: Any
        ) -> None:
            client, server = session.client_conn, session.server_conn
            assert server is not None
            seen[-1].update(
                client=client.client_addr,
                local=client.local_addr,
                scheme=client.scheme,
                protocol_in=client.protocol,
                certs=client.client_certificates,
                tls=client.tls,
                sni=client.sni,
                peer=server.peer_addr,
                protocol=server.protocol,
                reused=server.reused,
            )

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(2):
            assert c.get("/facts").status_code == 200
    first, second = seen
    assert first["before"] is None, "server_conn exists only once the request went upstream"
    assert first["local"] == proxy.addr
    assert first["client"].startswith(f"{HOST}:") and first["client"] == second["client"]
    assert (first["scheme"], first["tls"], first["sni"]) == ("http", False, None)
    assert (first["protocol_in"], first["certs"]) == ("HTTP/1.1", [])
    assert first["peer"] == ferroxy_upstream.addr and first["protocol"] == "HTTP/1.1"
    assert (first["reused"], second["reused"]) == (False, True)


def test_several_listeners(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, listen=[f"{HOST}:0", f"{HOST}:0"])
    assert len(proxy.addrs) == 2 and proxy.addrs[0] != proxy.addrs[1]
    assert proxy.addr == proxy.addrs[0]
    for addr in proxy.addrs:
        r = httpx.get(f"http://{addr}/on/{addr}", timeout=10)
        assert r.status_code == 200 and r.json()["path"] == f"/on/{addr}"


def test_inherited_listening_socket(ferroxy_upstream, ferroxy_proxy) -> None:
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(128)
    addr = "{}:{}".format(*sock.getsockname())
    # The proxy owns the descriptor from here on, as after a hand-over between processes.
    fd = sock.detach()

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, listen=f"fd:{fd}")
    assert proxy.addr == addr
    assert httpx.get(f"http://{addr}/inherited", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("listen", "message"),
    [("fd:nope", "listen: invalid descriptor"), ([], "at least one"), (42, "listen must be")],
)
def test_bad_listen_values_name_the_field(ferroxy_proxy, listen: object, message: str) -> None:
    class App(Proxy):
        upstream = "127.0.0.1:9"

    with pytest.raises((ValueError, TypeError), match=message):
        ferroxy_proxy(App, listen=listen)


def test_client_reset_mid_upload_is_the_clients_fault(ferroxy_upstream, ferroxy_proxy) -> None:
    errors: list[ProxyError | None] = []
    logged = threading.Event()

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
            errors.append(error)
            logged.set()

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    sock.sendall(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n" + b"a" * 1000
    )
    assert wait_until(lambda: ferroxy_upstream.requests >= 1, timeout=5)
    # RST instead of FIN: the client is gone mid-body.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert logged.wait(10), "the logging hook did not run"
    (error,) = errors
    assert error is not None
    assert (error.side, error.kind) == ("client", "downstream_closed"), error


def test_upstream_failures_are_the_upstreams_fault(ferroxy_proxy) -> None:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        dead = f"{HOST}:{probe.getsockname()[1]}"
    errors: list[ProxyError] = []

    class App(Proxy):
        upstream = dead

        def fail_to_proxy(self, session: Session, error: ProxyError, ctx: Any) -> None:
            errors.append(error)

    proxy = ferroxy_proxy(App)
    assert httpx.get(proxy.url + "/", timeout=10).status_code == 502
    assert [(e.side, e.kind) for e in errors] == [("upstream", "connect_refused")]


@pytest.mark.parametrize(
    ("hooks", "trips"),
    [
        # Consecutive Python hooks share one trip: a fixed upstream between them is no step.
        (("request_filter", "upstream_request_filter"), 1),
        (("request_filter", "upstream_peer", "upstream_request_filter"), 1),
        (("upstream_peer", "upstream_request_filter"), 1),
        (("upstream_request_filter",), 1),
        (("request_filter", "upstream_request_filter", "response_filter"), 2),
    ],
)
def test_request_hooks_batch_into_one_trip(
    ferroxy_upstream, ferroxy_proxy, hooks: tuple[str, ...], trips: int
) -> None:
    ran: list[str] = []

    def request_filter(self: Proxy, session: Session, ctx: Any) -> None:
        ran.append("request_filter")
        session.req.headers["x-rf"] = "1"

    def upstream_peer(self: Proxy, session: Session, ctx: Any) -> str:
        ran.append("upstream_peer")
        return ferroxy_upstream.addr

    def upstream_request_filter(
        self: Proxy, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        ran.append("upstream_request_filter")
        upstream_request.headers["x-urf"] = upstream_request.headers.get("x-rf", "none")

    def response_filter(
        self: Proxy, session: Session, upstream_response: ResponseHeader, ctx: Any
    ) -> None:
        ran.append("response_filter")

    available = {
        "request_filter": request_filter,
        "upstream_peer": upstream_peer,
        "upstream_request_filter": upstream_request_filter,
        "response_filter": response_filter,
    }
    namespace: dict[str, Any] = {name: available[name] for name in hooks}
    namespace["upstream"] = ferroxy_upstream.addr
    App = type("App", (Proxy,), namespace)

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/batched", timeout=10)
    assert r.status_code == 200
    assert ran == list(hooks), "every overridden hook runs once, in phase order"
    if "upstream_request_filter" in hooks:
        expected = "1" if "request_filter" in hooks else "none"
        assert r.json()["headers"]["x-urf"] == expected, "the head is built after request_filter"
    assert proxy.python_calls == trips
