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
