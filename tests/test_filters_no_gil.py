"""Filters and routes never need Python (issue 9): while another Python thread holds the GIL
for seconds, requests that only filters answer or only routes send on complete at normal
latency. The client is a separate process (a client in this one would need the GIL too);
the proxy is served from this process, where the GIL is held. The control: a Python hook
waits for the GIL, so the same client sees its request finish only once the holder lets go.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from ferroxy import Proxy, ProxyServer, Response, Route, Session
from ferroxy import filters as f
from ferroxy.testing import EchoServer

#: How long the busy thread holds the GIL.
HOLD_SECONDS = 3.0

#: How far ahead of now the client is told to start: time for the holder to be holding by then.
LEAD_SECONDS = 0.5

# Connects, says "ready", reads an absolute start time (this process's clock) on stdin, waits
# for it, then sends each path in turn: on the keep-alive connection opened first, or on a
# new one for a path written "new:/path" (the accept path too); prints what each took, and
# the body.
CLIENT = """
import http.client, json, sys, time
host, port = sys.argv[1], int(sys.argv[2])
kept = http.client.HTTPConnection(host, port, timeout=30)
kept.connect()
print("ready", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
out = []
for path in sys.argv[3:]:
    start = time.time()
    conn = kept
    if path.startswith("new:"):
        path = path[len("new:"):]
        conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path, headers={"host": "api.test"})
    r = conn.getresponse()
    body = r.read()
    out.append({"path": path, "status": r.status, "start": start, "end": time.time(),
                "body": body.decode("latin-1")})
    if conn is not kept:
        conn.close()
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    """A thread that holds the GIL keeps it for up to 10 s before being asked to let go."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(10)
    yield
    sys.setswitchinterval(before)


def requests_while_gil_held(proxy: ProxyServer, paths: list[str]) -> tuple[list[dict], dict]:
    """Run the client's requests while a thread of this process busy-loops holding the GIL
    for HOLD_SECONDS; returns the client's timings and when the hold began and ended. The
    client starts at a time set beforehand, by which the holder is already looping: no
    syscall of the holder's (which would let go of the GIL) comes between."""
    host, port = proxy.addr.rsplit(":", 1)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, host, port, *paths],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline() == "ready\n"
    start_at = time.time() + LEAD_SECONDS
    client.stdin.write(f"{start_at!r}\n")
    client.stdin.flush()
    held: dict[str, float] = {}

    def hold_the_gil() -> None:
        held["start"] = time.time()
        # time.time() reads the clock without a syscall: the loop never lets go of the GIL.
        deadline = start_at + HOLD_SECONDS
        while time.time() < deadline:
            pass
        held["end"] = time.time()

    holder = threading.Thread(target=hold_the_gil)
    holder.start()
    out, _ = client.communicate(timeout=60)
    holder.join()
    assert client.returncode == 0
    timings = json.loads(out)
    # Each request was sent while the GIL was held.
    assert held["start"] < start_at <= min(t["start"] for t in timings)
    return timings, held


def test_filter_and_route_requests_complete_while_python_holds_the_gil(
    ferroxy_upstream: EchoServer, long_switch_interval: None
) -> None:
    class App(Proxy):
        filters = (
            f.Respond(f.Path("/healthz"), body=b"ok"),
            f.SetResponseHeader("x-filtered", "1"),
        )
        routes = (Route(host="api.test", path_prefix="/api/", upstream=ferroxy_upstream.addr),)

    # On the keep-alive connection, then on new ones accepted during the hold.
    paths = ["/healthz", "/api/x"] * 25 + ["new:/healthz", "new:/api/x"]
    with ProxyServer(App, access_log=False) as proxy:
        timings, held = requests_while_gil_held(proxy, paths)
    assert [t["status"] for t in timings] == [200] * 52
    # Every one was answered while the GIL was held, none waiting for it.
    assert max(t["end"] for t in timings) < held["end"]
    latencies = [t["end"] - t["start"] for t in timings]
    assert statistics.median(latencies) < 0.05, latencies


def test_control_a_python_hook_waits_for_the_gil(
    ferroxy_upstream: EchoServer, long_switch_interval: None
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: object) -> Response | None:
            return Response(200, body=repr(time.time()).encode())

    with ProxyServer(App, access_log=False) as proxy:
        timings, held = requests_while_gil_held(proxy, ["/hook"])
    assert timings[0]["status"] == 200
    # The hook needed the Python thread, which had to wait for the holder to let go.
    assert float(timings[0]["body"]) >= held["end"]
    assert timings[0]["end"] - timings[0]["start"] > HOLD_SECONDS / 2
