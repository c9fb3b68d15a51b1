"""Graceful shutdown: SIGTERM / SIGINT on the CLI, and stop() on an in-process proxy."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import HOST, fixed_upstream_app, port_accepts, run_cli, wait_until
from ferroxy import Proxy
from ferroxy.testing import EchoServer


def _background_get(url: str, timeout: float = 15) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            r = httpx.get(url, timeout=timeout)
            result["status"] = r.status_code
            result["body"] = r.content
        except Exception as exc:
            result["error"] = repr(exc)
        result["done_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _reached_upstream(upstream: EchoServer) -> bool:
    """Wait until the upstream has the request: it is in flight in the proxy from then on."""
    return bool(wait_until(lambda: upstream.requests >= 1, timeout=5))


def _refused(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.3):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_request(
    tmp_path: Path, ferroxy_upstream, sig: signal.Signals
) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with run_cli(spec, "--grace-period", "5", log_dir=tmp_path) as cli:
        t, result = _background_get(cli.url + "/delay/1500")
        assert _reached_upstream(ferroxy_upstream), cli.describe()
        cli.proc.send_signal(sig)

        refused = wait_until(lambda: _refused(cli.port), timeout=1.0, interval=0.05)
        still_running = "done_at" not in result

        t.join(10)
        try:
            rc = cli.proc.wait(timeout=8)
        except Exception:
            pytest.fail(f"the process did not exit after the in-flight request\n{cli.describe()}")

    assert result.get("status") == 200, f"in-flight request was not completed: {result}"
    assert result["body"].startswith(b"{") and b"/delay/1500" in result["body"]
    assert refused, "new connections were still accepted after the signal"
    assert still_running, "the in-flight request finished before refusal was checked (test timing)"
    assert rc == 0, f"exit code {rc} after {sig.name}\n{cli.describe()}"


def test_grace_period_bounds_shutdown(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    grace = 0.5
    with run_cli(spec, "--grace-period", str(grace), log_dir=tmp_path) as cli:
        t, result = _background_get(cli.url + "/delay/6000")
        assert _reached_upstream(ferroxy_upstream), cli.describe()
        cli.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            rc = cli.proc.wait(timeout=grace + 5)
        except Exception:
            pytest.fail(f"still running {grace + 5}s after SIGTERM with grace {grace}s")
        elapsed = time.monotonic() - start
        t.join(10)
    assert elapsed < grace + 1.25, f"exited {elapsed:.2f}s after SIGTERM with grace period {grace}s"
    assert rc == 0, f"exit code {rc}\n{cli.describe()}"
    assert result.get("status") != 200, "a request longer than the grace period cannot succeed"


def test_idle_process_exits_promptly_on_sigterm(tmp_path: Path, ferroxy_upstream) -> None:
    spec = fixed_upstream_app(tmp_path, ferroxy_upstream.addr)
    with (
        run_cli(spec, log_dir=tmp_path) as cli,
        httpx.Client(base_url=cli.url, timeout=10) as c,  # an idle keep-alive client
    ):
        assert c.get("/x").status_code == 200
        cli.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        rc = cli.proc.wait(timeout=10)
        elapsed = time.monotonic() - start
    assert rc == 0
    assert elapsed < 2.0, f"an idle proxy took {elapsed:.2f}s to exit (waiting on idle keep-alive?)"


def test_in_process_stop(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App)
    t, result = _background_get(proxy.url + "/delay/800")
    assert _reached_upstream(ferroxy_upstream)
    stopper = threading.Thread(target=proxy.stop, kwargs={"grace_period": 5.0})
    stopper.start()
    assert wait_until(lambda: _refused(proxy.port), timeout=1.0), "still accepting after stop()"
    t.join(10)
    stopper.join(10)
    assert result.get("status") == 200, result
    assert not port_accepts(proxy.port)


def test_connections_past_the_grace_period_are_closed(ferroxy_upstream, ferroxy_proxy) -> None:
    """In-process too, a request still running when the grace period ends is cut off, so
    the client sees an error instead of waiting for the upstream."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    proxy = ferroxy_proxy(App, grace_period=0.3)
    outcome: dict[str, object] = {}

    def slow_request() -> None:
        try:
            outcome["status"] = httpx.get(f"{proxy.url}/delay/4000", timeout=10).status_code
        except httpx.HTTPError as error:
            outcome["error"] = error

    client = threading.Thread(target=slow_request)
    client.start()
    assert _reached_upstream(ferroxy_upstream)
    started = time.monotonic()
    proxy.stop()
    client.join(6)
    assert "error" in outcome, outcome
    assert time.monotonic() - started < 2.5


def _keep_alive_client(port: int, stop: threading.Event, tally: dict[str, int]) -> None:
    """Send requests one after another on keep-alive connections until the proxy stops
    taking them. A request counts as lost if it was sent and its connection ended without an
    answer; a refused connect is not (nothing was sent)."""
    import http.client

    while not stop.is_set():
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.connect()
        except OSError:
            return  # refused: the proxy has stopped listening
        try:
            while True:
                try:
                    conn.request("GET", "/delay/100")
                except OSError:
                    break  # closed before we could send: nothing lost, reconnect
                try:
                    response = conn.getresponse()
                    response.read()
                except (http.client.HTTPException, OSError):
                    tally["lost"] += 1
                    return
                tally["answered"] += 1
                if response.getheader("connection", "").lower() == "close" or stop.is_set():
                    break
        finally:
            conn.close()


@pytest.fixture
def patient_proxy(ferroxy_upstream, ferroxy_proxy):
    """A proxy in front of the echo upstream with a grace period longer than any test."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

    return ferroxy_proxy(App, grace_period=10.0)


def test_shutdown_under_keep_alive_load_loses_no_request(patient_proxy) -> None:
    """Clients that send their next request the moment the last answer arrives (as wrk does)
    are the hard case: a connection is idle to the proxy only for that moment."""

    proxy = patient_proxy
    stop = threading.Event()
    tallies = [{"answered": 0, "lost": 0} for _ in range(16)]
    clients = [
        threading.Thread(target=_keep_alive_client, args=(proxy.port, stop, tally))
        for tally in tallies
    ]
    for client in clients:
        client.start()
    assert wait_until(lambda: sum(t["answered"] for t in tallies) >= 48, timeout=10)
    started = time.monotonic()
    proxy.stop()
    stopped_in = time.monotonic() - started
    stop.set()
    for client in clients:
        client.join(15)
    assert sum(t["lost"] for t in tallies) == 0, tallies
    assert stopped_in < 5.0, f"stop took {stopped_in:.1f}s: connections were not closed"


def test_idle_keep_alive_connections_are_closed_at_shutdown(patient_proxy) -> None:
    proxy = patient_proxy
    idle = socket.create_connection((HOST, proxy.port), timeout=5)
    with idle:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()
        idle.settimeout(5)
        assert idle.recv(65536) == b"", "an idle connection got data at shutdown"
        closed_in = time.monotonic() - started
        stopper.join(10)
    assert closed_in < 1.5, f"the idle connection was closed after {closed_in:.1f}s"


def test_a_request_arriving_during_shutdown_is_answered_and_closes(
    patient_proxy, ferroxy_upstream
) -> None:
    proxy = patient_proxy
    busy = socket.create_connection((HOST, proxy.port), timeout=5)
    slow = socket.create_connection((HOST, proxy.port), timeout=5)
    with busy, slow:
        # One request in flight keeps the server in its grace period; on the other
        # connection, a second request's head has begun to arrive when shutdown begins, and
        # the rest comes a byte at a time.
        busy.sendall(b"GET /delay/1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _reached_upstream(ferroxy_upstream)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        late = b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n"
        slow.sendall(late[:6])
        stopper = threading.Thread(target=proxy.stop)
        stopper.start()
        assert wait_until(lambda: _refused(proxy.port), timeout=2)
        for byte in late[6:]:
            slow.sendall(bytes([byte]))
            time.sleep(0.02)
        answer = slow.makefile("rb")
        status_line = answer.readline()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        headers = []
        while (line := answer.readline()) not in (b"\r\n", b""):
            headers.append(line.lower())
        assert b"connection: close\r\n" in headers, headers
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")
        stopper.join(10)
