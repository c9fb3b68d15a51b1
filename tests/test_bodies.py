"""1 GiB through the proxy in each direction, byte-exact, with bounded proxy memory.

The proxy runs as a subprocess (``python -m ferroxy``) so its RSS can be read from
/proc/PID/status. The client streams in chunks and never holds the body in memory.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest
from conftest import fixed_upstream_app, pattern_block, run_cli

GIB = 1 << 30
MAX_GROWTH = 64 << 20
TIME_LIMIT = 60.0


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def _hwm_bytes(pid: int) -> int:
    return _status_kib(pid, "VmHWM") * 1024


def _warm_up(url: str) -> None:
    with httpx.Client(timeout=10) as c:
        for _ in range(3):
            assert c.post(url + "/warm", content=b"x" * 300_000).status_code == 200
            assert c.get(url + "/bytes/300000").status_code == 200


@pytest.fixture
def proxy_process(tmp_path: Path, ferroxy_upstream):
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with run_cli(spec, "--no-access-log", log_dir=tmp_path) as cli:
        _warm_up(cli.url)
        yield cli


@pytest.mark.slow
def test_upload_1gib_streamed_byte_exact(proxy_process, ferroxy_upstream) -> None:
    cli = proxy_process
    rss_before = _rss_bytes(cli.pid)
    base = bytearray(pattern_block(1 << 20))
    # make the stream position-dependent so a dropped or repeated chunk changes the hash
    digest = hashlib.sha256()
    chunk_size = len(base)
    total = GIB

    def body():
        sent = 0
        i = 0
        while sent < total:
            n = min(chunk_size, total - sent)
            base[0:8] = i.to_bytes(8, "little")
            chunk = bytes(base[:n])
            digest.update(chunk)
            yield chunk
            sent += n
            i += 1

    start = time.monotonic()
    with httpx.Client(timeout=httpx.Timeout(120.0)) as c:
        r = c.post(
            cli.url + "/upload",
            content=body(),
            headers={"content-length": str(total), "content-type": "application/octet-stream"},
        )
    elapsed = time.monotonic() - start
    assert r.status_code == 200, r.text[:500]
    echo = r.json()
    assert echo["body_length"] == total
    assert echo["body_sha256"] == digest.hexdigest(), "uploaded bytes differ from what was sent"
    growth = _hwm_bytes(cli.pid) - rss_before
    assert growth < MAX_GROWTH, (
        f"proxy memory grew by {growth / 2**20:.1f} MiB during a 1 GiB upload (buffering?)"
    )
    assert elapsed < TIME_LIMIT, f"1 GiB upload took {elapsed:.1f}s"


@pytest.mark.slow
def test_download_1gib_streamed_byte_exact(proxy_process) -> None:
    cli = proxy_process
    rss_before = _rss_bytes(cli.pid)
    start = time.monotonic()
    got = hashlib.sha256()
    received = 0
    with (
        httpx.Client(timeout=httpx.Timeout(120.0)) as c,
        c.stream("GET", cli.url + f"/bytes/{GIB}") as r,
    ):
        assert r.status_code == 200
        for chunk in r.iter_raw():
            got.update(chunk)
            received += len(chunk)
    elapsed = time.monotonic() - start

    expected = hashlib.sha256()
    block = pattern_block(1 << 20)
    full, rest = divmod(GIB, len(block))
    for _ in range(full):
        expected.update(block)
    expected.update(block[:rest])

    assert received == GIB
    assert got.hexdigest() == expected.hexdigest(), "downloaded bytes differ from /bytes pattern"
    growth = _hwm_bytes(cli.pid) - rss_before
    assert growth < MAX_GROWTH, (
        f"proxy memory grew by {growth / 2**20:.1f} MiB during a 1 GiB download (buffering?)"
    )
    assert elapsed < TIME_LIMIT, f"1 GiB download took {elapsed:.1f}s"
