"""Other requests' latency while 5 hooks block for 1 s each (issue 7), with and without
``@ferroxy.blocking``.

    python bench/blocking.py [--rounds 3]

Each round serves one app with the CLI (``python -m ferroxy bench/blocking.py:APP``, a process
of its own) in front of the bundled echo upstream. Five clients send ``/sleep`` at once, whose
``request_filter`` calls ``time.sleep(1)``, a stand-in for a blocking HTTP client or database
call; meanwhile one keep-alive client sends ``/other`` back to back until the five are done.
Prints a markdown table: the other requests' p50/p99/max and how long the five took.
nginx has no equivalent (it runs no user code in the request path), so there is no nginx row.

Then 10,000 requests through a ``request_filter`` that raises: how many bytes of log the
server wrote (stderr, ``--log-level info``), where one traceback per request used to write
4.9 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ferroxy
from ferroxy import Proxy, Session
from ferroxy.testing import start_upstream

SLEEPERS = 5
SLEEP_SECONDS = 1.0
HOST = "127.0.0.1"


def _sleep_on(session: Session) -> None:
    if session.req.path == "/sleep":
        time.sleep(SLEEP_SECONDS)


class Blocking(Proxy):
    upstream = os.environ.get("FERROXY_BENCH_UPSTREAM")

    @ferroxy.blocking
    def request_filter(self, session: Session, ctx: None) -> None:
        _sleep_on(session)


class Plain(Proxy):
    upstream = os.environ.get("FERROXY_BENCH_UPSTREAM")

    def request_filter(self, session: Session, ctx: None) -> None:
        _sleep_on(session)


class Raising(Proxy):
    upstream = os.environ.get("FERROXY_BENCH_UPSTREAM")

    def request_filter(self, session: Session, ctx: None) -> None:
        raise ValueError(f"broken hook on {session.req.path}")


RAISING_REQUESTS = 10_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(app: str, upstream: str, log: Path) -> Iterator[int]:
    """The CLI serving ``app``, its stderr into ``log``; yields its port once it answers
    (the process has ended when the block is left)."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "ferroxy",
        f"{Path(__file__).resolve()}:{app}",
        f"--listen={HOST}:{port}",
        "--no-access-log",
        "--log-level=info",
    ]
    env = {**os.environ, "FERROXY_BENCH_UPSTREAM": upstream}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{app} did not start: {log.read_text()}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _get(conn: http.client.HTTPConnection, path: str, status: int = 200) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    if response.status != status:
        raise RuntimeError(f"{path}: {response.status}")


def _round(port: int) -> tuple[list[float], float]:
    """Other requests' latencies (seconds) while the sleepers run, and how long they took."""
    others = http.client.HTTPConnection(HOST, port, timeout=30)
    _get(others, "/warm-up")
    done = threading.Event()
    finished = 0
    lock = threading.Lock()

    def sleeper() -> None:
        nonlocal finished
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        _get(conn, "/sleep")
        conn.close()
        with lock:
            finished += 1
            if finished == SLEEPERS:
                done.set()

    started = time.monotonic()
    threads = [threading.Thread(target=sleeper) for _ in range(SLEEPERS)]
    for thread in threads:
        thread.start()
    latencies = []
    while not done.is_set():
        sent = time.monotonic()
        _get(others, "/other")
        latencies.append(time.monotonic() - sent)
    took = time.monotonic() - started
    for thread in threads:
        thread.join()
    others.close()
    return latencies, took


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _log_bytes_of_raising_hook(upstream: str, workdir: Path) -> tuple[int, float]:
    """Bytes of log written for RAISING_REQUESTS requests that all fail, and seconds taken."""
    log = workdir / "raising.log"
    with _serve("Raising", upstream, log) as port:
        before = log.stat().st_size  # the start-up lines
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        started = time.monotonic()
        for i in range(RAISING_REQUESTS):
            _get(conn, f"/{i}", status=500)
        took = time.monotonic() - started
        conn.close()
    # Counted after the server stopped: it logs the last count line then.
    return log.stat().st_size - before, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = [
        "| app | other requests | p50 ms | p99 ms | max ms "
        f"| {SLEEPERS} sleepers took, s (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="ferroxy-bench-") as tmp, start_upstream() as upstream:
        workdir = Path(tmp)
        for app, label in (
            ("Blocking", "`@ferroxy.blocking` sync hook"),
            ("Plain", "plain sync hook"),
        ):
            latencies: list[float] = []
            took: list[float] = []
            with _serve(app, upstream.addr, workdir / f"{app}.log") as port:
                for _ in range(args.rounds):
                    round_latencies, round_took = _round(port)
                    latencies += round_latencies
                    took.append(round_took)
            rows.append(
                f"| {label} | {len(latencies)} | {_percentile(latencies, 0.5) * 1e3:.2f} "
                f"| {_percentile(latencies, 0.99) * 1e3:.2f} | {max(latencies) * 1e3:.1f} "
                f"| {statistics.median(took):.2f} |"
            )
        logged, took_raising = _log_bytes_of_raising_hook(upstream.addr, workdir)
    print("\n".join(rows))
    print(
        f"\n{RAISING_REQUESTS} requests to a raising hook, all answered 500 in "
        f"{took_raising:.1f} s: {logged:,} bytes of log"
    )


if __name__ == "__main__":
    main()
