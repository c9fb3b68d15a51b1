"""f.RateLimit (issue 9) through the proxy over real sockets: refused requests get 429 with
Retry-After and never reach the upstream, each key has its own budget, the sliding-window
estimate passes about the rate when offered three times it, and with a real redis-server two
proxies share one limit, filters count apart unless they share a name (and an unrelated
filter added to the list does not rename one), long key values make short Redis keys, Redis
going away fails open (one warning) or closed, a store that never answers costs a request no
more than store_timeout (and the requests after it nothing), and a store connection gone
silent is replaced."""

from __future__ import annotations

import contextlib
import math
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    LogCapture,
    free_port,
    raw_connect,
    read_response,
    simple_request,
    wait_for_port,
    wait_until,
)
from ferroxy import Proxy, ProxyError, Session
from ferroxy import filters as f
from ferroxy.testing import EchoServer


def app(upstream: EchoServer, *filters: f.Filter) -> type[Proxy]:
    return type("App", (Proxy,), {"upstream": upstream.addr, "filters": list(filters)})


def statuses(
    url: str, n: int, headers: dict[str, str] | None = None, path: str = "/x"
) -> list[int]:
    with httpx.Client(base_url=url, headers=headers) as client:
        return [client.get(path).status_code for _ in range(n)]


HOUR = 3600.0
STORE_WARNING_INTERVAL = 10.0


def in_one_window(window: float, needed: float = 15.0) -> None:
    """Return once the current wall-clock window of ``window`` seconds (where the limiter's
    windows begin) has ``needed`` seconds left, waiting for the next one to begin if not: a
    test counting "N per window" must not straddle two."""
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.01)  # the boundary itself, not a wait for a condition


def test_over_the_limit_gets_429_with_retry_after_and_the_upstream_sees_nothing(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    proxy = ferroxy_proxy(app(ferroxy_upstream, f.RateLimit(rate="5/m")), access_log=False)
    in_one_window(60)
    with httpx.Client(base_url=proxy.url) as client:
        assert [client.get("/x").status_code for _ in range(5)] == [200] * 5
        refused = [client.get("/x") for _ in range(5)]
    assert [r.status_code for r in refused] == [429] * 5
    for r in refused:
        assert r.text == "429 Too Many Requests\n"
        assert 1 <= int(r.headers["retry-after"]) <= 60
    assert ferroxy_upstream.requests == 5


def test_each_key_value_has_its_own_budget(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.RateLimit(key="header:x-api-key", rate="3/h", status=503)),
        access_log=False,
    )
    in_one_window(HOUR)
    assert statuses(proxy.url, 4, {"x-api-key": "alice"}) == [200, 200, 200, 503]
    assert statuses(proxy.url, 4, {"x-api-key": "bob"}) == [200, 200, 200, 503]
    # Requests without the header share one budget of their own.
    assert statuses(proxy.url, 4) == [200, 200, 200, 503]
    assert ferroxy_upstream.requests == 9


def test_a_condition_limits_only_the_requests_it_matches(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.RateLimit(f.PathPrefix("/api/"), key="path", rate="1/h")),
        access_log=False,
    )
    in_one_window(HOUR)
    with httpx.Client(base_url=proxy.url) as client:
        assert [client.get("/api/a").status_code for _ in range(2)] == [200, 429]
        assert [client.get("/api/b").status_code for _ in range(2)] == [200, 429]
        assert [client.get("/other").status_code for _ in range(3)] == [200] * 3


def hook_calls_of(ferroxy_proxy: Any, upstream: EchoServer, limit: f.RateLimit) -> list[str]:
    """Two requests to a proxy allowing one, with hooks that record their calls."""
    calls: list[str] = []
    upstream_addr = upstream.addr

    class Hooked(Proxy):
        upstream = upstream_addr
        filters = (limit,)

        def request_filter(self, session: Session, ctx: object) -> None:
            calls.append("request_filter")

        def logging(self, session: Session, error: ProxyError | None, ctx: object) -> None:
            calls.append(f"logging {session.req.path}")

    proxy = ferroxy_proxy(Hooked, access_log=False)
    in_one_window(HOUR)
    assert statuses(proxy.url, 2) == [200, 429]
    wait_until(lambda: len(calls) == 3)
    return calls


def test_a_refused_request_runs_no_hook_but_logging(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    calls = hook_calls_of(ferroxy_proxy, ferroxy_upstream, f.RateLimit(rate="1/h"))
    assert calls == ["request_filter", "logging /x", "logging /x"]


def offer(port: int, rate: float, seconds: float, clients: int = 6) -> list[tuple[float, int]]:
    """Offer ``rate`` requests/s for ``seconds`` over keep-alive connections, starting on a
    whole second of the wall clock (where the limiter's windows begin). Request k is due at
    start + k / rate and is sent by client k % clients, so a slow reply delays one client's
    next request only. Each request's send time (seconds after the start) and status, in no
    particular order."""
    total = int(rate * seconds)
    start = math.ceil(time.time()) + 0.01
    got: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client(first: int) -> None:
        sock = raw_connect(port)
        rfile = sock.makefile("rb")
        mine = []
        with sock, rfile:
            for k in range(first, total, clients):
                delay = start + k / rate - time.time()
                if delay > 0:
                    time.sleep(delay)  # the schedule itself, not a wait for a condition
                sent = time.time() - start
                sock.sendall(simple_request("GET", "/paced"))
                mine.append((sent, read_response(rfile).status))
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return got


def test_offered_three_times_the_rate_about_the_rate_passes(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any
) -> None:
    proxy = ferroxy_proxy(app(ferroxy_upstream, f.RateLimit(rate="100/s")), access_log=False)
    got = offer(proxy.port, rate=300, seconds=5)
    assert len(got) == 1500
    # A client that fell behind sends its last requests after the 5 s, into windows the
    # limit has not filled: they are not part of the measure.
    in_time = [status for sent, status in got if sent < 5]
    assert len(in_time) >= 1200, f"only {len(in_time)} of 1500 sent within the 5 s"
    passed = in_time.count(200)
    assert 450 <= passed <= 550, f"{passed} of {len(in_time)} sent within 5 s passed"
    assert in_time.count(429) == len(in_time) - passed
    assert ferroxy_upstream.requests == [status for _, status in got].count(200)


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A redis-server of its own on a free port, with nothing saved to disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        options = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), *options, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here (CI installs it: apt redis-server)")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_two_proxies_sharing_a_redis_store_share_one_limit(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    # Header names are case-insensitive: the two spellings count together.
    first = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.RateLimit(
                key="header:X-User", rate="20/h", store=redis_server.url, store_timeout=1.0
            ),
        ),
        access_log=False,
    )
    second = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.RateLimit(
                key="header:x-user", rate="20/h", store=redis_server.url, store_timeout=1.0
            ),
        ),
        access_log=False,
    )
    in_one_window(HOUR)
    got: list[httpx.Response] = []
    with httpx.Client(headers={"x-user": "u1"}) as client:
        for _ in range(15):
            got += [client.get(first.url + "/"), client.get(second.url + "/")]
    assert [r.status_code for r in got].count(200) == 20
    assert [r.status_code for r in got[20:]] == [429] * 10
    assert all(int(r.headers["retry-after"]) >= 1 for r in got[20:])
    assert ferroxy_upstream.requests == 20
    # Another key has its own budget in the shared store.
    assert statuses(second.url, 1, {"x-user": "u2"}) == [200]


def test_filters_sharing_a_store_count_apart_unless_they_share_a_name(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    def limit(path: str, name: str | None = None) -> f.RateLimit:
        return f.RateLimit(
            f.PathPrefix(path), rate="2/h", store=redis_server.url, store_timeout=1.0, name=name
        )

    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            limit("/login"),
            limit("/signup"),
            limit("/a/", "api"),
            limit("/b/", "api"),
        ),
        access_log=False,
    )
    in_one_window(HOUR)
    assert statuses(proxy.url, 3, path="/login") == [200, 200, 429]
    assert statuses(proxy.url, 1, path="/signup") == [200]
    # One name, one budget (Kong's scope), whatever the conditions.
    assert statuses(proxy.url, 2, path="/a/x") == [200, 200]
    assert statuses(proxy.url, 1, path="/b/x") == [429]


def redis_keys(port: int) -> list[bytes]:
    """``KEYS *`` on the server, over RESP."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        rfile = sock.makefile("rb")
        sock.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
        head = rfile.readline()
        assert head.startswith(b"*"), head
        keys = []
        for _ in range(int(head[1:])):
            length = int(rfile.readline()[1:])
            keys.append(rfile.read(length + 2)[:-2])
        return keys


def test_a_long_key_value_makes_a_short_redis_key(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    limit = f.RateLimit(key="header:x-user", rate="2/h", store=redis_server.url, store_timeout=1.0)
    proxy = ferroxy_proxy(app(ferroxy_upstream, limit), access_log=False)
    in_one_window(HOUR)
    assert statuses(proxy.url, 3, {"x-user": "a" * 16_000}) == [200, 200, 429]
    assert statuses(proxy.url, 1, {"x-user": "b" * 16_000}) == [200]
    keys = redis_keys(redis_server.port)
    assert len(keys) == 2, keys
    assert all(len(key) < 120 and b"aaaa" not in key for key in keys), keys


def test_a_request_refused_by_the_store_runs_no_hook_but_logging(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    limit = f.RateLimit(rate="1/h", store=redis_server.url, store_timeout=1.0)
    calls = hook_calls_of(ferroxy_proxy, ferroxy_upstream, limit)
    assert calls == ["request_filter", "logging /x", "logging /x"]


def test_redis_going_away_fails_open_with_one_warning_and_reconnects(
    ferroxy_upstream: EchoServer,
    ferroxy_proxy: Any,
    redis_server: RedisServer,
    ferroxy_logs: LogCapture,
) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.RateLimit(rate="3/h", store=redis_server.url, store_timeout=1.0)),
        access_log=False,
    )
    in_one_window(HOUR, needed=30)
    assert statuses(proxy.url, 4) == [200, 200, 200, 429]
    redis_server.stop()
    assert statuses(proxy.url, 10) == [200] * 10
    warned = ferroxy_logs.wait_for(lambda r: r.name == "ferroxy.rate_limit")
    assert len(warned) == 1, ferroxy_logs.dump()
    assert f"127.0.0.1:{redis_server.port}" in warned[0].getMessage()
    assert "requests pass unlimited" in warned[0].getMessage()
    # Back (empty, nothing was saved): the limit counts again once the proxy reconnects.
    redis_server.start()
    assert wait_until(lambda: statuses(proxy.url, 1) == [429], timeout=10)
    # Still at most one warning per interval since the first.
    warnings = ferroxy_logs.matching(lambda r: r.name == "ferroxy.rate_limit")
    allowed = 1 + int((time.time() - warned[0].created) // STORE_WARNING_INTERVAL)
    assert 1 <= len(warnings) <= allowed, ferroxy_logs.dump()


def test_a_redis_down_at_start_up_is_used_once_it_comes_up(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    redis_server.stop()
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.RateLimit(rate="3/h", store=redis_server.url, store_timeout=1.0)),
        access_log=False,
    )
    in_one_window(HOUR)
    assert statuses(proxy.url, 5) == [200] * 5
    redis_server.start()
    assert wait_until(lambda: statuses(proxy.url, 1) == [429], timeout=10)


def test_redis_going_away_fails_closed_with_on_store_error_deny(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    limit = f.RateLimit(
        rate="3/h", store=redis_server.url, store_timeout=1.0, on_store_error="deny"
    )
    proxy = ferroxy_proxy(app(ferroxy_upstream, limit), access_log=False)
    in_one_window(HOUR)
    assert statuses(proxy.url, 1) == [200]
    redis_server.stop()
    with httpx.Client(base_url=proxy.url) as client:
        refused = [client.get("/") for _ in range(3)]
    assert [r.status_code for r in refused] == [503] * 3
    assert all(r.headers["retry-after"] == "1" for r in refused)
    assert ferroxy_upstream.requests == 1


@contextlib.contextmanager
def silent_store() -> Iterator[str]:
    """A "Redis" that accepts connections and never answers; yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()
        for sock in held:
            sock.close()


@pytest.mark.parametrize(("on_store_error", "status"), [("allow", 200), ("deny", 503)])
def test_a_store_that_never_answers_costs_a_request_at_most_store_timeout(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, on_store_error: str, status: int
) -> None:
    with silent_store() as url:
        limit = f.RateLimit(
            f.PathPrefix("/limited"),
            rate="1/h",
            store=url,
            store_timeout=0.05,
            on_store_error=on_store_error,
        )
        proxy = ferroxy_proxy(app(ferroxy_upstream, limit), access_log=False)
        with httpx.Client(base_url=proxy.url) as client:
            # The connection to the proxy itself, out of the timings (not limited: the store
            # is untouched).
            assert client.get("/").status_code == 200
            started = time.monotonic()
            assert client.get("/limited").status_code == status
            took = time.monotonic() - started
            # The first waits for the store, and no longer than store_timeout.
            assert 0.04 <= took < 0.05 + 0.25, f"the first limited request took {took:.3f}s"
            # The store is skipped while it fails: the next requests do not each wait for it.
            started = time.monotonic()
            for _ in range(10):
                assert client.get("/limited").status_code == status
            took = time.monotonic() - started
            assert took < 10 * 0.05 / 2, f"10 requests took {took:.3f}s"


class SilencingRelay:
    """A TCP relay to a Redis server; ``silence()`` makes the connections it holds stop
    forwarding (open, but nothing passes: a network path that went dead), while new ones
    forward as before."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.lock = threading.Lock()
        self.live: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client = self.listener.accept()[0]
                server = socket.create_connection(("127.0.0.1", self.target_port))
                silenced = threading.Event()
                with self.lock:
                    self.accepted += 1
                    self.live.append((client, server, silenced))
                for source, sink in ((client, server), (server, client)):
                    args = (source, sink, silenced)
                    threading.Thread(target=self._pump, args=args, daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, silenced: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not silenced.is_set():
                    sink.sendall(data)

    def silence(self) -> None:
        with self.lock:
            for _, _, silenced in self.live:
                silenced.set()

    def close(self) -> None:
        self.listener.close()
        with self.lock:
            for client, server, _ in self.live:
                client.close()
                server.close()


def test_a_store_connection_gone_silent_is_replaced_and_costs_requests_little_meanwhile(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    relay = SilencingRelay(redis_server.port)
    try:
        limit = f.RateLimit(
            f.PathPrefix("/limited"), rate="1/h", store=relay.url, store_timeout=0.05
        )
        proxy = ferroxy_proxy(app(ferroxy_upstream, limit), access_log=False)
        in_one_window(HOUR)

        def refused() -> bool:
            return statuses(proxy.url, 1, path="/limited") == [429]

        # Once the store is in use it counts one and refuses the next (a request skipping
        # it while the connection is made passes, uncounted).
        assert wait_until(refused, timeout=5)
        connections = relay.accepted
        relay.silence()
        with httpx.Client(base_url=proxy.url) as client:
            assert client.get("/").status_code == 200  # the connection to the proxy itself
            started = time.monotonic()
            # The store would refuse it: it passes because it got no answer (fail open)...
            assert client.get("/limited").status_code == 200
            took = time.monotonic() - started
            # ...after waiting store_timeout for one.
            assert 0.04 <= took < 0.05 + 0.25, f"the first limited request took {took:.3f}s"
            started = time.monotonic()
            during = [client.get("/limited").status_code for _ in range(19)]
            took = time.monotonic() - started
        # The rest skip the store, silent as long as the timeout.
        assert during == [200] * 19
        assert took < 19 * 0.05 / 2, f"19 requests took {took:.3f}s"
        # The silent connection is dropped and a new one made: the limit applies again.
        assert wait_until(refused, timeout=5)
        assert relay.accepted > connections
    finally:
        relay.close()


def test_adding_an_unrelated_filter_keeps_a_limits_store_name(
    ferroxy_upstream: EchoServer, ferroxy_proxy: Any, redis_server: RedisServer
) -> None:
    def limit() -> f.RateLimit:
        return f.RateLimit(
            f.PathPrefix("/login"), rate="2/h", store=redis_server.url, store_timeout=1.0
        )

    # The default name does not depend on the filter's place in the list: two instances of
    # one service, one a version with a filter more, still share the login budget.
    before = ferroxy_proxy(app(ferroxy_upstream, limit()), access_log=False)
    after = ferroxy_proxy(
        app(ferroxy_upstream, f.SetRequestHeader("x-version", "2"), limit()),
        access_log=False,
    )
    in_one_window(HOUR)
    assert statuses(before.url, 2, path="/login") == [200, 200]
    assert statuses(after.url, 1, path="/login") == [429]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rate": "100"}, "rate"),
        ({"rate": "0/s"}, "rate"),
        ({"rate": "10/d"}, "rate"),
        ({"rate": "10/s", "key": "ip"}, "key"),
        ({"rate": "10/s", "key": "header:"}, "key"),
        ({"rate": "10/s", "burst": -1}, "burst"),
        ({"rate": "10/s", "status": 302}, "status"),
        ({"rate": "10/s", "store": "http://127.0.0.1:6379"}, "store"),
        ({"rate": "10/s", "store": "redis://"}, "store"),
        ({"rate": "10/s", "on_store_error": "maybe"}, "on_store_error"),
        ({"rate": "10/s", "store_timeout": 0}, "store_timeout"),
        ({"rate": "10/s", "store_timeout": -1}, "store_timeout"),
        ({"rate": "92/h", "burst": 471416701}, "burst"),
        ({"rate": "10/s", "store": "redis://127.0.0.1:6379", "name": "two words"}, "name"),
        ({"rate": "10/s", "name": "api"}, "name"),
    ],
)
def test_bad_configs_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^RateLimit\.{field}: "):
        f.RateLimit(**options)
