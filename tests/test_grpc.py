"""gRPC through the proxy, end to end: a grpcio server behind it and a grpcio client in front,
over h2c and over TLS on both legs. All four RPC kinds, status and trailing metadata from the
server, deadlines (the client's, which the proxy forwards and enforces), a client that gives up
(cancelled upstream too), and an upstream that cannot be reached (UNAVAILABLE, not a broken
stream).

The service works on raw bytes (no serializers), so no generated code is needed."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from conftest import HOST, free_port
from ferroxy import Peer, Proxy, RequestHeader, Session, TlsConfig

grpc = pytest.importorskip("grpc")

SERVICE = "ferroxy.test.Echo"


class Backend:
    """A grpcio server with one service of each RPC kind, recording what it saw."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        self.cancelled = threading.Event()
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str]] = []
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Shout": grpc.stream_stream_rpc_method_handler(self.shout),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        if tls is None:
            self.port = self.server.add_insecure_port(f"{HOST}:0")
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port(f"{HOST}:0", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)

    def unary(self, request: bytes, context: Any) -> bytes:
        self.metadata.append(dict(context.invocation_metadata()))
        self.deadlines.append(context.time_remaining())
        context.set_trailing_metadata((("x-served-by", "backend"),))
        if request.startswith(b"fail:"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, request[5:].decode())
        return b"echo:" + request

    def collect(self, requests: Iterator[bytes], context: Any) -> bytes:
        return b"|".join(requests)

    def count(self, request: bytes, context: Any) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    def shout(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def sleep(self, request: bytes, context: Any) -> bytes:
        self.deadlines.append(context.time_remaining())
        context.add_callback(self.cancelled.set)
        until = time.monotonic() + float(request)
        while time.monotonic() < until and context.is_active():
            time.sleep(0.01)
        return b"slept"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(name)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


class Through:
    """One way through: the proxy's listener and the upstream leg, each h2c or TLS."""

    def __init__(
        self,
        tls: bool,
        ca: trustme.CA,
        tmp_path: Path,
        ferroxy_proxy: Any,
        hide_deadline: bool = False,
    ) -> None:
        self.tls = tls
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        self.ca_pem = ca_file.read_bytes()
        if tls:
            cert, key = write_cert(ca, tmp_path, "backend.test")
            self.backend = Backend(tls=(cert.read_bytes(), key.read_bytes()))
            peer = Peer(
                f"{HOST}:{self.backend.port}",
                tls=True,
                sni="backend.test",
                ca=str(ca_file),
                alpn="h2",
            )
            front_cert, front_key = write_cert(ca, tmp_path, "proxy.test")
            front: Any = TlsConfig(cert=str(front_cert), key=str(front_key))
        else:
            self.backend = Backend()
            peer = Peer(f"{HOST}:{self.backend.port}", alpn="h2")
            front = None

        class App(Proxy):
            upstream = peer
            tls = front

        class Hiding(App):
            # The upstream is not told the deadline: only the proxy keeps it.
            def upstream_request_filter(
                self, session: Session, upstream_request: RequestHeader, ctx: Any
            ) -> None:
                del upstream_request.headers["grpc-timeout"]

        self.proxy = ferroxy_proxy(Hiding if hide_deadline else App)

    def channel(self, port: int | None = None) -> Any:
        target = f"{HOST}:{port or self.proxy.port}"
        if not self.tls:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        return grpc.secure_channel(
            target, credentials, options=(("grpc.ssl_target_name_override", "proxy.test"),)
        )


@pytest.fixture(params=["h2c", "tls"])
def through(request: Any, ca: trustme.CA, tmp_path: Path, ferroxy_proxy: Any) -> Iterator[Through]:
    way = Through(request.param == "tls", ca, tmp_path, ferroxy_proxy)
    yield way
    way.backend.stop()


def method(channel: Any, kind: str, name: str) -> Any:
    return getattr(channel, kind)(f"/{SERVICE}/{name}")


def test_all_four_kinds(through: Through) -> None:
    with through.channel() as channel:
        unary = method(channel, "unary_unary", "Unary")
        assert unary(b"hi", timeout=10) == b"echo:hi"
        collect = method(channel, "stream_unary", "Collect")
        assert collect(iter([b"a", b"b", b"c"]), timeout=10) == b"a|b|c"
        count = method(channel, "unary_stream", "Count")
        assert list(count(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
        shout = method(channel, "stream_stream", "Shout")
        assert list(shout(iter([b"x", b"yz"]), timeout=10)) == [b"X", b"YZ"]


def test_large_messages_arrive_byte_exact(through: Through) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, a few h2 windows
    with through.channel() as channel:
        unary = method(channel, "unary_unary", "Unary")
        assert unary(payload, timeout=20) == b"echo:" + payload
        shout = method(channel, "stream_stream", "Shout")
        replies = list(shout(iter([payload] * 3), timeout=20))
        assert replies == [payload.upper()] * 3


def test_bidirectional_stream_is_not_buffered(through: Through) -> None:
    """Each reply comes back before the next request is sent: the proxy streams both ways."""
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outgoing.get(timeout=10)) is not None:
            yield item

    with through.channel() as channel:
        shout = method(channel, "stream_stream", "Shout")
        replies = shout(requests(), timeout=20)
        for word in (b"one", b"two", b"three"):
            outgoing.put(word)
            assert next(replies) == word.upper()
        outgoing.put(None)
        assert list(replies) == []


def test_status_message_and_trailing_metadata_pass_through(through: Through) -> None:
    with through.channel() as channel:
        unary = method(channel, "unary_unary", "Unary")
        reply, call = unary.with_call(b"ok", metadata=(("x-client", "c1"),), timeout=10)
        assert reply == b"echo:ok"
        assert call.code() == grpc.StatusCode.OK
        assert ("x-served-by", "backend") in call.trailing_metadata()
        with pytest.raises(grpc.RpcError) as failed:
            unary(b"fail:not today", timeout=10)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.value.details() == "not today"
    assert ("x-served-by", "backend") in failed.value.trailing_metadata()
    assert through.backend.metadata[0]["x-client"] == "c1"


def test_client_deadline_reaches_the_upstream_and_cancels_it(through: Through) -> None:
    with through.channel() as channel:
        sleep = method(channel, "unary_unary", "Sleep")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            sleep(b"10", timeout=0.5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
    # The backend was told the deadline (grpc-timeout forwarded), and was cancelled when it
    # passed rather than left to run its ten seconds.
    remaining = through.backend.deadlines[0]
    # grpc-timeout travels in whole units: a few milliseconds of rounding either way.
    assert remaining is not None and 0 < remaining <= 0.6
    assert through.backend.cancelled.wait(10), "the upstream call was never cancelled"


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_the_proxy_enforces_the_deadline_itself(
    tls: bool, ca: trustme.CA, tmp_path: Path, ferroxy_proxy: Any
) -> None:
    """A client that sends grpc-timeout but does not keep its own timer (a raw h2 client)
    still gets DEADLINE_EXCEEDED once it passes, from the proxy: the upstream here is not
    told the deadline, and would take ten seconds."""
    through = Through(tls, ca, tmp_path, ferroxy_proxy, hide_deadline=True)
    if through.tls:
        client = httpx.Client(http2=True, verify=False, timeout=10)
        url = f"https://{HOST}:{through.proxy.port}/{SERVICE}/Sleep"
    else:
        client = httpx.Client(http1=False, http2=True, timeout=10)
        url = f"http://{HOST}:{through.proxy.port}/{SERVICE}/Sleep"
    body = b"\x00" + (2).to_bytes(4, "big") + b"10"  # one uncompressed message: "10"
    headers = {"content-type": "application/grpc", "te": "trailers", "grpc-timeout": "300m"}
    started = time.monotonic()
    with client:
        response = client.post(url, content=body, headers=headers)
    assert time.monotonic() - started < 3
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/grpc"
    assert response.headers["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert response.headers["grpc-message"] == "deadline exceeded"
    # It was not told (grpcio gives a call without a deadline centuries).
    assert through.backend.deadlines[0] > 60
    assert through.backend.cancelled.wait(10), "the upstream call was never cancelled"
    through.backend.stop()


def test_unreachable_upstream_is_unavailable(ferroxy_proxy: Any, tmp_path: Path) -> None:
    port = free_port()

    class App(Proxy):
        upstream = Peer(f"{HOST}:{port}", alpn="h2")

    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(App, access_log=str(log))
    with grpc.insecure_channel(f"{HOST}:{proxy.port}") as channel:
        unary = method(channel, "unary_unary", "Unary")
        with pytest.raises(grpc.RpcError) as failed:
            unary(b"hi", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # What failed, not where: the upstream's address stays in our log.
    assert failed.value.details() == "Bad Gateway: connect_refused"
    proxy.stop()
    # The access log tells the failure by its HTTP status, not the 200 that carried it.
    line = log.read_text().splitlines()[-1]
    assert f'/{SERVICE}/Unary HTTP/2.0" 502 ' in line, line


def test_tls_in_front_and_h2c_behind(ca: trustme.CA, tmp_path: Path, ferroxy_proxy: Any) -> None:
    """TLS in front, h2c behind: each leg is its own choice."""
    backend = Backend()
    try:
        cert, key = write_cert(ca, tmp_path, "proxy.test")

        class App(Proxy):
            upstream = Peer(f"{HOST}:{backend.port}", alpn="h2")
            tls = TlsConfig(cert=str(cert), key=str(key))

        proxy = ferroxy_proxy(App)
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        options = (("grpc.ssl_target_name_override", "proxy.test"),)
        with grpc.secure_channel(f"{HOST}:{proxy.port}", credentials, options) as channel:
            count = method(channel, "unary_stream", "Count")
            assert list(count(b"3", timeout=10)) == [b"0", b"1", b"2"]
    finally:
        backend.stop()
