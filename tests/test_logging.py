"""Engine logs in Python logging: the access log under ``ferroxy.access``."""

from __future__ import annotations

import logging
import re
import time

import httpx
from conftest import HOST, LogCapture, free_port
from ferroxy import Peer, Proxy, Response

DURATION = re.compile(
    r"\d+(?:\.\d+)?\s*(?:ns|us|µs|ms|s)\b|(?:duration|took|elapsed|time)\s*[=:]?\s*\d", re.I
)


def _for_path(path: str):
    return lambda rec: rec.name == "ferroxy.access" and path in rec.getMessage()


def test_access_log_line_fields(ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        r = c.get("/bytes/12345")
        assert r.status_code == 200 and len(r.content) == 12345
        r = c.post("/status/404", content=b"z")
        assert r.status_code == 404

    ok = ferroxy_logs.wait_for(_for_path("/bytes/12345"))
    assert len(ok) == 1, f"expected one access record for /bytes/12345\n{ferroxy_logs.dump()}"
    msg = ok[0].getMessage()
    assert ok[0].levelno == logging.INFO
    assert HOST in msg, f"client address missing: {msg}"
    assert "GET" in msg
    assert re.search(r"\b200\b", msg), f"status missing: {msg}"
    assert "12345" in msg.replace("/bytes/12345", ""), f"bytes sent missing: {msg}"
    assert ferroxy_upstream.addr in msg, f"upstream address missing: {msg}"
    assert DURATION.search(msg.replace(ferroxy_upstream.addr, "")), f"duration missing: {msg}"

    nf = ferroxy_logs.wait_for(_for_path("/status/404"))
    assert len(nf) == 1, ferroxy_logs.dump()
    msg = nf[0].getMessage()
    assert "POST" in msg and re.search(r"\b404\b", msg), msg


def test_one_access_record_per_request(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    paths = [f"/one-per-request/{i}" for i in range(5)]
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for p in paths:
            assert c.get(p).status_code == 200
    ferroxy_logs.wait_for(lambda rec: rec.name == "ferroxy.access", count=5)
    time.sleep(0.3)  # catch duplicates arriving late
    access = ferroxy_logs.access()
    for p in paths:
        n = sum(1 for rec in access if p in rec.getMessage())
        assert n == 1, f"{n} access records for {p}\n{ferroxy_logs.dump()}"
    assert len(access) == 5


def test_access_log_for_generated_and_error_responses(
    ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy
) -> None:
    down = f"127.0.0.1:{free_port()}"

    class App(Proxy):
        def request_filter(self, session, ctx):
            if session.req.path == "/generated":
                return Response(403, body=b"no")
            return None

        def upstream_peer(self, session, ctx):
            return Peer(down)

    proxy = ferroxy_proxy(App)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        assert c.get("/generated").status_code == 403
        assert c.get("/refused").status_code == 502
    gen = ferroxy_logs.wait_for(_for_path("/generated"))
    ref = ferroxy_logs.wait_for(_for_path("/refused"))
    assert len(gen) == 1 and re.search(r"\b403\b", gen[0].getMessage()), ferroxy_logs.dump()
    assert len(ref) == 1 and re.search(r"\b502\b", ref[0].getMessage()), ferroxy_logs.dump()


def test_access_log_disabled(ferroxy_logs: LogCapture, ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as c:
        for _ in range(3):
            assert c.get("/quiet").status_code == 200
    time.sleep(1.0)
    assert ferroxy_logs.access() == [], ferroxy_logs.dump()


def test_access_log_not_forwarded_below_logger_level(ferroxy_upstream, ferroxy_proxy) -> None:
    """With the ``ferroxy`` logger at WARNING, INFO access lines are not delivered."""
    logger = logging.getLogger("ferroxy")
    old = logger.level
    logger.setLevel(logging.WARNING)
    handler = LogCapture()
    logger.addHandler(handler)
    try:

        class App(Proxy):
            upstream = ferroxy_upstream.addr

        proxy = ferroxy_proxy(App)
        assert httpx.get(proxy.url + "/warn-level", timeout=10).status_code == 200
        time.sleep(0.8)
        assert [r for r in handler.records if r.levelno < logging.WARNING] == []
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
