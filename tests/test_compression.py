"""Response compression in Rust (``Proxy.compression = Compression(...)``): gzip, brotli and
zstd by the client's Accept-Encoding, byte-exact round trips, what is left alone, the headers
a changed body must carry, and a slow stream that is not held back by the encoder."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import HOST
from ferroxy import Compression, Proxy

brotli = pytest.importorskip("brotli")
zstandard = pytest.importorskip("zstandard")

TEXT = b"".join(b"line %d of a compressible body\n" % i for i in range(200_000))  # ~6 MB


class Origin(BaseHTTPRequestHandler):
    """`/text?size=N&type=T&cc=C&encoding=E&etag=X`, `/stream` (two parts, 1 s apart)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"first part\n" * 100, b"second part\n" * 100):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(1)
            self.wfile.write(b"0\r\n\r\n")
            return
        body = TEXT[: int(query.get("size", len(TEXT)))]
        if "coded" in query:  # really encoded, as an upstream that compresses itself
            body = encode(query["coded"], body)
            query["encoding"] = query["coded"]
        self.send_response(200)
        self.send_header("Content-Type", query.get("type", "text/plain; charset=utf-8"))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", query.get("etag", '"v1"'))
        if "cc" in query:
            self.send_header("Cache-Control", query["cc"])
        if "encoding" in query:
            self.send_header("Content-Encoding", query["encoding"])
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    server = ThreadingHTTPServer((HOST, 0), Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"{HOST}:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def proxy(origin: str, ferroxy_proxy: Any) -> Any:
    class App(Proxy):
        upstream = origin
        compression = Compression()

    return ferroxy_proxy(App)


def fetch(url: str, accept: str, method: str = "GET") -> httpx.Response:
    # httpx would decode what it recognises: ask for the raw bytes by streaming them.
    with httpx.Client(timeout=30) as client:
        request = client.build_request(method, url, headers={"accept-encoding": accept})
        response = client.send(request, stream=True)
        response.read_raw = b"".join(response.iter_raw())  # type: ignore[attr-defined]
        return response


def decode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return bytes(brotli.decompress(data))
    assert encoding == "zstd"
    return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))


def encode(encoding: str, data: bytes) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data, mtime=0)  # the same bytes each time
    if encoding == "br":
        return bytes(brotli.compress(data, quality=5))
    return bytes(zstandard.ZstdCompressor().compress(data))


@pytest.mark.parametrize("upstream_coding", ["gzip", "br", "zstd"])
def test_an_upstreams_coding_the_client_cannot_take_is_decoded(
    proxy: Any, upstream_coding: str
) -> None:
    url = f"{proxy.url}/text?coded={upstream_coding}"
    plain = fetch(url, "identity")
    assert "content-encoding" not in plain.headers
    assert plain.read_raw == TEXT  # type: ignore[attr-defined]
    assert plain.headers["etag"] == 'W/"v1"'
    # Taken as it is by a client that accepts it; encoded again for one that takes another.
    same = fetch(url, upstream_coding)
    assert same.headers["content-encoding"] == upstream_coding
    assert same.read_raw == encode(upstream_coding, TEXT)  # type: ignore[attr-defined]
    other = "gzip" if upstream_coding != "gzip" else "br"
    again = fetch(url, other)
    assert again.headers["content-encoding"] == other
    assert decode(other, again.read_raw) == TEXT  # type: ignore[attr-defined]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_each_encoding_round_trips(proxy: Any, encoding: str) -> None:
    response = fetch(f"{proxy.url}/text", encoding)
    assert response.status_code == 200
    assert response.headers["content-encoding"] == encoding
    raw = response.read_raw  # type: ignore[attr-defined]
    assert len(raw) < len(TEXT) / 5
    assert hashlib.sha256(decode(encoding, raw)).digest() == hashlib.sha256(TEXT).digest()
    # The body changed: no upstream length, a weak validator, and a cache told to key by it.
    assert "content-length" not in response.headers
    assert response.headers["etag"] == 'W/"v1"'
    assert response.headers["vary"] == "Accept-Encoding"


def test_the_clients_preference_then_ours(proxy: Any) -> None:
    cases = {
        "gzip, br": "br",
        "gzip;q=1.0, br;q=0.5, zstd;q=0.1": "gzip",
        "*": "zstd",
        "zstd;q=0, *;q=0.5": "br",
    }
    for accept, expected in cases.items():
        assert fetch(f"{proxy.url}/text", accept).headers["content-encoding"] == expected, accept


def test_what_is_left_alone(proxy: Any) -> None:
    def untouched(path: str, accept: str = "gzip, br, zstd", method: str = "GET") -> httpx.Response:
        response = fetch(f"{proxy.url}{path}", accept, method)
        assert "content-encoding" not in response.headers or path.endswith("encoding=gzip"), path
        return response

    small = untouched("/text?size=100")
    assert small.read_raw == TEXT[:100]  # type: ignore[attr-defined]
    assert small.headers["content-length"] == "100"
    untouched("/text?type=image/png")
    untouched("/text?cc=public,%20no-transform")
    untouched("/text", accept="identity")
    untouched("/text", accept="gzip;q=0")
    head = untouched("/text", method="HEAD")
    assert head.headers["content-length"] == str(len(TEXT))
    # Already encoded by the upstream: passed on as it came, not encoded twice.
    encoded = fetch(f"{proxy.url}/text?size=1000&encoding=gzip", "gzip, br")
    assert encoded.headers["content-encoding"] == "gzip"
    assert encoded.read_raw == TEXT[:1000]  # type: ignore[attr-defined]


def test_http2_clients_get_it_compressed_too(proxy: Any) -> None:
    with httpx.Client(http1=False, http2=True, timeout=30) as client:
        request = client.build_request(
            "GET", f"{proxy.url}/text", headers={"accept-encoding": "br"}
        )
        response = client.send(request, stream=True)
        raw = b"".join(response.iter_raw())
    assert response.http_version == "HTTP/2"
    assert response.headers["content-encoding"] == "br"
    assert decode("br", raw) == TEXT


def test_a_slow_stream_is_not_held_back(proxy: Any) -> None:
    """What the upstream has sent so far reaches the client compressed, before the rest."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        received = b""
        started = time.monotonic()
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert b"content-encoding: gzip" in head.lower() and b"chunked" in head.lower()
        inflater = zlib.decompressobj(wbits=31)
        decoded = b""
        while True:
            # Chunked framing around the gzip stream: take each whole chunk's data.
            while b"\r\n" in rest:
                size_line, _, after = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if len(after) < size + 2:
                    break
                decoded += inflater.decompress(after[:size])
                rest = after[size + 2 :]
            if b"first part\n" * 100 in decoded:
                break
            chunk = sock.recv(65536)
            assert chunk, "closed before the first part"
            rest += chunk
        assert time.monotonic() - started < 0.9, "the first part waited for the second"


def test_bad_config_names_the_field(origin: str, ferroxy_proxy: Any) -> None:
    cases: list[tuple[Compression, type[Exception], str]] = [
        (Compression(encodings=["gzip", "lzma"]), ValueError, "Compression.encodings"),
        (Compression(types=["html"]), ValueError, "Compression.types"),
        (Compression(min_length=-1), ValueError, "Compression.min_length"),
        (Compression(level=42), ValueError, "Compression.level"),
        (Compression(min_length="big"), TypeError, "Compression.min_length"),  # type: ignore[arg-type]
    ]
    for config, error, field in cases:

        class App(Proxy):
            upstream = origin
            compression = config

        with pytest.raises(error, match=field):
            ferroxy_proxy(App)
