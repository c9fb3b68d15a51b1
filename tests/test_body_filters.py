"""Body hooks: ``request_body_filter`` and ``response_body_filter`` see each chunk on its way
and may replace it. Filters that uppercase, grow and shrink 100 MB bodies over HTTP/1.1 and
HTTP/2, byte-exact, with the proxy's memory bounded and the framing right; the end of the
stream, errors, HEAD, ETags and back-pressure.

The big transfers run the proxy as a subprocess (``python -m ferroxy``) so its RSS can be read
from /proc. Each filter changes bytes one by one (``upper``, doubling every NUL, deleting
every 0x01), so the expected result does not depend on where chunks split, and adds
``<end>`` when told the stream has ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HOST, pattern_block, run_cli, wait_until, write_app
from ferroxy import Peer, Proxy, Session

MB = 1_000_000
BIG = 100 * MB
# The proxy may hold some buffers, never a body's worth.
MAX_GROWTH = 64 << 20

APP = """
from typing import Any
from ferroxy import Proxy, Session


def transform(mode: str | None, chunk: bytes) -> bytes | None:
    if mode == "upper":
        return chunk.upper()
    if mode == "grow":
        return chunk.replace(b"\\x00", b"\\x00\\x00")
    if mode == "shrink":
        return chunk.replace(b"\\x01", b"")
    return None


def filtered(mode: str | None, chunk: bytes, end_of_stream: bool) -> bytes | None:
    out = transform(mode, chunk)
    if end_of_stream and mode:
        out = (chunk if out is None else out) + b"<end>"
    return out


class App(Proxy[dict[str, Any]]):
    upstream = {upstream!r}

    def new_ctx(self) -> dict[str, Any]:
        return {{}}

    def request_filter(self, session: Session, ctx: dict[str, Any]) -> None:
        ctx["request"] = session.req.headers.get("x-request-filter")
        ctx["response"] = session.req.headers.get("x-response-filter")
        return None

    def request_body_filter(
        self, session: Session, chunk: bytes, end_of_stream: bool, ctx: dict[str, Any]
    ) -> bytes | None:
        return filtered(ctx["request"], chunk, end_of_stream)

    async def response_body_filter(
        self, session: Session, chunk: bytes, end_of_stream: bool, ctx: dict[str, Any]
    ) -> bytes | None:
        return filtered(ctx["response"], chunk, end_of_stream)
"""


def transform(mode: str, chunk: bytes) -> bytes:
    if mode == "upper":
        return chunk.upper()
    if mode == "grow":
        return chunk.replace(b"\x00", b"\x00\x00")
    return chunk.replace(b"\x01", b"")


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def pattern_chunks(total: int) -> Iterator[bytes]:
    """``total`` bytes of the echo upstream's /bytes pattern, a MiB at a time."""
    block = pattern_block(1 << 20)
    sent = 0
    while sent < total:
        chunk = block[: min(len(block), total - sent)]
        sent += len(chunk)
        yield chunk


def expected_digest(mode: str, total: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    for chunk in pattern_chunks(total):
        out = transform(mode, chunk)
        digest.update(out)
        length += len(out)
    digest.update(b"<end>")
    return digest.hexdigest(), length + 5


@pytest.fixture(scope="module")
def filter_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from ferroxy.testing import start_upstream

    directory = tmp_path_factory.mktemp("body-filters")
    with start_upstream() as upstream:
        spec = write_app(directory, APP.format(upstream=upstream.addr))
        with run_cli(spec, "--no-access-log", log_dir=directory) as cli:
            with httpx.Client(timeout=10) as c:
                for _ in range(3):
                    c.post(cli.url + "/warm", content=b"x" * 300_000)
                    c.get(cli.url + "/bytes/300000")
            yield cli


@pytest.mark.parametrize("mode", ["upper", "grow", "shrink"])
def test_100mb_upload_filtered_over_http1(filter_proxy: Any, mode: str) -> None:
    before = rss_bytes(filter_proxy.pid)
    with httpx.Client(timeout=120) as c:
        r = c.post(
            filter_proxy.url + "/upload",
            content=pattern_chunks(BIG),
            headers={"x-request-filter": mode, "content-length": str(BIG)},
        )
    assert r.status_code == 200, r.text[:300]
    echo = r.json()
    digest, length = expected_digest(mode, BIG)
    assert echo["body_length"] == length
    assert echo["body_sha256"] == digest
    # The length changed on the way: the upstream got it chunked, not the client's length.
    headers = {name: value for name, value in echo["header_list"]}
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"
    growth = rss_bytes(filter_proxy.pid, "VmHWM") - before
    assert growth < MAX_GROWTH, f"the proxy grew by {growth >> 20} MiB filtering 100 MB"


@pytest.mark.parametrize("mode", ["upper", "grow", "shrink"])
def test_100mb_download_filtered_over_http1(filter_proxy: Any, mode: str) -> None:
    before = rss_bytes(filter_proxy.pid)
    got = hashlib.sha256()
    received = 0
    with (
        httpx.Client(timeout=120) as c,
        c.stream(
            "GET", f"{filter_proxy.url}/bytes/{BIG}", headers={"x-response-filter": mode}
        ) as r,
    ):
        assert r.status_code == 200
        assert "content-length" not in r.headers
        assert r.headers["transfer-encoding"] == "chunked"
        for chunk in r.iter_raw():
            got.update(chunk)
            received += len(chunk)
    digest, length = expected_digest(mode, BIG)
    assert received == length
    assert got.hexdigest() == digest
    growth = rss_bytes(filter_proxy.pid, "VmHWM") - before
    assert growth < MAX_GROWTH, f"the proxy grew by {growth >> 20} MiB filtering 100 MB"


@pytest.mark.parametrize("mode", ["upper", "grow", "shrink"])
def test_100mb_each_way_filtered_over_http2(filter_proxy: Any, mode: str, tmp_path: Path) -> None:
    """curl over h2c (prior knowledge): the upload filtered on its way up, the download on
    its way down, both without a length."""
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for chunk in pattern_chunks(BIG):
            f.write(chunk)
    before = rss_bytes(filter_proxy.pid)
    posted = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--data-binary", f"@{upload}",
         "-H", f"x-request-filter: {mode}", "-H", "content-type: application/octet-stream",
         f"{filter_proxy.url}/upload"],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    import json

    echo = json.loads(posted.stdout)
    digest, length = expected_digest(mode, BIG)
    assert (echo["body_length"], echo["body_sha256"]) == (length, digest)
    downloaded = tmp_path / "download.bin"
    got = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", str(downloaded),
         "-H", f"x-response-filter: {mode}", f"{filter_proxy.url}/bytes/{BIG}"],
        capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    head = got.stdout.decode().lower()
    assert head.startswith("http/2 200")
    assert "content-length" not in head
    digest_down = hashlib.sha256()
    with downloaded.open("rb") as f:
        while block := f.read(1 << 20):
            digest_down.update(block)
    assert downloaded.stat().st_size == length
    assert digest_down.hexdigest() == digest
    growth = rss_bytes(filter_proxy.pid, "VmHWM") - before
    assert growth < MAX_GROWTH, f"the proxy grew by {growth >> 20} MiB filtering 100 MB"


# -- in-process: the hook's contract ------------------------------------------------------


def test_chunks_keep_drop_and_the_end_is_told(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    calls: list[tuple[int, bool]] = []
    logged: list[str] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            calls.append((len(chunk), end_of_stream))
            if end_of_stream:
                # The request is there to read.
                return chunk + f"\n-- filtered {session.req.path}".encode()
            return None

        def logging(self, session: Session, error: Any, ctx: Any) -> None:
            logged.append(session.req.path)

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/bytes/100000")
    assert r.status_code == 200
    assert r.content.endswith(b"\n-- filtered /bytes/100000")
    assert len(r.content) == 100_000 + len(b"\n-- filtered /bytes/100000")
    wait_until(lambda: logged == ["/bytes/100000"])
    # Every chunk came in order, the end once, last.
    assert sum(n for n, _ in calls) == 100_000
    assert [end for _, end in calls].count(True) == 1 and calls[-1][1]
    # HEAD has no body: the filter is not called, and the length stays.
    calls.clear()
    head = httpx.head(proxy.url + "/bytes/100000")
    assert head.headers["content-length"] == "100000"
    assert calls == []
    # A request without a body never reaches request_body_filter (none is overridden here),
    # and an empty response body is still told its end.
    empty = httpx.get(proxy.url + "/bytes/0")
    assert empty.content == b"\n-- filtered /bytes/0"


def test_a_bodyless_request_skips_the_request_body_filter(
    ferroxy_upstream: Any, ferroxy_proxy: Any
) -> None:
    calls: list[bytes] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            calls.append(chunk)
            return b"" if chunk == b"drop me" else None

    proxy = ferroxy_proxy(App)
    assert httpx.get(proxy.url + "/").json()["body_length"] == 0
    assert calls == []
    # b"" sends nothing for the chunk.
    assert httpx.post(proxy.url + "/", content=b"drop me").json()["body_length"] == 0
    assert httpx.post(proxy.url + "/", content=b"keep me").json()["body_length"] == 7


def test_an_h2_upstream_gets_the_filtered_body(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return Peer(ferroxy_upstream.addr, alpn="h2")

        def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            return chunk.replace(b"a", b"aa")

    proxy = ferroxy_proxy(App)
    echo = httpx.post(proxy.url + "/", content=b"abc" * 10_000).json()
    assert echo["version"] == "HTTP/2.0"
    assert echo["body_length"] == 40_000
    assert echo["body_sha256"] == hashlib.sha256(b"aabc" * 10_000).hexdigest()


def test_etag_is_weakened_when_a_filter_runs(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session: Session, upstream_response: Any, ctx: Any) -> None:
            upstream_response.headers["etag"] = '"v1"'

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            return chunk.upper()

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/bytes/300")
    assert r.headers["etag"] == 'W/"v1"'
    assert r.content == transform("upper", pattern_block()[:300])


def test_failing_body_hooks_fail_that_request_only(
    ferroxy_upstream: Any, ferroxy_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            if b"boom" in chunk:
                raise ValueError("request boom")
            if b"wrong" in chunk:
                return 42  # type: ignore[return-value]
            return None

        def new_ctx(self) -> dict[str, int]:
            return {"length": 0}

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            ctx["length"] += len(chunk)
            if end_of_stream and ctx["length"] == 200_000:
                raise ValueError("response boom")
            return None

    proxy = ferroxy_proxy(App)
    assert httpx.post(proxy.url + "/", content=b"boom").status_code == 500
    assert "request boom" in caplog.text
    assert httpx.post(proxy.url + "/", content=b"wrong").status_code == 500
    # The response had begun: the client sees it cut off, not a clean end.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(proxy.url + "/bytes/200000")
    # The proxy goes on serving.
    assert httpx.post(proxy.url + "/", content=b"fine").status_code == 200
    proxy.stop()
    assert "request_body_filter returned int" in caplog.text
    assert "response boom" in caplog.text


def test_a_slow_client_slows_the_upstream_read(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    """Back-pressure: while the client reads nothing, the filter is not fed the rest of a
    100 MB body; only buffers' worth has passed it."""
    seen = [0]

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            seen[0] += len(chunk)
            return None

    proxy = ferroxy_proxy(App)
    import socket

    with socket.create_connection((HOST, proxy.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /bytes/{BIG} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)
        stalled = seen[0]
        assert 0 < stalled < 32 * MB, f"{stalled} bytes passed the filter of a stalled client"
        # Reading again lets the rest through.
        received = 0
        sock.settimeout(10)
        while received < 8 * MB:
            received += len(sock.recv(1 << 20))
    assert seen[0] > stalled


def test_ctx_is_shared_with_the_phases(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    """One session object and one ctx per request, in phases and body hooks alike, even
    while the request body streams up as the response comes down."""

    class App(Proxy[dict[str, int]]):
        upstream = ferroxy_upstream.addr

        def new_ctx(self) -> dict[str, int]:
            return {"request_chunks": 0, "response_chunks": 0}

        async def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: dict[str, int]
        ) -> bytes | None:
            await asyncio.sleep(0)
            ctx["request_chunks"] += 1
            return None

        def response_filter(self, session: Session, upstream_response: Any, ctx: Any) -> None:
            upstream_response.headers["x-request-chunks"] = str(ctx["request_chunks"])

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: dict[str, int]
        ) -> bytes | None:
            ctx["response_chunks"] += 1
            if end_of_stream:
                return chunk + f"|{ctx['request_chunks']}".encode()
            return None

    proxy = ferroxy_proxy(App)
    r = httpx.post(proxy.url + "/", content=b"x" * 1000)
    assert int(r.headers["x-request-chunks"]) >= 1
    assert r.text.endswith("|" + r.headers["x-request-chunks"])


def test_concurrent_filtered_requests_stay_apart(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    class App(Proxy[dict[str, bytes]]):
        upstream = ferroxy_upstream.addr

        def new_ctx(self) -> dict[str, bytes]:
            return {}

        def request_filter(self, session: Session, ctx: dict[str, bytes]) -> None:
            ctx["tag"] = session.req.headers["x-tag"].encode()

        async def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: dict[str, bytes]
        ) -> bytes | None:
            await asyncio.sleep(0.001)
            return ctx["tag"] if end_of_stream else b""

    proxy = ferroxy_proxy(App)
    results: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        r = httpx.get(proxy.url + "/bytes/50000", headers={"x-tag": f"tag-{i}"}, timeout=20)
        results[i] = r.content

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: f"tag-{i}".encode() for i in range(20)}


# -- session.read_request_body ----------------------------------------------------------


def test_read_request_body_chooses_the_upstream_by_the_body(
    ferroxy_upstream: Any, ferroxy_proxy: Any
) -> None:
    """pingora#575: the body, read whole in request_filter, picks the upstream (here: a
    backend named in the JSON body), and is then sent upstream byte-exact."""
    import json

    from ferroxy import Response
    from ferroxy.testing import start_upstream

    with start_upstream() as other:
        backends = {"a": ferroxy_upstream.addr, "b": other.addr}

        class App(Proxy[dict[str, str]]):
            def new_ctx(self) -> dict[str, str]:
                return {}

            async def request_filter(
                self, session: Session, ctx: dict[str, str]
            ) -> Response | None:
                if session.req.method != "POST":
                    return None
                body = await session.read_request_body(limit=10_000)
                # Read again: the same bytes.
                assert await session.read_request_body(limit=10_000) == body
                ctx["backend"] = json.loads(body)["backend"]
                return None

            def upstream_peer(self, session: Session, ctx: dict[str, str]) -> Peer:
                return Peer(backends[ctx.get("backend", "a")])

        proxy = ferroxy_proxy(App)
        for name, upstream in (("a", ferroxy_upstream), ("b", other)):
            body = json.dumps({"backend": name, "pad": "x" * 5000}).encode()
            before = upstream.requests
            # Chunked (no length) as well as with a length.
            for content in (body, iter([body[:100], body[100:]])):
                echo = httpx.post(proxy.url + "/", content=content).json()
                assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
                assert echo["body_length"] == len(body)
            assert upstream.requests == before + 2


def test_read_request_body_over_its_limit_is_a_413(
    ferroxy_upstream: Any, ferroxy_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from ferroxy import RequestBodyError, Response

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session: Session, ctx: Any) -> Response | None:
            if session.req.path == "/caught":
                try:
                    await session.read_request_body(limit=100)
                except RequestBodyError as error:
                    return Response(422, body=f"too big: {error.status}".encode())
                return None
            await session.read_request_body(limit=100)
            return None

    proxy = ferroxy_proxy(App)
    before = ferroxy_upstream.requests
    # Known length over the limit, and a chunked one that crosses it.
    assert httpx.post(proxy.url + "/", content=b"x" * 101).status_code == 413
    assert httpx.post(proxy.url + "/", content=iter([b"x" * 60, b"x" * 60])).status_code == 413
    caught = httpx.post(proxy.url + "/caught", content=b"x" * 500)
    assert (caught.status_code, caught.text) == (422, "too big: 413")
    assert ferroxy_upstream.requests == before
    # Within the limit it goes through; a client's too-large body leaves no traceback.
    assert httpx.post(proxy.url + "/", content=b"x" * 100).json()["body_length"] == 100
    assert "Traceback" not in caplog.text


def test_read_request_body_outside_a_request_hook_raises(
    ferroxy_upstream: Any, ferroxy_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def response_filter(self, session: Session, upstream_response: Any, ctx: Any) -> None:
            await session.read_request_body()

    proxy = ferroxy_proxy(App)
    assert httpx.post(proxy.url + "/", content=b"abc").status_code == 500
    assert "read_request_body() is awaited in request_filter" in caplog.text


def test_a_read_body_is_filtered_on_its_way_up(ferroxy_upstream: Any, ferroxy_proxy: Any) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session: Session, ctx: Any) -> None:
            assert await session.read_request_body() == b"hello"

        def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            return chunk.upper()

    proxy = ferroxy_proxy(App)
    echo = httpx.post(proxy.url + "/", content=b"hello").json()
    assert echo["body_sha256"] == hashlib.sha256(b"HELLO").hexdigest()


def _stalled_upload(port: int, path: str) -> bytes:
    """A request whose body never comes in full: 10 bytes of 1,000, then silence; returns
    the status line the proxy answers with."""
    import socket

    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
            + b"0123456789"
        )
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_a_hook_that_stops_waiting_for_the_body_still_answers(
    ferroxy_upstream: Any, ferroxy_proxy: Any
) -> None:
    """hook_timeout while a hook awaits the body: a 504; the hook's own timeout: its own
    answer. Either way the proxy serves the next request."""
    from ferroxy import Response

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session: Session, ctx: Any) -> Response | None:
            if session.req.path == "/patient":
                try:
                    await asyncio.wait_for(session.read_request_body(), 0.3)
                except TimeoutError:
                    return Response(408, body=b"your body is late\n")
            else:
                await session.read_request_body()
            return None

    proxy = ferroxy_proxy(App, hook_timeout=0.6)
    assert _stalled_upload(proxy.port, "/patient") == b"HTTP/1.1 408 Request Timeout"
    assert _stalled_upload(proxy.port, "/impatient") == b"HTTP/1.1 504 Gateway Timeout"
    assert httpx.post(proxy.url + "/", content=b"on time").json()["body_length"] == 7


def test_read_request_body_in_upstream_peer_and_again_on_a_retry(
    ferroxy_upstream: Any, ferroxy_proxy: Any
) -> None:
    """An app without request_filter reads the body in upstream_peer; the retry's
    upstream_peer reads it again (the same bytes), and request_body_filter filters what each
    try sends, from the client's bytes."""
    from conftest import free_port

    dead = f"{HOST}:{free_port()}"
    bodies: list[bytes] = []

    class App(Proxy):
        async def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            bodies.append(await session.read_request_body(limit=1000))
            return Peer(dead if len(bodies) == 1 else ferroxy_upstream.addr)

        def fail_to_connect(self, session: Session, peer: Any, error: Any, ctx: Any) -> bool | None:
            return True

        def request_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            return chunk.upper()

    proxy = ferroxy_proxy(App)
    echo = httpx.post(proxy.url + "/", content=b"twice read").json()
    assert bodies == [b"twice read", b"twice read"]
    assert echo["body_sha256"] == hashlib.sha256(b"TWICE READ").hexdigest()
    assert echo["body_length"] == len(b"TWICE READ")


def test_bodyless_and_partial_responses_are_not_filtered(
    ferroxy_upstream: Any, ferroxy_proxy: Any
) -> None:
    calls: list[int] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session: Session, upstream_response: Any, ctx: Any) -> None:
            if session.req.path == "/bytes/50":
                # As a range answer would be: its Content-Range says which bytes these are.
                upstream_response.status = 206
                upstream_response.headers["content-range"] = "bytes 0-49/100"

        def response_body_filter(
            self, session: Session, chunk: bytes, end_of_stream: bool, ctx: Any
        ) -> bytes | None:
            calls.append(len(chunk))
            return b"changed"

    proxy = ferroxy_proxy(App)
    assert httpx.get(proxy.url + "/status/204").status_code == 204
    assert httpx.get(proxy.url + "/status/304").status_code == 304
    partial = httpx.get(proxy.url + "/bytes/50")
    assert partial.status_code == 206
    assert partial.content == pattern_block()[:50]
    assert partial.headers["content-length"] == "50"
    assert calls == []
    assert httpx.get(proxy.url + "/bytes/10").content == b"changed"
