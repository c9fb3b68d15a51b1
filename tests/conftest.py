"""Shared helpers for the ferroxy test suite.

The ``ferroxy_upstream`` and ``ferroxy_proxy`` fixtures come from the ferroxy pytest plugin
(registered through the ``pytest11`` entry point), so nothing is imported for them here.
This file holds the helpers several test files share: free ports, waiting for a port, a
context manager that runs the CLI as a subprocess, a raw HTTP/1.1 response reader for
wire-level tests, and a log-capturing fixture for the ``ferroxy`` loggers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from ferroxy.testing import EchoServer, start_upstream

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: large transfers (still run by default)")


# --------------------------------------------------------------------------- ports / waiting


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(pred: Callable[[], Any], timeout: float = 2.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns a truthy value or ``timeout`` passes; returns the
    last value (falsy on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for_port(
    port: int,
    timeout: float = 15.0,
    proc: subprocess.Popen[bytes] | None = None,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Wait until ``port`` accepts TCP connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port):
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"process exited with code {proc.returncode} before port {port} accepted "
                f"connections\n{describe()}"
            )
        time.sleep(0.05)
    pytest.fail(f"port {port} did not accept connections within {timeout}s\n{describe()}")


# --------------------------------------------------------------------------- CLI subprocess


def write_app(directory: Path, body: str, name: str = "app.py", cls: str = "App") -> str:
    """Write a Python file defining an app and return its ``path.py:App`` spec."""
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return f"{path}:{cls}"


def fixed_upstream_app(directory: Path, upstream_addr: str, name: str = "app.py") -> str:
    """An app with only ``upstream = "host:port"`` (no hooks)."""
    return write_app(
        directory,
        f"""
        from ferroxy import Proxy

        class App(Proxy):
            upstream = {upstream_addr!r}
        """,
        name=name,
    )


@dataclasses.dataclass
class CliProxy:
    proc: subprocess.Popen[bytes]
    port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"--- stdout ---\n{self.stdout()[-4000:]}\n--- stderr ---\n{self.stderr()[-4000:]}"


@contextlib.contextmanager
def run_cli(
    app_spec: str,
    *args: str,
    port: int | None = None,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    argv0: list[str] | None = None,
    log_dir: Path | None = None,
    wait: bool = True,
    timeout: float = 20.0,
) -> Iterator[CliProxy]:
    """Run ``python -m ferroxy APP --listen 127.0.0.1:PORT *args`` and yield a handle once
    the port accepts connections. The process is always killed on exit."""
    import tempfile

    port = port if port is not None else free_port()
    cmd = [
        *(argv0 or [sys.executable, "-m", "ferroxy"]),
        app_spec,
        "--listen",
        f"{HOST}:{port}",
        *args,
    ]
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    own_dir = log_dir is None
    tmp = Path(tempfile.mkdtemp(prefix="ferroxy-cli-")) if own_dir else Path(log_dir)
    out_path, err_path = tmp / f"stdout-{port}.txt", tmp / f"stderr-{port}.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd, env=full_env
        )
    handle = CliProxy(proc=proc, port=port, stdout_path=out_path, stderr_path=err_path)
    try:
        if wait:
            wait_for_port(port, timeout=timeout, proc=proc, describe=handle.describe)
        yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if own_dir:
            # The captured output is read through the handle inside the block only.
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- raw HTTP/1.1


@dataclasses.dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


def raw_connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_head(rfile: Any) -> tuple[str, int, str, list[tuple[str, str]]]:
    """Read a status line and headers; raises ConnectionError on EOF before a status line."""
    line = rfile.readline(65537)
    if not line:
        raise ConnectionError("connection closed before a status line")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"bad status line: {line!r}")
    version, status = parts[0], int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers: list[tuple[str, str]] = []
    while True:
        h = rfile.readline(65537)
        if h in (b"\r\n", b"\n"):
            break
        if not h:
            raise ConnectionError("connection closed inside the response head")
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return version, status, reason, headers


def read_response(rfile: Any, *, head: bool = False, skip_1xx: bool = True) -> RawResponse:
    """Read one HTTP/1.x response from a socket's ``makefile("rb")``."""
    while True:
        version, status, reason, headers = read_head(rfile)
        if not (skip_1xx and 100 <= status < 200 and status != 101):
            break
    resp = RawResponse(version, status, reason, headers, b"")
    if head or 100 <= status < 200 or status in (204, 304):
        return resp
    te = (resp.header("transfer-encoding") or "").lower()
    if "chunked" in te:
        chunks = []
        while True:
            size_line = rfile.readline(65537)
            if not size_line:
                raise ConnectionError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            data = rfile.read(size)
            if len(data) != size:
                raise ConnectionError("connection closed inside a chunk")
            chunks.append(data)
            rfile.readline(65537)
        resp.body = b"".join(chunks)
    elif resp.header("content-length") is not None:
        n = int(resp.header("content-length") or "0")
        data = rfile.read(n)
        if len(data) != n:
            raise ConnectionError(f"body truncated: got {len(data)} of {n} bytes")
        resp.body = data
    else:
        resp.body = rfile.read()
    return resp


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the peer closes the connection. Returns (closed, data read meanwhile);
    closed is False if the connection was still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False, data
        except (ConnectionResetError, BrokenPipeError):
            return True, data
        if not chunk:
            return True, data
        data += chunk


def simple_request(method: str, path: str, host: str = "example.test", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


# --------------------------------------------------------------------------- logs


class LogCapture(logging.Handler):
    """Collects records from the ``ferroxy`` loggers (thread-safe)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self._lock = threading.Lock()
        self._records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self._records.append(record)

    @property
    def records(self) -> list[logging.LogRecord]:
        with self._lock:
            return list(self._records)

    @staticmethod
    def text(record: logging.LogRecord) -> str:
        """The message plus any traceback attached to the record."""
        out = record.getMessage()
        if record.exc_info:
            out += "\n" + "".join(traceback.format_exception(*record.exc_info))
        elif record.exc_text:
            out += "\n" + record.exc_text
        return out

    def matching(self, pred: Callable[[logging.LogRecord], bool]) -> list[logging.LogRecord]:
        return [r for r in self.records if pred(r)]

    def wait_for(
        self, pred: Callable[[logging.LogRecord], bool], timeout: float = 2.0, count: int = 1
    ) -> list[logging.LogRecord]:
        wait_until(lambda: len(self.matching(pred)) >= count, timeout=timeout)
        return self.matching(pred)

    def dump(self) -> str:
        return "\n".join(f"[{r.name} {r.levelname}] {self.text(r)}" for r in self.records)


@pytest.fixture
def ferroxy_logs() -> Iterator[LogCapture]:
    """Capture records of the ``ferroxy`` logger tree at INFO and above. Request this
    fixture before starting a proxy so the engine forwards INFO records."""
    logger = logging.getLogger("ferroxy")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    handler = LogCapture()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# --------------------------------------------------------------------------- echo helpers


@pytest.fixture
def upstreams() -> Iterator[list[EchoServer]]:
    """Three echo upstreams (``ferroxy.testing.EchoServer``), for load balancing over them."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(start_upstream()) for _ in range(3)]


def served_by(upstreams: list[EchoServer]) -> list[int]:
    """How many requests each echo upstream has served so far."""
    return [upstream.requests for upstream in upstreams]


class StatusServer(ThreadingHTTPServer):
    """Answers every GET with ``status`` and records the path and Host it was sent."""

    status = 200

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StatusHandler)
        self.seen: list[tuple[str, str | None]] = []

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        self.send_response(self.server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[StatusServer]:
    server = StatusServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


BYTES_PATTERN_PERIOD = 251


def pattern_block(size_hint: int = 1 << 20) -> bytes:
    """A block of the /bytes/{n} pattern (byte i == i % 251) whose length is a multiple of
    251, so consecutive copies continue the pattern."""
    reps = max(1, size_hint // BYTES_PATTERN_PERIOD)
    return bytes(range(BYTES_PATTERN_PERIOD)) * reps


def expected_pattern(n: int) -> bytes:
    """The first ``n`` bytes the echo upstream's /bytes/{n} sends (small n only)."""
    block = bytes(range(BYTES_PATTERN_PERIOD))
    return (block * (n // BYTES_PATTERN_PERIOD + 1))[:n]
