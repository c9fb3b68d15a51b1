"""The access log, written by the engine to a file or stdout (never through Python logging),
and the engine's own logs in Python logging."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from conftest import HOST, LogCapture, free_port, raw_connect, simple_request, wait_until
from ferroxy import Peer, Proxy, Response

COMBINED = re.compile(
    r'(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)"'
)
JSON_KEYS = [
    "time",
    "client",
    "method",
    "path",
    "query",
    "protocol",
    "status",
    "bytes",
    "upstream",
    "upstream_time",
    "duration",
    "request_id",
    "user_agent",
    "referer",
    "error",
]


def _fixed_upstream(addr: str) -> type[Proxy]:
    class App(Proxy):
        upstream = addr

    return App


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _combined(line: str) -> dict[str, str]:
    match = COMBINED.fullmatch(line)
    assert match, f"not a combined log line: {line!r}"
    return match.groupdict()


def test_combined_line_per_request(tmp_path: Path, ferroxy_upstream, ferroxy_proxy) -> None:
    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log=str(log))
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        ok = client.get(
            "/bytes/12345?x=1",
            headers={"user-agent": 'tester "1"', "referer": "http://ref.test/page"},
        )
        assert ok.status_code == 200 and len(ok.content) == 12345
        not_found = client.post("/status/404", content=b"z")
        assert not_found.status_code == 404
    before_stop = time.time()
    proxy.stop()  # writes what is left

    lines = _lines(log)
    assert len(lines) == 2, lines
    first, second = (_combined(line) for line in lines)
    assert first == {
        "client": HOST,
        "time": first["time"],
        "request": "GET /bytes/12345?x=1 HTTP/1.1",
        "status": "200",
        "bytes": str(len(ok.content)),
        "referer": "http://ref.test/page",
        # Quotes are escaped as nginx escapes them.
        "user_agent": r"tester \x221\x22",
    }
    logged_at = datetime.strptime(first["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert logged_at.utcoffset() == timezone.utc.utcoffset(None)
    assert abs(logged_at.timestamp() - before_stop) < 60, first["time"]
    assert second["request"] == "POST /status/404 HTTP/1.1"
    assert second["status"] == "404"
    assert second["bytes"] == str(len(not_found.content))
    assert second["referer"] == "-"
    assert second["user_agent"] == f"python-httpx/{httpx.__version__}"


def test_lines_reach_the_file_while_serving(
    tmp_path: Path, ferroxy_upstream, ferroxy_proxy
) -> None:
    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log=str(log))
    paths = [f"/while-serving/{i}" for i in range(5)]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for path in paths:
            assert client.get(path).status_code == 200
    # Written in batches at least every 100 ms, with no stop to flush them.
    assert wait_until(lambda: len(_lines(log)) == len(paths), timeout=3), _lines(log)
    requests = [_combined(line)["request"] for line in _lines(log)]
    assert requests == [f"GET {path} HTTP/1.1" for path in paths]


def test_json_lines(tmp_path: Path, ferroxy_upstream, ferroxy_proxy) -> None:
    down = f"{HOST}:{free_port()}"

    class App(Proxy):
        def request_filter(self, session, ctx):
            if session.req.path == "/generated":
                return Response(403, body=b"no")
            # The log reports the request as the client sent it.
            session.req.path = "/rewritten"
            return None

        def upstream_peer(self, session, ctx):
            return Peer(down if session.req.query == "down" else ferroxy_upstream.addr)

    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(App, access_log=str(log), access_log_format="json")
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        ok = client.get(
            "/ok?q=1", headers={"x-request-id": "req-42", "referer": "http://ref.test/"}
        )
        assert ok.status_code == 200 and ok.json()["path"] == "/rewritten"
        assert client.get("/generated").status_code == 403
        assert client.get("/refused?down").status_code == 502
    proxy.stop()

    records = [json.loads(line) for line in _lines(log)]
    assert [list(record) for record in records] == [JSON_KEYS] * 3
    by_path = {record["path"]: record for record in records}
    ok_record = by_path["/ok"]
    assert abs(ok_record["time"] - time.time()) < 60
    timings = ("time", "upstream_time", "duration")
    assert {k: v for k, v in ok_record.items() if k not in timings} == {
        "client": HOST,
        "method": "GET",
        "path": "/ok",
        "query": "q=1",
        "protocol": "HTTP/1.1",
        "status": 200,
        "bytes": len(ok.content),
        "upstream": ferroxy_upstream.addr,
        "request_id": "req-42",
        "user_agent": f"python-httpx/{httpx.__version__}",
        "referer": "http://ref.test/",
        "error": None,
    }
    assert 0 < ok_record["upstream_time"] <= ok_record["duration"]

    generated = by_path["/generated"]
    assert (generated["status"], generated["bytes"]) == (403, 2)
    assert generated["upstream"] is generated["upstream_time"] is generated["error"] is None
    assert generated["query"] is None and generated["request_id"] is None

    refused = by_path["/refused"]
    assert refused["status"] == 502
    assert refused["upstream"] == down
    assert refused["error"] == "connect_refused"
    assert refused["upstream_time"] is None
    assert refused["duration"] > 0


def test_client_gone_mid_hook_logs_what_it_sent(
    tmp_path: Path, ferroxy_upstream, ferroxy_proxy
) -> None:
    """While a hook runs, the session's request is lent to Python; the line still reports
    the request the client sent, as a 499."""
    entered = threading.Event()

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session, ctx):
            entered.set()
            await asyncio.sleep(5)

    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(App, access_log=str(log), access_log_format="json")
    with raw_connect(proxy.port) as sock:
        sock.sendall(simple_request("PUT", "/gone?x=1", extra="user-agent: leaver\r\n"))
        assert entered.wait(5)
    assert wait_until(lambda: _lines(log), timeout=5), "no line for the request"
    [record] = [json.loads(line) for line in _lines(log)]
    assert (record["method"], record["path"], record["query"]) == ("PUT", "/gone", "x=1")
    assert (record["status"], record["error"], record["user_agent"]) == (
        499,
        "downstream_closed",
        "leaver",
    )


def test_template_format(tmp_path: Path, ferroxy_upstream, ferroxy_proxy) -> None:
    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(
        _fixed_upstream(ferroxy_upstream.addr),
        access_log=log,  # a Path works as well as a str
        access_log_format="{client} {method} {path} {status} {duration} {{{query}}}",
    )
    assert httpx.get(proxy.url + "/tmpl", timeout=10).status_code == 200
    proxy.stop()
    [line] = _lines(log)
    client, method, path, status, duration, query = line.split(" ")
    assert (client, method, path, status, query) == (HOST, "GET", "/tmpl", "200", "{-}")
    assert float(duration) > 0


def test_stdout_by_default_and_off_writes_nothing(
    capfd: pytest.CaptureFixture[str],
    ferroxy_logs: LogCapture,
    ferroxy_upstream,
    ferroxy_proxy,
) -> None:
    app = _fixed_upstream(ferroxy_upstream.addr)
    for off in ("off", False):
        proxy = ferroxy_proxy(app, access_log=off)
        assert httpx.get(proxy.url + f"/quiet-{off}", timeout=10).status_code == 200
        proxy.stop()
    quiet = capfd.readouterr()
    assert "/quiet" not in quiet.out + quiet.err

    proxy = ferroxy_proxy(app)
    assert httpx.get(proxy.url + "/loud", timeout=10).status_code == 200
    proxy.stop()
    out = capfd.readouterr().out
    assert '"GET /loud HTTP/1.1" 200' in out, out
    # The access log never goes through Python logging.
    assert not ferroxy_logs.matching(lambda r: "/loud" in r.getMessage()), ferroxy_logs.dump()


@pytest.mark.parametrize(
    ("access_log_format", "named"),
    [
        ("{client} {nope}", "{nope}"),
        ("{status", "unclosed {"),
        ("status}", "unmatched }"),
        ("combind", "not combined, json"),
    ],
)
def test_bad_format_fails_at_start(
    access_log_format: str, named: str, ferroxy_upstream, ferroxy_proxy
) -> None:
    with pytest.raises(ValueError, match="access_log_format") as raised:
        ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log_format=access_log_format)
    assert named in str(raised.value)


@pytest.mark.parametrize("where", ["missing-dir/access.log", "."])
def test_unopenable_file_fails_at_start(
    tmp_path: Path, where: str, ferroxy_upstream, ferroxy_proxy
) -> None:
    path = tmp_path / where
    with pytest.raises(OSError, match=re.escape(str(path))):
        ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log=str(path))


def test_access_log_must_be_a_path_or_a_bool(ferroxy_upstream, ferroxy_proxy) -> None:
    with pytest.raises(TypeError, match="access_log"):
        ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log=1)


def test_reopen_after_rotation(tmp_path: Path, ferroxy_upstream, ferroxy_proxy) -> None:
    log = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    proxy = ferroxy_proxy(_fixed_upstream(ferroxy_upstream.addr), access_log=str(log))
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/before-rotation").status_code == 200
        assert wait_until(lambda: _lines(log), timeout=3)
        log.rename(rotated)
        proxy.reopen_access_log()
        # Logged after the reopen: goes to a new file at the old path.
        assert client.get("/after-rotation").status_code == 200
    proxy.stop()
    assert [_combined(line)["request"] for line in _lines(rotated)] == [
        "GET /before-rotation HTTP/1.1"
    ]
    assert [_combined(line)["request"] for line in _lines(log)] == ["GET /after-rotation HTTP/1.1"]


def test_engine_warnings_reach_python_logging(ferroxy_proxy) -> None:
    """A refused upstream is logged as a WARNING on the ``ferroxy`` logger, at its level."""
    down = f"{HOST}:{free_port()}"
    logger = logging.getLogger("ferroxy")
    old = logger.level
    logger.setLevel(logging.WARNING)
    handler = LogCapture()
    logger.addHandler(handler)
    try:
        proxy = ferroxy_proxy(_fixed_upstream(down), access_log="off")
        assert httpx.get(proxy.url + "/warned", timeout=10).status_code == 502
        warned = handler.wait_for(lambda r: down in r.getMessage(), timeout=5)
        assert warned, handler.dump()
        assert warned[0].name == "ferroxy" and warned[0].levelno == logging.WARNING
        assert "connect_refused" in warned[0].getMessage()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
