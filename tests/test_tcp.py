"""The TCP (L4) proxy, ``ferroxy.TcpProxy``, over real sockets: 1,000 concurrent echo
connections byte-exact, TLS terminated at the proxy, load balancing with a dead backend and
health checks, the ``upstream_peer(client_addr)`` and ``connection_filter`` hooks, the idle
timeout, bad configuration, and HTTP and TCP services in one ``ferroxy.Server``."""

from __future__ import annotations

import asyncio
import random
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import HOST, LogCapture, wait_until
from ferroxy import HealthCheck, LoadBalancer, Peer, Proxy, Server, TcpProxy, TlsConfig, blocking
from ferroxy.filters import IPAccess
from ferroxy.testing import EchoServer, TcpEchoServer, start_tcp_upstream


@pytest.fixture
def echoes() -> Iterator[list[TcpEchoServer]]:
    """Two TCP echo upstreams."""
    servers = [start_tcp_upstream(), start_tcp_upstream()]
    yield servers
    for server in servers:
        server.stop()


def tcp_app(upstream: object = None, **attrs: Any) -> type[TcpProxy]:
    return type("Tcp", (TcpProxy,), {"upstream": upstream, **attrs})


def split(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def round_trip(addr: str, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send ``payload`` through a new connection to ``addr``; what comes back (b"" when the
    proxy closed it unanswered or refused it)."""
    try:
        conn = socket.create_connection(split(addr), timeout=timeout)
    except ConnectionRefusedError:
        return b""
    with conn:
        return exchange(conn, payload)


def exchange(conn: socket.socket, payload: bytes) -> bytes:
    sender = threading.Thread(target=conn.sendall, args=(payload,), daemon=True)
    try:
        sender.start()
    except OSError:
        return b""
    received = bytearray()
    while len(received) < len(payload):
        try:
            chunk = conn.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        received += chunk
    sender.join(timeout=5)
    return bytes(received)


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return f"{HOST}:{sock.getsockname()[1]}"


def serve(*apps: Any, **options: Any) -> Server:
    server = Server(**options)
    for app in apps:
        if isinstance(app, tuple):
            server.add(app[0], **app[1])
        else:
            server.add(app)
    return server.start()


def test_a_thousand_concurrent_echo_connections_arrive_byte_exact(
    echoes: list[TcpEchoServer],
) -> None:
    # Each connection costs four descriptors in this process: client, proxy's two, echo's.
    connections = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * connections + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        with serve(tcp_app(echoes[0].addr)) as server:
            host, port = split(server.addrs[0][0])

            async def one(i: int) -> None:
                # Sizes from 1 byte to ~200 KiB, each connection its own bytes.
                payload = random.Random(i).randbytes(1 + (i * 7919) % 200_000)
                reader, writer = await asyncio.open_connection(host, port)
                try:

                    async def send() -> None:
                        writer.write(payload)
                        await writer.drain()
                        writer.write_eof()

                    sending = asyncio.ensure_future(send())
                    echoed = await reader.read(-1)
                    await sending
                finally:
                    writer.close()
                assert len(echoed) == len(payload), f"connection {i}"
                assert echoed == payload, f"connection {i}: bytes differ"

            async def all_of_them() -> None:
                await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(connections))), 120)

            asyncio.run(all_of_them())
        assert echoes[0].connections == connections
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_tls_is_terminated_and_plain_tcp_goes_behind(
    tmp_path: Path, echoes: list[TcpEchoServer]
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("tcp.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = TlsConfig(cert=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem"))
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    # A client offering HTTP's protocols is agreed none: the proxy cannot speak for what is
    # behind it.
    context.set_alpn_protocols(["h2", "http/1.1"])
    with serve(tcp_app(echoes[0].addr, tls=tls)) as server:
        (service,) = server.services
        assert service.url.startswith("tls://")
        payload = random.Random(7).randbytes(300_000)
        with (
            socket.create_connection(split(service.addr), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="tcp.example.test") as conn,
        ):
            assert conn.version() is not None
            assert conn.selected_alpn_protocol() is None
            # The echo upstream got the plaintext: what it sent back is the payload itself.
            received = bytearray()
            conn.sendall(payload[:100_000])
            while len(received) < 100_000:
                received += conn.recv(65536)
            conn.sendall(payload[100_000:])
            while len(received) < len(payload):
                received += conn.recv(65536)
            assert bytes(received) == payload
        # A client that does not speak TLS gets nothing echoed.
        plain = b"plain text\r\n" * 100
        assert round_trip(service.addr, plain, timeout=5) != plain


def test_a_fixed_upstream_runs_no_python_per_connection(echoes: list[TcpEchoServer]) -> None:
    with serve(tcp_app(echoes[0].addr)) as server:
        for _ in range(20):
            assert round_trip(server.addrs[0][0], b"rust only") == b"rust only"
        assert server.services[0].python_calls == 0


def test_a_dead_backend_is_passed_over(echoes: list[TcpEchoServer]) -> None:
    pool = LoadBalancer([closed_port(), echoes[0].addr], strategy="round_robin")
    with serve(tcp_app(pool)) as server:
        for i in range(6):
            assert round_trip(server.addrs[0][0], bytes([i]) * 1000) == bytes([i]) * 1000
    assert echoes[0].connections == 6


def test_a_health_check_marks_a_backend_down_and_connections_avoid_it(
    echoes: list[TcpEchoServer],
) -> None:
    pool = LoadBalancer(
        [echo.addr for echo in echoes],
        strategy="round_robin",
        health_check=HealthCheck.tcp(interval=0.05, timeout=0.5, healthy=1, unhealthy=1),
    )
    with serve(tcp_app(pool)) as server:
        addr = server.addrs[0][0]
        for _ in range(4):
            assert round_trip(addr, b"both") == b"both"
        assert echoes[0].connections >= 2 and echoes[1].connections >= 2
        down = echoes[1]
        down.stop()
        assert wait_until(
            lambda: not {b["addr"]: b["healthy"] for b in pool.backends()}[down.addr], timeout=5
        ), pool.backends()
        before = echoes[0].connections
        for _ in range(6):
            assert round_trip(addr, b"one left") == b"one left"
        assert echoes[0].connections == before + 6


@pytest.mark.parametrize("kind", ["def", "async", "blocking"])
def test_upstream_peer_chooses_per_connection(kind: str, echoes: list[TcpEchoServer]) -> None:
    seen: list[str] = []

    def choose(client_addr: str) -> Peer | str:
        seen.append(client_addr)
        # Alternate, by how many connections came so far; one as a str, one as a Peer.
        return echoes[0].addr if len(seen) % 2 else Peer(echoes[1].addr)

    class Tcp(TcpProxy):
        if kind == "def":

            def upstream_peer(self, client_addr: str) -> Peer | str:
                return choose(client_addr)
        elif kind == "async":

            async def upstream_peer(self, client_addr: str) -> Peer | str:
                await asyncio.sleep(0.001)
                return choose(client_addr)
        else:

            @blocking
            def upstream_peer(self, client_addr: str) -> Peer | str:
                time.sleep(0.001)
                return choose(client_addr)

    with serve(Tcp) as server:
        for i in range(6):
            assert round_trip(server.addrs[0][0], b"x" * (i + 1)) == b"x" * (i + 1)
    assert echoes[0].connections == 3 and echoes[1].connections == 3
    assert len(seen) == 6 and all(addr.startswith(f"{HOST}:") for addr in seen)


def test_a_failing_upstream_peer_closes_only_that_connection(
    echoes: list[TcpEchoServer], ferroxy_logs: LogCapture
) -> None:
    calls = 0

    class Tcp(TcpProxy):
        def upstream_peer(self, client_addr: str) -> str:
            nonlocal calls
            calls += 1
            if calls % 2 == 0:
                raise RuntimeError(f"no upstream for connection {calls}")
            return echoes[0].addr

    with serve(Tcp) as server:
        addr = server.addrs[0][0]
        # One held open across the failures: it is not disturbed.
        with socket.create_connection(split(addr), timeout=10) as held:
            assert exchange(held, b"first") == b"first"
            assert round_trip(addr, b"second") == b""
            assert round_trip(addr, b"third") == b"third"
            assert exchange(held, b"still here") == b"still here"
        failed = ferroxy_logs.wait_for(lambda r: "Tcp.upstream_peer" in r.getMessage())
        assert failed, ferroxy_logs.dump()
        assert "no upstream for connection 2" in LogCapture.text(failed[0])
        assert "Traceback" in LogCapture.text(failed[0])


def test_a_pool_select_pick_counts_in_flight_while_its_connection_lasts(
    echoes: list[TcpEchoServer],
) -> None:
    pool = LoadBalancer([echo.addr for echo in echoes], strategy="least_connections")

    class Tcp(TcpProxy):
        def upstream_peer(self, client_addr: str) -> Peer:
            return pool.select()

    def in_flight() -> list[int]:
        return sorted(backend["in_flight"] for backend in pool.backends())

    with serve(Tcp) as server:
        addr = server.addrs[0][0]
        with socket.create_connection(split(addr), timeout=10) as first:
            assert exchange(first, b"one") == b"one"
            assert in_flight() == [0, 1]
            # Least connections sends the next one to the other backend.
            with socket.create_connection(split(addr), timeout=10) as second:
                assert exchange(second, b"two") == b"two"
                assert in_flight() == [1, 1]
            assert wait_until(lambda: in_flight() == [0, 1]), in_flight()
        assert wait_until(lambda: in_flight() == [0, 0]), in_flight()
    assert echoes[0].connections == 1 and echoes[1].connections == 1


def test_the_proxy_protocol_gives_the_hooks_the_real_client(echoes: list[TcpEchoServer]) -> None:
    seen: list[str] = []

    class Tcp(TcpProxy):
        proxy_protocol = True

        def upstream_peer(self, client_addr: str) -> str:
            seen.append(client_addr)
            return echoes[0].addr

    with serve(Tcp) as server, socket.create_connection(split(server.addrs[0][0])) as conn:
        conn.settimeout(10)
        conn.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n")
        # The header is the proxy's: the upstream sees only what follows.
        assert exchange(conn, b"after the header") == b"after the header"
    assert seen == ["203.0.113.7:5555"]


def test_an_upstream_peer_past_hook_timeout_closes_its_connection(
    echoes: list[TcpEchoServer], ferroxy_logs: LogCapture
) -> None:
    class Tcp(TcpProxy):
        async def upstream_peer(self, client_addr: str) -> str:
            if slow:
                await asyncio.sleep(30)
            return echoes[0].addr

    slow = True
    with serve((Tcp, {"hook_timeout": 0.2})) as server:
        started = time.monotonic()
        assert round_trip(server.addrs[0][0], b"late") == b""
        assert time.monotonic() - started < 5
        slow = False
        assert round_trip(server.addrs[0][0], b"on time") == b"on time"
    assert ferroxy_logs.matching(lambda r: "hook_timeout" in r.getMessage()), ferroxy_logs.dump()


def test_connection_filter_refuses(echoes: list[TcpEchoServer]) -> None:
    asked: list[str] = []

    class Tcp(TcpProxy):
        upstream = echoes[0].addr

        async def connection_filter(self, client_addr: str) -> bool:
            asked.append(client_addr)
            return len(asked) != 2

    with serve(Tcp) as server:
        addr = server.addrs[0][0]
        assert [round_trip(addr, b"hi") for _ in range(3)] == [b"hi", b"", b"hi"]
    assert len(asked) == 3
    assert echoes[0].connections == 2

    denied = tcp_app(echoes[1].addr, connection_filter=IPAccess(deny=["127.0.0.0/8"]))
    with serve(denied) as server:
        assert round_trip(server.addrs[0][0], b"hi") == b""
    assert echoes[1].connections == 0


def test_the_idle_timeout_closes_a_silent_connection(echoes: list[TcpEchoServer]) -> None:
    server = serve(tcp_app(echoes[0].addr, idle_timeout=0.3))
    with server, socket.create_connection(split(server.addrs[0][0]), timeout=10) as conn:
        # Traffic keeps it open past the timeout...
        for _ in range(4):
            assert exchange(conn, b"ping") == b"ping"
            time.sleep(0.15)
        # ...silence closes it.
        started = time.monotonic()
        assert conn.recv(10) == b""
        assert time.monotonic() - started < 5


def test_an_upstream_peer_that_never_answers_is_bounded_by_the_idle_timeout(
    echoes: list[TcpEchoServer],
) -> None:
    """Without hook_timeout, a hook that never returns closes its connection after the idle
    timeout (nothing moves while it runs) rather than holding it for ever."""

    async def upstream_peer(self: TcpProxy, client_addr: str) -> str:
        await asyncio.sleep(3600)
        return echoes[0].addr

    server = serve(tcp_app(upstream_peer=upstream_peer, idle_timeout=0.5))
    with server, socket.create_connection(split(server.addrs[0][0]), timeout=10) as conn:
        started = time.monotonic()
        assert conn.recv(10) == b""
        assert 0.4 < time.monotonic() - started < 5


def test_bad_configuration_names_the_field(echoes: list[TcpEchoServer]) -> None:
    with pytest.raises(TypeError, match=r"Tcp\.upstream"):
        serve(tcp_app(42))
    with pytest.raises(TypeError, match="must set `upstream` or override upstream_peer"):
        serve(tcp_app(None))
    with pytest.raises(ValueError, match=r"Tcp\.idle_timeout"):
        serve(tcp_app(echoes[0].addr, idle_timeout=-1))
    with pytest.raises(ValueError, match=r"Tcp\.connect_tries"):
        serve(tcp_app(echoes[0].addr, connect_tries=0))
    with pytest.raises(ValueError, match=r"Tcp\.connect_tries must be an int from 1 to 100"):
        serve(tcp_app(echoes[0].addr, connect_tries=101))
    with pytest.raises(TypeError, match="sets `upstream` and overrides upstream_peer"):
        serve(tcp_app(echoes[0].addr, upstream_peer=lambda self, client_addr: "x:1"))
    with pytest.raises(TypeError, match=r"Tcp\.connection_filter"):
        serve(tcp_app(echoes[0].addr, connection_filter="127.0.0.1"))
    with pytest.raises(TypeError, match="Proxy or TcpProxy"):
        Server([object])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="unknown options bogus"):
        Server(bogus=1)
    # A service that cannot start leaves none running, and the Server may try again.
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen()
    taken = f"{HOST}:{busy.getsockname()[1]}"
    server = Server().add(tcp_app(echoes[0].addr)).add(tcp_app(echoes[0].addr), listen=taken)
    with pytest.raises(OSError, match=taken):
        server.start()
    busy.close()
    with server:
        assert round_trip(server.addrs[1][0], b"again") == b"again"


def test_http_and_tcp_services_in_one_server(
    echoes: list[TcpEchoServer], ferroxy_upstream: EchoServer
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session: Any, upstream_response: Any, ctx: Any) -> None:
            upstream_response.headers["x-service"] = "http"

    class Tcp(TcpProxy):
        def upstream_peer(self, client_addr: str) -> str:
            return echoes[0].addr

    threads: set[int] = set()
    original = Tcp.upstream_peer

    def recording(self: Tcp, client_addr: str) -> str:
        threads.add(threading.get_ident())
        return original(self, client_addr)

    Tcp.upstream_peer = recording  # type: ignore[method-assign]

    server = Server([App], access_log=False)
    server.add(Tcp, listen=f"{HOST}:0")
    with server:
        (http,), (tcp,) = server.urls
        assert http.startswith("http://") and tcp.startswith("tcp://")
        r = httpx.get(http + "/both", timeout=10)
        assert r.status_code == 200 and r.headers["x-service"] == "http"
        assert round_trip(server.addrs[1][0], b"tcp too") == b"tcp too"
    assert len(threads) == 1


def test_graceful_shutdown_lets_an_open_connection_finish(echoes: list[TcpEchoServer]) -> None:
    server = serve(tcp_app(echoes[0].addr))
    addr = server.addrs[0][0]
    with socket.create_connection(split(addr), timeout=10) as conn:
        assert exchange(conn, b"before") == b"before"
        stopping = threading.Thread(target=server.stop, args=(10.0,))
        started = time.monotonic()
        stopping.start()
        # New connections are refused once the listener closes...
        assert wait_until(lambda: round_trip(addr, b"new", timeout=2) == b"", timeout=5)
        # ...while the open one still works within the grace period.
        assert exchange(conn, b"during") == b"during"
    # It ends as soon as the last connection does, not at the end of the grace period.
    stopping.join(timeout=15)
    assert not stopping.is_alive()
    assert time.monotonic() - started < 8
