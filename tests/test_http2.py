"""HTTP/2 cleartext with prior knowledge (h2c) on the downstream side."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import expected_pattern, free_port
from ferroxy import Peer, Proxy, Response


def h2_client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, http1=False, http2=True, timeout=20)


def test_h2_prior_knowledge_get(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: list[str] = []

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            seen.append(session.req.version)

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers["x-served-by"] = "ferroxy"

    proxy = ferroxy_proxy(App)
    with h2_client(proxy.url) as c:
        r = c.get("/h2?x=1", headers={"x-client": "h2"})
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200
    assert r.headers["x-served-by"] == "ferroxy"
    echo = r.json()
    assert echo["path"] == "/h2"
    assert echo["query"] == "x=1"
    assert echo["headers"]["x-client"] == "h2"
    assert seen and seen[0].startswith("HTTP/2"), seen


def test_h2_authority_becomes_host_upstream(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    with h2_client(proxy.url) as c:
        echo = c.get("/authority").json()
    assert echo["headers"].get("host") == proxy.addr, (
        "an h2 request's :authority must reach an HTTP/1 upstream as Host"
    )
    assert echo["headers"].get("x-forwarded-host") == proxy.addr
    assert echo["headers"].get("x-forwarded-for") == "127.0.0.1"


def test_h2_multiplexed_concurrent_streams(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)

    async def run() -> tuple[list[int], list[str], float]:
        async with httpx.AsyncClient(base_url=proxy.url, http1=False, http2=True, timeout=20) as c:
            start = time.monotonic()
            rs = await asyncio.gather(*(c.get(f"/delay/400?i={i}") for i in range(10)))
            return (
                [r.status_code for r in rs],
                [r.http_version for r in rs],
                time.monotonic() - start,
            )

    statuses, versions, elapsed = asyncio.run(run())
    assert statuses == [200] * 10
    assert set(versions) == {"HTTP/2"}
    assert elapsed < 2.0, f"10 concurrent 400 ms streams took {elapsed:.2f}s"


def test_h2_request_body(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    body = os.urandom(1_500_000)
    with h2_client(proxy.url) as c:
        r = c.post("/upload", content=body)
        assert r.status_code == 200
        echo = r.json()
        assert echo["body_length"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()

        def gen():
            for i in range(20):
                yield body[i * 1000 : (i + 1) * 1000]

        r = c.post("/upload-stream", content=gen())
        assert r.json()["body_sha256"] == hashlib.sha256(body[:20_000]).hexdigest()


def test_h2_large_download_flow_control(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    n = 5_000_000
    with h2_client(proxy.url) as c:
        r = c.get(f"/bytes/{n}")
    assert r.status_code == 200
    assert len(r.content) == n
    assert r.content == expected_pattern(n)


def test_h2_generated_response_and_errors(ferroxy_upstream, ferroxy_proxy) -> None:
    refused = f"127.0.0.1:{free_port()}"

    class App(Proxy):
        def request_filter(self, session, ctx):
            if session.req.path == "/deny":
                return Response(403, body=b"denied over h2")
            return None

        def upstream_peer(self, session, ctx):
            if session.req.path == "/down":
                return Peer(refused)
            return Peer(ferroxy_upstream.addr)

    proxy = ferroxy_proxy(App)
    with h2_client(proxy.url) as c:
        r = c.get("/deny")
        assert (r.status_code, r.content) == (403, b"denied over h2")
        r = c.get("/down")
        assert r.status_code == 502
        r = c.get("/status/404")
        assert r.status_code == 404
        r = c.get("/fine")
        assert r.status_code == 200


def test_h2_with_curl(ferroxy_upstream, ferroxy_proxy) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            "-",
            "-w",
            "\n%{http_version} %{http_code}",
            proxy.url + "/curl-h2",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode()
    body, _, tail = out.stdout.decode().rpartition("\n")
    assert tail == "2 200", tail
    assert '"/curl-h2"' in body
