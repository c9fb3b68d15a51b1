"""Hooks that block, hang or keep failing must not stall the other requests (issue 7):
``@ferroxy.blocking``, the slow-hook warning, ``hook_timeout`` and rate-limited tracebacks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import threading
import time
from typing import Any

import ferroxy
import httpx
import pytest
from conftest import LogCapture, run_cli, write_app
from ferroxy import Proxy, ProxyError, Response, Session
from ferroxy.__main__ import _parser
from ferroxy.server import (
    DEFAULT_BLOCKING_THREADS,
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_SLOW_HOOK_THRESHOLD,
)

SLEEPERS = 5
SLEEP_SECONDS = 1.0


# One client for the whole module: building one (its TLS context) takes ~0.1 s here, which
# would swamp the latencies measured. It is thread-safe and opens connections as needed.
_client = httpx.Client(timeout=10.0)


def _get(url: str) -> tuple[int, float]:
    """Status of a GET, and how long it took."""
    start = time.monotonic()
    status = _client.get(url).status_code
    return status, time.monotonic() - start


class _Countdown:
    """Set once ``count_down`` has been called ``n`` times, from any threads."""

    def __init__(self, n: int) -> None:
        self._left = n
        self._lock = threading.Lock()
        self._done = threading.Event()

    def count_down(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)


def _warnings_naming(logs: LogCapture, text: str) -> list[logging.LogRecord]:
    return logs.matching(lambda r: r.levelno == logging.WARNING and text in r.getMessage())


def test_blocking_hooks_sleep_on_threads_while_other_requests_flow(
    ferroxy_upstream, ferroxy_proxy, ferroxy_logs
) -> None:
    asleep = _Countdown(SLEEPERS)

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        @ferroxy.blocking
        def request_filter(self, session: Session, ctx: None) -> Response | None:
            if session.req.path.startswith("/sleep"):
                asleep.count_down()
                time.sleep(SLEEP_SECONDS)  # a stand-in for a blocking client call
            return None

    proxy = ferroxy_proxy(App, access_log=False)
    with concurrent.futures.ThreadPoolExecutor(SLEEPERS) as clients:
        started = time.monotonic()
        sleepers = [clients.submit(_get, f"{proxy.url}/sleep/{i}") for i in range(SLEEPERS)]
        assert asleep.wait(SLEEP_SECONDS), "the hooks ran one after another"
        others = [_get(f"{proxy.url}/other/{i}") for i in range(10)]
        assert not any(future.done() for future in sleepers), "others waited for the sleepers"
        slept = [future.result() for future in sleepers]
        all_done = time.monotonic() - started

    assert [status for status, _ in others] == [200] * 10
    assert max(took for _, took in others) < 0.5
    assert [status for status, _ in slept] == [200] * SLEEPERS
    # Together, not one after another (5 s).
    assert all_done < 2.5, [took for _, took in slept]
    assert not _warnings_naming(ferroxy_logs, "held the Python thread"), ferroxy_logs.dump()


def test_blocking_threads_bounds_how_many_block_at_once(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

        @ferroxy.blocking
        def request_filter(self, session: Session, ctx: None) -> None:
            time.sleep(0.3)

    proxy = ferroxy_proxy(App, access_log=False, blocking_threads=1)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as clients:
        statuses = list(clients.map(lambda i: _get(f"{proxy.url}/{i}")[0], range(3)))
    assert statuses == [200] * 3
    assert time.monotonic() - started >= 0.85, "one thread runs the three hooks in turn"


def test_every_hook_may_be_blocking(ferroxy_upstream, ferroxy_proxy) -> None:
    threads: dict[str, str] = {}
    logged = threading.Event()

    def note(hook: str) -> None:
        threads[hook] = threading.current_thread().name

    class App(Proxy[dict[str, str]]):
        upstream = ferroxy_upstream.addr

        @ferroxy.blocking
        def new_ctx(self) -> dict[str, str]:
            note("new_ctx")
            return {"made": "on a thread"}

        @ferroxy.blocking
        def upstream_request_filter(
            self, session: Session, upstream_request: Any, ctx: Any
        ) -> None:
            note("upstream_request_filter")
            upstream_request.headers["x-ctx"] = ctx["made"]

        @ferroxy.blocking
        def response_filter(self, session: Session, upstream_response: Any, ctx: Any) -> None:
            note("response_filter")
            upstream_response.headers["x-blocking"] = "yes"

        @ferroxy.blocking
        def logging(self, session: Session, error: ProxyError | None, ctx: Any) -> None:
            note("logging")
            logged.set()

    proxy = ferroxy_proxy(App, access_log=False)
    response = _client.get(f"{proxy.url}/echo")
    assert response.status_code == 200
    assert response.headers["x-blocking"] == "yes"
    assert response.json()["headers"]["x-ctx"] == "on a thread"
    assert logged.wait(5)
    assert set(threads) == {"new_ctx", "upstream_request_filter", "response_filter", "logging"}
    assert all(name.startswith("ferroxy-blocking") for name in threads.values()), threads


def test_blocking_refuses_async_hooks_naming_them(ferroxy_upstream, ferroxy_proxy) -> None:
    with pytest.raises(TypeError, match=r"request_filter is `async def`"):

        class Decorated(Proxy):
            @ferroxy.blocking
            async def request_filter(self, session: Session, ctx: None) -> None:
                return None

    def plain(self: Proxy, session: Session, ctx: None) -> None:
        return None

    marked = ferroxy.blocking(plain)

    # An async wrapper made afterwards carries the mark along (functools.wraps copies it).
    @functools.wraps(marked)
    async def wrapped(self: Proxy, session: Session, ctx: None) -> None:
        return None

    class Wrapped(Proxy):
        upstream = ferroxy_upstream.addr
        request_filter = wrapped

    with pytest.raises(TypeError, match=r"Wrapped\.request_filter is `async def`"):
        ferroxy_proxy(Wrapped)


def test_a_hook_holding_the_thread_is_reported_once_naming_it_and_the_fix(
    ferroxy_upstream, ferroxy_proxy, ferroxy_logs
) -> None:
    class Slow(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: None) -> None:
            time.sleep(0.08)

        async def response_filter(
            self, session: Session, upstream_response: Any, ctx: None
        ) -> None:
            await asyncio.sleep(0)
            time.sleep(0.08)  # a blocking call inside an async hook holds the thread too

    proxy = ferroxy_proxy(Slow, access_log=False, slow_hook_threshold=0.05)
    assert [_get(f"{proxy.url}/{i}")[0] for i in range(3)] == [200] * 3

    for hook in ("Slow.request_filter", "Slow.response_filter"):
        records = ferroxy_logs.wait_for(
            lambda r, hook=hook: r.levelno == logging.WARNING and hook in r.getMessage()
        )
        assert len(records) == 1, ferroxy_logs.dump()
        message = records[0].getMessage()
        assert re.search(r"held the Python thread for \d+\.\d{3}s", message), message
        assert "`async def`" in message and "@ferroxy.blocking" in message


def test_a_fast_hook_is_not_reported(ferroxy_upstream, ferroxy_proxy, ferroxy_logs) -> None:
    class Fast(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session: Session, ctx: None) -> None:
            return None

    proxy = ferroxy_proxy(Fast, access_log=False)
    assert _get(f"{proxy.url}/")[0] == 200
    assert not _warnings_naming(ferroxy_logs, "held the Python thread"), ferroxy_logs.dump()


def test_hook_timeout_cancels_an_async_hook_and_answers_504(
    ferroxy_upstream, ferroxy_proxy, ferroxy_logs
) -> None:
    cancelled = threading.Event()
    seen: list[tuple[str, str | None]] = []
    logged = threading.Event()

    class Hangs(Proxy):
        upstream = ferroxy_upstream.addr

        async def request_filter(self, session: Session, ctx: None) -> None:
            if session.req.path == "/hang":
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

        def fail_to_proxy(self, session: Session, error: ProxyError, ctx: None) -> None:
            seen.append(("fail_to_proxy", error.kind))

        def logging(self, session: Session, error: ProxyError | None, ctx: None) -> None:
            seen.append(("logging", error and error.kind))
            logged.set()

    proxy = ferroxy_proxy(Hangs, access_log=False, hook_timeout=0.3)
    status, took = _get(f"{proxy.url}/hang")
    assert status == 504
    assert took < 3
    assert cancelled.wait(2), "the hook's task was not cancelled"
    assert logged.wait(2)
    assert seen == [("fail_to_proxy", "hook_timeout"), ("logging", "hook_timeout")]
    assert ferroxy_logs.wait_for(lambda r: "request_filter: still running after" in r.getMessage())
    # A hook that finishes in time is not affected.
    assert _get(f"{proxy.url}/fine")[0] == 200


def test_hook_timeout_answers_504_for_a_blocking_hook_whose_thread_runs_on(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    finished = threading.Event()

    class Overruns(Proxy):
        upstream = ferroxy_upstream.addr

        @ferroxy.blocking
        def request_filter(self, session: Session, ctx: None) -> None:
            time.sleep(1.0)
            finished.set()

    proxy = ferroxy_proxy(Overruns, access_log=False, hook_timeout=0.2)
    status, took = _get(f"{proxy.url}/")
    assert status == 504
    assert took < 0.9, "answered before the hook's thread was done"
    assert not finished.is_set()
    assert finished.wait(3), "the thread was left to finish its hook"


def test_a_hook_that_always_raises_logs_one_traceback_and_counts_the_rest(
    ferroxy_upstream, ferroxy_proxy, ferroxy_logs
) -> None:
    class Broken(Proxy):
        upstream = ferroxy_upstream.addr
        calls = 0

        def request_filter(self, session: Session, ctx: None) -> None:
            Broken.calls += 1
            raise ValueError(f"boom {Broken.calls}")

    requests = 200
    proxy = ferroxy_proxy(Broken, access_log=False)
    statuses = [_get(f"{proxy.url}/{i}")[0] for i in range(requests)]
    assert statuses == [500] * requests
    assert _get(f"{proxy.url}/still-serving")[0] == 500
    proxy.stop()  # counts the failures not yet counted

    hook_records = ferroxy_logs.matching(lambda r: "hook request_filter" in r.getMessage())
    tracebacks = [r for r in hook_records if r.exc_info]
    assert len(tracebacks) == 1, ferroxy_logs.dump()
    assert "boom 1" in LogCapture.text(tracebacks[0])
    counts = [r for r in hook_records if "more time(s)" in r.getMessage()]
    assert counts, ferroxy_logs.dump()
    assert sum(int(r.args[1]) for r in counts) == requests  # type: ignore[index]
    assert f"boom {requests + 1}" in counts[-1].getMessage()
    assert len(ferroxy_logs.dump()) < 10_000


def test_requests_needing_no_python_flow_while_the_python_thread_is_blocked(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    """With today's API a hook runs for every path, so a request needs no Python only when
    the app overrides no phase its response waits for: here only ``logging``, which runs
    after the response, and blocks the Python thread (no @blocking) for its first request."""
    blocked, release = threading.Event(), threading.Event()

    class LogsSlowly(Proxy):
        upstream = ferroxy_upstream.addr

        def logging(self, session: Session, error: ProxyError | None, ctx: None) -> None:
            if session.req.path == "/first":
                blocked.set()
                release.wait(5)

    proxy = ferroxy_proxy(LogsSlowly, access_log=False, slow_hook_threshold=10.0)
    try:
        assert _get(f"{proxy.url}/first")[0] == 200
        assert blocked.wait(5)
        others = [_get(f"{proxy.url}/other/{i}") for i in range(10)]
        assert not release.is_set()
        assert [status for status, _ in others] == [200] * 10
        assert max(took for _, took in others) < 0.5
    finally:
        release.set()


def test_cli_flags_set_the_hook_options() -> None:
    defaults = _parser().parse_args(["app.py:App"])
    assert defaults.blocking_threads == DEFAULT_BLOCKING_THREADS
    assert defaults.slow_hook_threshold == DEFAULT_SLOW_HOOK_THRESHOLD == 0.1
    assert defaults.hook_timeout is DEFAULT_HOOK_TIMEOUT is None
    given = _parser().parse_args(
        [
            "app.py:App",
            "--blocking-threads=4",
            "--slow-hook-threshold=0.25",
            "--hook-timeout=2.5",
        ]
    )
    assert (given.blocking_threads, given.slow_hook_threshold, given.hook_timeout) == (
        4,
        0.25,
        2.5,
    )


def test_a_timed_out_blocking_hook_does_not_hold_the_process_at_exit(
    ferroxy_upstream, tmp_path
) -> None:
    """Its thread cannot be cancelled, but it must not keep a stopped server's process alive
    (a supervisor would have to kill it)."""
    import signal

    spec = write_app(
        tmp_path,
        f"""
        import time
        import ferroxy

        class App(ferroxy.Proxy):
            upstream = {ferroxy_upstream.addr!r}

            @ferroxy.blocking
            def request_filter(self, session, ctx):
                time.sleep(30)
        """,
    )
    with run_cli(spec, "--hook-timeout", "0.3", "--grace-period", "1") as cli:
        assert httpx.get(cli.url + "/", timeout=10).status_code == 504
        started = time.monotonic()
        cli.proc.send_signal(signal.SIGTERM)
        rc = cli.proc.wait(timeout=15)
        took = time.monotonic() - started
    assert rc == 0, cli.describe()
    assert took < 5, f"the process took {took:.1f}s to exit behind a sleeping hook"
