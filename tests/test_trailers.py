"""Trailers cross the proxy both ways, whichever HTTP version each side speaks: an HTTP/1.1
client's chunked trailers and an HTTP/2 client's trailing HEADERS reach an HTTP/1.1 or HTTP/2
upstream, and the upstream's trailers reach the client. HTTP/1.1 carries trailers only when
asked (`TE: trailers`) and only those its head declares (`Trailer:`), as the clients here do."""

from __future__ import annotations

import hashlib
import json
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import HOST, raw_connect
from ferroxy import Peer, Proxy

BODY = b"trailing body " * 100
SHA = hashlib.sha256(BODY).hexdigest()


def h1_exchange(port: int) -> tuple[dict[str, Any], dict[str, str]]:
    """POST /trailers chunked with a trailer; the echo and the response's trailers."""
    sock = raw_connect(port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(
            b"POST /trailers HTTP/1.1\r\nHost: t\r\nTE: trailers\r\n"
            b"Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
            + b"%x\r\n" % len(BODY)
            + BODY
            + b"\r\n0\r\nx-checksum: sum-1\r\n\r\n"
        )
        status = rfile.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        headers = {}
        while (line := rfile.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while size := int(rfile.readline().split(b";")[0], 16):
            body += rfile.read(size)
            assert rfile.read(2) == b"\r\n"
        trailers = {}
        while (line := rfile.readline()) != b"\r\n":
            name, _, value = line.decode().partition(":")
            trailers[name.strip().lower()] = value.strip()
    return json.loads(body), trailers


def h2_exchange(port: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The same over h2c: body, then a trailing HEADERS frame."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock = socket.create_connection((HOST, port), timeout=5)
    with sock:
        sock.sendall(conn.data_to_send())
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "t"),
                (":path", "/trailers"),
                ("te", "trailers"),
                # Declared, so an HTTP/1.1 upstream is sent it too.
                ("trailer", "x-checksum"),
            ],
        )
        conn.send_data(stream, BODY)
        conn.send_headers(stream, [("x-checksum", "sum-1")], end_stream=True)
        sock.sendall(conn.data_to_send())
        body = b""
        trailers: dict[str, str] = {}
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, "connection closed mid-response"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    assert dict(event.headers)[b":status"] == b"200"
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    pytest.fail(f"stream reset: {event.error_code}")
            sock.sendall(conn.data_to_send())
    return json.loads(body), trailers


@pytest.mark.parametrize("upstream_version", ["h1", "h2"])
@pytest.mark.parametrize("client_version", ["h1", "h2"])
def test_trailers_cross_both_ways(
    client_version: str, upstream_version: str, ferroxy_upstream, ferroxy_proxy
) -> None:
    peer = Peer(ferroxy_upstream.addr, alpn="h2" if upstream_version == "h2" else "h1")

    class App(Proxy):
        upstream = peer

    proxy = ferroxy_proxy(App)
    exchange = h1_exchange if client_version == "h1" else h2_exchange
    echo, trailers = exchange(proxy.port)
    assert echo["version"] == ("HTTP/2.0" if upstream_version == "h2" else "HTTP/1.1")
    assert echo["body_sha256"] == SHA
    assert echo["trailers"] == {"x-checksum": "sum-1"}
    assert echo["headers"]["te"] == "trailers"
    assert trailers == {"x-checksum": "sum-1", "x-body-sha256": SHA}
