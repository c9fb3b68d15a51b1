"""HTTP/2 floods over real sockets, with frames built by hand.

A client that floods SETTINGS or PING frames is sent a GOAWAY (ENHANCE_YOUR_CALM) and closed
within a second, whether it reads or not; rapid-reset and CONTINUATION floods still end the
connection (the h2 crate's own limits); ordinary clients, PINGs included, are unaffected.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

import httpx
import pytest
from conftest import LogCapture, raw_connect, wait_closed
from ferroxy import Proxy
from hpack import Decoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
ENHANCE_YOUR_CALM = 0xB
CANCEL = 0x8
FLOOD_LIMIT = 100  # flood.rs MAX_CONTROL_FRAMES
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int = 0, stream: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def ping(payload: bytes = b"flooding") -> bytes:
    return frame(PING, payload=payload)


def empty_settings() -> bytes:
    return frame(SETTINGS)


def get_block(path: str, authority: str) -> bytes:
    """An HPACK block for GET http://authority/path: indexed :method GET and :scheme http,
    then :path and :authority as literals (no Huffman) with indexed names."""
    block = b"\x82\x86"
    for index, value in ((4, path), (1, authority)):
        raw = value.encode()
        assert len(raw) < 127
        block += bytes([index, len(raw)]) + raw
    return block


def split_frames(data: bytes) -> tuple[list[tuple[int, int, int, bytes]], bytes]:
    """(type, flags, stream, payload) for each complete frame in ``data``, and the bytes of
    an incomplete one after them."""
    frames = []
    at = 0
    while len(data) - at >= 9:
        length = int.from_bytes(data[at : at + 3], "big")
        kind, flags, stream = struct.unpack_from(">BBI", data, at + 3)
        if len(data) - at < 9 + length:
            break
        frames.append((kind, flags, stream & 0x7FFFFFFF, data[at + 9 : at + 9 + length]))
        at += 9 + length
    return frames, data[at:]


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    return split_frames(data)[0]


def goaways(data: bytes) -> list[tuple[int, int]]:
    """(last_stream_id, error_code) of each GOAWAY in ``data``."""
    return [
        struct.unpack(">II", payload[:8])
        for kind, _, _, payload in parse_frames(data)
        if kind == GOAWAY
    ]


def h2_connect(port: int, settings: bytes = b"") -> socket.socket:
    sock = raw_connect(port)
    sock.sendall(PREFACE + frame(SETTINGS, payload=settings))
    return sock


def read_until(sock: socket.socket, done, timeout: float = 5.0) -> bytes:
    """Read until ``done(data)`` holds; fails the test on a close or the deadline first."""
    deadline = time.monotonic() + timeout
    data = b""
    while not done(data):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up waiting; frames so far: {parse_frames(data)}"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; frames: {parse_frames(data)}"
        data += chunk
    return data


def flood_until_closed(sock: socket.socket, unit: bytes, limit: float) -> float | None:
    """Send ``unit`` over and over, never reading, until the proxy closes the connection;
    returns the seconds that took, or None if it was still open after ``limit``. Partial sends
    are carried on from where they stopped, so the frames stay whole."""
    batch = memoryview(unit * 1000)
    pending = batch
    sock.setblocking(False)
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < limit:
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
            continue
        except (ConnectionResetError, BrokenPipeError):
            return elapsed
        pending = pending[sent:] or batch
    return None


class App(Proxy):
    pass


@pytest.fixture
def proxy(ferroxy_upstream, ferroxy_proxy):
    class Upstream(App):
        upstream = ferroxy_upstream.addr

    return ferroxy_proxy(Upstream)


@pytest.mark.parametrize(
    ("unit", "what"),
    [(ping(), "PING frames"), (empty_settings(), "SETTINGS frames")],
    ids=["ping", "settings"],
)
def test_a_control_frame_flood_that_never_reads_is_closed_within_a_second(
    ferroxy_logs: LogCapture, proxy, unit: bytes, what: str
) -> None:
    sock = h2_connect(proxy.port)
    client = "{}:{}".format(*sock.getsockname())
    try:
        took = flood_until_closed(sock, unit, limit=3.0)
    finally:
        sock.close()
    assert took is not None, f"a client flooding {what} was still connected after 3 s"
    assert took < 1.0, f"closed only after {took:.2f} s"
    warnings = ferroxy_logs.wait_for(
        lambda r: "flooded" in r.getMessage() and client in r.getMessage()
    )
    assert warnings, ferroxy_logs.dump()
    assert len(warnings) == 1, "one warning per connection"
    assert warnings[0].levelname == "WARNING"
    assert what in warnings[0].getMessage()


def test_a_flooding_client_that_reads_finds_a_goaway_enhance_your_calm(proxy) -> None:
    sock = h2_connect(proxy.port)
    with sock:
        # One request first, so the GOAWAY has a stream to name.
        sock.sendall(frame(HEADERS, END_STREAM | END_HEADERS, 1, get_block("/a", proxy.addr)))
        read_until(
            sock,
            lambda data: any(
                kind == DATA and stream == 1 and flags & END_STREAM
                for kind, flags, stream, _ in parse_frames(data)
            ),
        )
        sock.sendall(ping() * 1000)
        closed, data = wait_closed(sock, timeout=1.0)
    assert closed, "a flooding client was still connected after 1 s"
    assert goaways(data) == [(1, ENHANCE_YOUR_CALM)], parse_frames(data)[-3:]


def test_rapid_reset_still_ends_the_connection(proxy) -> None:
    streams = range(1, 2 * 2000, 2)
    burst = b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, s, get_block("/delay/100", proxy.addr))
        + frame(RST_STREAM, stream=s, payload=struct.pack(">I", CANCEL))
        for s in streams
    )
    with h2_connect(proxy.port) as sock:
        sock.sendall(burst)
        closed, data = wait_closed(sock, timeout=5.0)
    assert closed, "a rapid-reset client was still connected after 5 s"
    assert [code for _, code in goaways(data)] == [ENHANCE_YOUR_CALM], parse_frames(data)[-3:]


def test_a_continuation_flood_still_ends_the_connection(proxy) -> None:
    header = b"\x00\x01x\x01y"  # x: y, a literal without indexing
    with h2_connect(proxy.port) as sock:
        sock.sendall(frame(HEADERS, 0, 1, get_block("/", proxy.addr)))
        # Closed while we are still sending is the point.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(frame(CONTINUATION, 0, 1, header) * 20_000)
        closed, data = wait_closed(sock, timeout=5.0)
    assert closed, "a CONTINUATION flood was still connected after 5 s"
    assert [code for _, code in goaways(data)] == [ENHANCE_YOUR_CALM], parse_frames(data)[-3:]


def test_a_client_sending_a_few_pings_and_settings_is_served(proxy) -> None:
    window = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20)
    with h2_connect(proxy.port, settings=window) as sock:
        payloads = [b"ping-%03d" % i for i in range(10)]
        sock.sendall(b"".join(ping(p) for p in payloads) + frame(SETTINGS, payload=window))
        sock.sendall(frame(HEADERS, END_STREAM | END_HEADERS, 1, get_block("/x", proxy.addr)))

        def answered(data: bytes) -> bool:
            return any(k == DATA and f & END_STREAM for k, f, _, _ in parse_frames(data))

        data = read_until(sock, answered)
        frames = parse_frames(data)
        acks = [payload for kind, flags, _, payload in frames if kind == PING and flags & ACK]
        assert acks == payloads, "every PING is answered"
        (block,) = [payload for kind, _, stream, payload in frames if kind == HEADERS]
        assert dict(Decoder().decode(block))[":status"] == "200"
        assert not goaways(data)
        # Still open: a second request on the same connection is answered.
        sock.sendall(frame(HEADERS, END_STREAM | END_HEADERS, 3, get_block("/y", proxy.addr)))
        read_until(
            sock,
            lambda more: any(
                k == DATA and s == 3 and f & END_STREAM for k, f, s, _ in parse_frames(more)
            ),
        )


def test_pings_sent_as_our_data_arrives_are_no_flood(proxy) -> None:
    """A BDP estimator (hyper's, grpc's) keeps one PING outstanding while DATA arrives: many
    more PINGs than the flood limit, but each answered among the DATA we write."""
    window = 16_384  # one DATA frame a round trip, so the download takes many
    size = 4_000_000
    settings = struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, window)
    with h2_connect(proxy.port, settings=settings) as sock:
        sock.sendall(
            frame(HEADERS, END_STREAM | END_HEADERS, 1, get_block(f"/bytes/{size}", proxy.addr))
        )
        rest = b""
        body = pings = 0
        outstanding = False
        start = time.monotonic()
        while body < size:
            assert time.monotonic() - start < 20, "the download stalled"
            sock.settimeout(5)
            chunk = sock.recv(65536)
            assert chunk, f"closed after {body} bytes and {pings} PINGs"
            frames, rest = split_frames(rest + chunk)
            assert GOAWAY not in {kind for kind, *_ in frames}, f"after {pings} PINGs"
            if any(kind == PING and flags & ACK for kind, flags, *_ in frames):
                outstanding = False
            got = sum(len(payload) for kind, _, _, payload in frames if kind == DATA)
            if got:
                body += got
                credit = struct.pack(">I", got)
                reply = frame(WINDOW_UPDATE, 0, 0, credit) + frame(WINDOW_UPDATE, 0, 1, credit)
                if not outstanding:
                    reply += ping()
                    pings += 1
                    outstanding = True
                sock.sendall(reply)
    assert pings > 2 * FLOOD_LIMIT, f"only {pings} PINGs: the test must exceed the flood limit"


def test_an_h2c_client_is_unaffected(proxy) -> None:
    with httpx.Client(base_url=proxy.url, http1=False, http2=True, timeout=10) as client:
        responses = [client.get(f"/n/{i}") for i in range(50)]
    assert {r.status_code for r in responses} == {200}
    assert {r.http_version for r in responses} == {"HTTP/2"}


def test_shutdown_sends_goaway_and_closes_an_idle_h2_connection(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    """An idle HTTP/2 client that does not answer hyper's shutdown PING does not hold the
    server for its grace period."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, grace_period=5.0)
    sock = h2_connect(proxy.port)
    with sock:
        # The server's SETTINGS: the connection is up, and nothing more is sent.
        read_until(sock, lambda data: any(k == SETTINGS for k, *_ in parse_frames(data)))
        started = time.monotonic()
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()
        closed, data = wait_closed(sock, timeout=4)
        took = time.monotonic() - started
        stopper.join(10)
    assert closed, "the idle HTTP/2 connection was kept through shutdown"
    assert took < 2.0, f"closed {took:.1f}s after shutdown began"
    assert [code for _, code in goaways(data)][:1] == [0], goaways(data)


def test_an_idle_h2_connection_closes_after_the_keepalive_timeout(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    """A client that opens an HTTP/2 connection and then sends nothing cannot hold it (and
    its memory) forever: it gets a GOAWAY once the keep-alive timeout has passed."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, keepalive_timeout=0.5)
    sock = h2_connect(proxy.port)
    with sock:
        read_until(sock, lambda data: any(k == SETTINGS for k, *_ in parse_frames(data)))
        started = time.monotonic()
        closed, data = wait_closed(sock, timeout=5)
        took = time.monotonic() - started
    assert closed, "the idle HTTP/2 connection was kept open"
    assert 0.3 < took < 3.0, f"closed {took:.1f}s after it went idle"
    assert [code for _, code in goaways(data)][:1] == [0], goaways(data)
