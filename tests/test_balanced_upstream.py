"""`upstream = pool` (issue 8): a LoadBalancer as a Proxy's upstream, picked per request in Rust,
with its hash key, in-flight counts, and retries on other backends. Real backends: echo upstreams
on loopback, a port where nothing listens, and a small socket server that resets connections."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import free_port, served_by, wait_until
from ferroxy import LoadBalancer, Peer, Proxy, ProxyError, RequestHeader, Session


def balanced(pool: LoadBalancer, **hooks: Any) -> type[Proxy]:
    """A Proxy class whose upstream is `pool`, with the given hooks."""
    return type("Balanced", (Proxy,), {"upstream": pool, **hooks})


def test_round_robin_as_the_upstream_is_an_exact_rotation(upstreams, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(balanced(LoadBalancer([u.addr for u in upstreams])), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(30):
            before = served_by(upstreams)
            assert client.get(f"/{i}").status_code == 200
            moved = [a - b for a, b in zip(served_by(upstreams), before, strict=True)]
            assert moved.index(1) == i % 3, f"request {i} went to backend {moved.index(1)}"


def test_weighted_shares_over_10000_requests(upstreams, ferroxy_proxy) -> None:
    weights = [1, 2, 3]
    pool = LoadBalancer(
        [(u.addr, w) for u, w in zip(upstreams, weights, strict=True)], strategy="random"
    )
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(10_000):
            assert client.get("/").status_code == 200
    shares = [n / 10_000 for n in served_by(upstreams)]
    for share, weight in zip(shares, weights, strict=True):
        assert share == pytest.approx(weight / 6, abs=0.02), shares


def test_consistent_hash_key_from_a_header(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer(
        [u.addr for u in upstreams], strategy="consistent", hash_key="header:x-user"
    )
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    before = served_by(upstreams)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(12):
            user = f"user-{i}"
            for _ in range(3):
                assert client.get("/", headers={"x-user": user}).status_code == 200
            after = served_by(upstreams)
            moved = [a - b for a, b in zip(after, before, strict=True)]
            assert sorted(moved) == [0, 0, 3], f"{user}'s requests were spread: {moved}"
            # The same backend pool.select(key) names from Python.
            assert upstreams[moved.index(3)].addr == pool.select(key=user).addr
            before = after


def test_least_connections_sends_new_requests_away_from_a_busy_backend(
    upstreams, ferroxy_proxy
) -> None:
    pool = LoadBalancer([u.addr for u in upstreams[:2]], strategy="least_connections")
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with ThreadPoolExecutor(3) as slow:
        holds = []
        for n in range(1, 4):
            holds.append(slow.submit(httpx.get, f"{proxy.url}/delay/2000", timeout=10))
            wait_until(lambda n=n: sum(b["in_flight"] for b in pool.backends()) == n, timeout=5)
        # Three slow requests in flight: two on one backend, one on the other.
        in_flight = {b["addr"]: b["in_flight"] for b in pool.backends()}
        assert sorted(in_flight.values()) == [1, 2]
        quiet = min(in_flight, key=in_flight.__getitem__)
        before = {u.addr: u.requests for u in upstreams[:2]}
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for _ in range(5):
                assert client.get("/").status_code == 200
        after = {u.addr: u.requests for u in upstreams[:2]}
        assert after[quiet] - before[quiet] == 5, "every new request went to the quieter backend"
        assert all(hold.result().status_code == 200 for hold in holds)
    wait_until(lambda: all(b["in_flight"] == 0 for b in pool.backends()), timeout=5)


def test_in_flight_counts_last_until_the_response_ends(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer([upstreams[0].addr])
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        # Larger than the sockets' buffers can hold, so the response is still being sent.
        size = 64 * 1024 * 1024
        with client.stream("GET", f"/bytes/{size}") as response:
            chunks = response.iter_bytes()
            first = next(chunks)
            # The head and the first bytes have come; the body has not ended.
            assert first and pool.backends()[0]["in_flight"] == 1
            rest = sum(len(chunk) for chunk in chunks)
        assert len(first) + rest == size
    assert wait_until(lambda: pool.backends()[0]["in_flight"] == 0, timeout=5)


def test_a_stopped_backend_costs_no_request(upstreams, ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    pool = LoadBalancer([upstreams[0].addr, dead, upstreams[1].addr])
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        statuses = Counter(client.get(f"/{i}").status_code for i in range(1000))
    assert statuses == {200: 1000}
    assert sum(served_by(upstreams)) == 1000


def test_without_retries_a_dead_backend_is_a_502_listing_the_try(ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    seen: list[ProxyError] = []

    def logging(self: Proxy, session: Session, error: ProxyError | None, ctx: Any) -> None:
        if error is not None:
            seen.append(error)

    pool = LoadBalancer([dead], max_retries=0)
    proxy = ferroxy_proxy(balanced(pool, logging=logging), access_log=False)
    assert httpx.get(proxy.url, timeout=10).status_code == 502
    wait_until(lambda: seen, timeout=5)
    assert [t["peer"] for t in seen[0].tries] == [dead]
    assert seen[0].tries[0]["kind"] == "connect_refused"


def test_every_try_is_listed_when_all_backends_are_down(ferroxy_proxy) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    seen: list[ProxyError] = []

    def fail_to_proxy(self: Proxy, session: Session, error: ProxyError, ctx: Any) -> None:
        seen.append(error)

    pool = LoadBalancer(dead, max_retries=2)
    proxy = ferroxy_proxy(balanced(pool, fail_to_proxy=fail_to_proxy), access_log=False)
    assert httpx.get(proxy.url, timeout=10).status_code == 502
    assert sorted(t["peer"] for t in seen[0].tries) == sorted(dead), "each backend tried once"
    assert {t["kind"] for t in seen[0].tries} == {"connect_refused"}


class ResettingBackend:
    """Answers the first request on each connection (keep-alive), reads the second and resets the
    connection without a byte of response: what an upstream that closed an idle connection as
    the request arrived looks like. Counts the requests it read, by method."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: Counter[str] = Counter()
        self.bodies: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, rfile: Any) -> str | None:
        line = rfile.readline()
        if not line:
            return None
        length, chunked = 0, False
        while (header := rfile.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            if name.strip().lower() == "transfer-encoding":
                chunked = "chunked" in value.lower()
        if chunked:
            body = b""
            while size := int(rfile.readline().split(b";")[0], 16):
                body += rfile.read(size)
                rfile.readline()
            rfile.readline()
        else:
            body = rfile.read(length)
        method = line.split()[0].decode()
        with self._lock:
            self.seen[method] += 1
            self.bodies.append(body)
        return method

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            if self._read_request(rfile) is None:
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
            if self._read_request(rfile) is None:
                return
            # SO_LINGER 0: close with a reset, as a crashed or overloaded server does.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def resetting() -> Iterator[ResettingBackend]:
    backend = ResettingBackend()
    yield backend
    backend.close()


def test_a_get_is_resent_after_a_reset_on_a_reused_connection(resetting, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(balanced(LoadBalancer([resetting.addr])), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/one").text == "first"
        # The proxy's pooled connection is reset after this request reached the backend:
        # nothing was answered, GET is idempotent, so it is sent again on a new connection.
        second = client.get("/two")
    assert second.status_code == 200 and second.text == "first"
    assert resetting.seen["GET"] == 3


def test_a_post_is_never_resent_after_it_was_sent(resetting, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(balanced(LoadBalancer([resetting.addr])), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/one", content=b"a").text == "first"
        second = client.post("/two", content=b"b")
    assert second.status_code == 502
    assert resetting.seen["POST"] == 2, "the second POST reached the backend exactly once"


def test_a_put_with_a_small_body_is_resent_whole(resetting, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(balanced(LoadBalancer([resetting.addr])), access_log=False)
    body = bytes(range(256)) * 200  # 51,200 bytes: under the 64 KiB kept for resending
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.put("/one", content=b"x" * 1000).status_code == 200
        assert client.put("/two", content=body).status_code == 200
    assert resetting.seen["PUT"] == 3
    assert resetting.bodies == [b"x" * 1000, body, body], "sent again byte for byte"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"z" * (64 * 1024 + 1), id="over 64 KiB"),
        pytest.param(iter([b"chunk one, ", b"chunk two"]), id="chunked, length unknown"),
    ],
)
def test_a_put_whose_body_was_not_kept_is_never_resent(resetting, ferroxy_proxy, body: Any) -> None:
    proxy = ferroxy_proxy(balanced(LoadBalancer([resetting.addr])), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.put("/one", content=b"x").status_code == 200
        assert client.put("/two", content=body).status_code == 502
    assert resetting.seen["PUT"] == 2, "the second PUT reached the backend exactly once"


def test_try_timeout_bounds_a_try(ferroxy_proxy) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        pool = LoadBalancer([addr], try_timeout=0.3)
        proxy = ferroxy_proxy(balanced(pool), access_log=False)
        started = time.monotonic()
        assert httpx.get(proxy.url, timeout=10).status_code == 504
        assert time.monotonic() - started < 3
    finally:
        silent.close()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"hash_key": "ip"}, "hash_key"),
        ({"hash_key": "header:"}, "hash_key"),
        ({"hash_key": "cookie:"}, "hash_key"),
        ({"max_retries": -1}, "max_retries"),
        ({"try_timeout": 0}, "try_timeout"),
        ({"deadline": -2.0}, "deadline"),
    ],
)
def test_bad_options_name_their_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LoadBalancer(["127.0.0.1:9001"], **options)


def test_upstream_must_be_a_peer_or_a_balancer(ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = 42  # type: ignore[assignment]

    with pytest.raises(TypeError, match="LoadBalancer"):
        ferroxy_proxy(App)


def test_a_peer_chosen_in_a_hook_still_works_beside_a_balancer(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer([upstreams[0].addr])

    class App(Proxy):
        upstream = pool

        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return Peer(upstreams[2].addr)

    proxy = ferroxy_proxy(App, access_log=False)
    assert httpx.get(proxy.url, timeout=10).status_code == 200
    assert served_by(upstreams) == [0, 0, 1]


def test_fail_to_connect_can_veto_a_retry(upstreams, ferroxy_proxy) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    seen: list[tuple[str | None, bool, list[str]]] = []

    def fail_to_connect(
        self: Proxy, session: Session, peer: Peer | None, error: ProxyError, ctx: Any
    ) -> bool | None:
        seen.append((peer.addr if peer else None, error.retry, [t["peer"] for t in error.tries]))
        # Let the first failure retry as the policy says; stop at the second.
        return None if len(seen) == 1 else False

    pool = LoadBalancer([*dead, upstreams[0].addr])
    proxy = ferroxy_proxy(balanced(pool, fail_to_connect=fail_to_connect), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        statuses = [client.get("/").status_code for _ in range(2)]
    # Round robin: the first request meets both dead backends, and the hook stops it at the
    # second, though the policy would have tried the live one.
    assert statuses == [502, 200]
    assert seen == [(dead[0], True, []), (dead[1], True, [dead[0]])], "tries before this one"


def test_async_fail_to_connect_can_force_a_retry_to_a_fixed_peer(upstreams, ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"

    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            # The first try goes to the dead peer; the retry asks again and gets a live one.
            session.ctx = (session.ctx or 0) + 1
            return Peer(dead if session.ctx == 1 else upstreams[1].addr)

        async def fail_to_connect(
            self, session: Session, peer: Peer | None, error: ProxyError, ctx: Any
        ) -> bool:
            assert not error.retry, "a fixed peer has no retry policy"
            return True

    proxy = ferroxy_proxy(App, access_log=False)
    assert httpx.get(proxy.url, timeout=10).status_code == 200
    assert served_by(upstreams) == [0, 1, 0]


def test_a_fail_to_connect_that_raises_is_a_500_and_the_proxy_keeps_serving(
    upstreams, ferroxy_proxy, ferroxy_logs
) -> None:
    dead = f"127.0.0.1:{free_port()}"

    def fail_to_connect(
        self: Proxy, session: Session, peer: Peer | None, error: ProxyError, ctx: Any
    ) -> bool:
        raise RuntimeError("broken hook")

    pool = LoadBalancer([dead, upstreams[0].addr])
    proxy = ferroxy_proxy(balanced(pool, fail_to_connect=fail_to_connect), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/").status_code == 500
        assert client.get("/").status_code == 200
    assert ferroxy_logs.wait_for(lambda r: "broken hook" in ferroxy_logs.text(r))


def test_upstream_request_filter_runs_after_the_pick_once_per_try(upstreams, ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    filtered: list[str] = []

    def request_filter(self: Proxy, session: Session, ctx: Any) -> None:
        session.req.headers["x-seen-by"] = "request_filter"

    def upstream_request_filter(
        self: Proxy, session: Session, upstream_request: RequestHeader, ctx: Any
    ) -> None:
        filtered.append(upstream_request.headers["x-seen-by"])
        upstream_request.headers["x-try"] = str(len(filtered))

    pool = LoadBalancer([dead, upstreams[0].addr])
    App = balanced(
        pool, request_filter=request_filter, upstream_request_filter=upstream_request_filter
    )
    proxy = ferroxy_proxy(App, access_log=False)
    response = httpx.get(proxy.url, timeout=10)
    assert response.status_code == 200
    # The pick sits between the hooks, so they take a trip each, and the filter runs again
    # for the second try (the first went to the dead backend): three trips.
    assert filtered == ["request_filter", "request_filter"]
    assert response.json()["headers"]["x-try"] == "2"
    assert proxy.python_calls == 3


def test_set_backends_under_load_drops_nothing(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer([upstreams[0].addr])
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    lists = [[u.addr for u in upstreams[:2]], [upstreams[2].addr], [u.addr for u in upstreams]]
    stop = threading.Event()

    def load() -> Counter[int]:
        statuses: Counter[int] = Counter()
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            while not stop.is_set():
                statuses[client.get("/delay/5").status_code] += 1
        return statuses

    with ThreadPoolExecutor(8) as clients:
        running = [clients.submit(load) for _ in range(8)]
        for swap in range(60):
            listed = lists[swap % len(lists)]
            pool.set_backends(listed)
            # Let requests run on this list before the next swap.
            served = sum(u.requests for u in upstreams)
            assert wait_until(lambda s=served: sum(u.requests for u in upstreams) > s + 8)
        stop.set()
        statuses = sum((r.result() for r in running), Counter())
    assert set(statuses) == {200}, statuses
    assert all(u.requests > 0 for u in upstreams), "every list served requests"
    wait_until(lambda: all(b["in_flight"] == 0 for b in pool.backends()), timeout=5)


def test_a_pick_returned_from_a_hook_is_tracked_and_retried(upstreams, ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    pool = LoadBalancer([dead, upstreams[0].addr, upstreams[1].addr])

    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return pool.select(key=session.req.headers.get("x-user"))

    proxy = ferroxy_proxy(App, access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        # The pool's retry policy comes with its pick: the dead backend costs no request.
        assert all(client.get(f"/{i}").status_code == 200 for i in range(30))
    assert status_of(pool, dead)["failures"] >= 1, "the failed connect was counted against it"
    with ThreadPoolExecutor(1) as slow:
        hold = slow.submit(httpx.get, f"{proxy.url}/delay/800", timeout=10)
        # In flight on its backend while the response is pending, as with upstream = pool.
        wait_until(lambda: sum(b["in_flight"] for b in pool.backends()) == 1, timeout=5)
        assert hold.result().status_code == 200
    wait_until(lambda: all(b["in_flight"] == 0 for b in pool.backends()), timeout=5)


def status_of(pool: LoadBalancer, addr: str) -> dict[str, Any]:
    return next(b for b in pool.backends() if b["addr"] == addr)


def test_a_deadline_bounds_all_tries(ferroxy_proxy) -> None:
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # accept, never answer
    try:
        addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
        seen: list[ProxyError] = []

        def fail_to_proxy(self: Proxy, session: Session, error: ProxyError, ctx: Any) -> None:
            seen.append(error)

        # A try may take 5 s, but the request only 0.4 s from its arrival.
        pool = LoadBalancer(addrs, try_timeout=5, deadline=0.4)
        proxy = ferroxy_proxy(balanced(pool, fail_to_proxy=fail_to_proxy), access_log=False)
        started = time.monotonic()
        assert httpx.get(proxy.url, timeout=10).status_code == 504
        assert time.monotonic() - started < 3
        assert "deadline" in seen[0].message
    finally:
        for s in silent:
            s.close()


def test_a_backend_that_dies_with_pooled_connections_costs_no_request(
    upstreams, ferroxy_proxy
) -> None:
    pool = LoadBalancer([u.addr for u in upstreams])
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        # Every backend has served, so the proxy holds a pooled connection to each.
        assert all(client.get(f"/{i}").status_code == 200 for i in range(30))
        upstreams[2].stop()
        statuses = Counter(client.get(f"/{i}").status_code for i in range(1000))
    assert statuses == {200: 1000}, "its pooled connections fail; reconnecting fails; retried"
