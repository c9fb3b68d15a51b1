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

# Connects, says "ready", waits for a line on stdin, then sends each path in turn on one
# keep-alive connection and prints what each took (wall-clock times, comparable with this
# process's).
CLIENT = """
import http.client, json, sys, time
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
conn.connect()
print("ready", flush=True)
sys.stdin.readline()
out = []
for path in sys.argv[3:]:
    start = time.time()
    conn.request("GET", path, headers={"host": "api.test"})
    r = conn.getresponse()
    r.read()
    out.append({"path": path, "status": r.status, "start": start, "end": time.time()})
print(json.dumps(out), flush=True)
"""


@pytest.fixture
def long_switch_interval() -> Iterator[None]:
    """A thread that holds the GIL keeps it for up to 10 s before being asked to let go."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(10)
    yield
    sys.setswitchinterval(before)


def requests_while_gil_held(proxy: ProxyServer, paths: list[str]) -> tuple[list[dict], float]:
    """Run the client's requests while a thread of this process busy-loops holding the GIL
    for HOLD_SECONDS; returns the client's timings and when the hold ended."""
    host, port = proxy.addr.rsplit(":", 1)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, host, port, *paths],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline() == "ready\n"
    held: dict[str, float] = {}

    def hold_the_gil() -> None:
        held["start"] = time.time()
        # The write lets go of the GIL for a moment; this thread takes it back at once.
        client.stdin.write("go\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        deadline = held["start"] + HOLD_SECONDS
        while time.time() < deadline:
            pass
        held["end"] = time.time()

    holder = threading.Thread(target=hold_the_gil)
    holder.start()
    out, _ = client.communicate(timeout=60)
    holder.join()
    assert client.returncode == 0
    return json.loads(out), held["end"]


def test_filter_and_route_requests_complete_while_python_holds_the_gil(
    ferroxy_upstream: EchoServer, long_switch_interval: None
) -> None:
    class App(Proxy):
        filters = (
            f.Respond(f.Path("/healthz"), body=b"ok"),
            f.SetResponseHeader("x-filtered", "1"),
        )
        routes = (Route(host="api.test", path_prefix="/api/", upstream=ferroxy_upstream.addr),)

    with ProxyServer(App, access_log=False) as proxy:
        timings, released = requests_while_gil_held(proxy, ["/healthz", "/api/x"] * 25)
    assert [t["status"] for t in timings] == [200] * 50
    # Every one was answered while the GIL was held, none waiting for it.
    assert max(t["end"] for t in timings) < released
    latencies = [t["end"] - t["start"] for t in timings]
    assert statistics.median(latencies) < 0.05, latencies


def test_control_a_python_hook_waits_for_the_gil(
    ferroxy_upstream: EchoServer, long_switch_interval: None
) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: object) -> Response | None:
            return Response(200, body=b"from python")

    with ProxyServer(App, access_log=False) as proxy:
        timings, released = requests_while_gil_held(proxy, ["/hook"])
    assert timings[0]["status"] == 200
    # It needed the Python thread, which had to wait for the holder to let go.
    assert timings[0]["end"] >= released - 0.01
    assert timings[0]["end"] - timings[0]["start"] > HOLD_SECONDS / 2
