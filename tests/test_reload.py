"""Live reload of filters and routes (issue 9) over real sockets: ``self.reload(...)`` from a
hook and from another thread, the swap atomic under load, requests in flight finishing on the
old set, a bad reload changing nothing, and the new routes' balancers checked."""

from __future__ import annotations

import itertools
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import free_port, wait_until
from ferroxy import HealthCheck, LoadBalancer, Proxy, ProxyError, Response, Route, Session
from ferroxy import filters as f
from ferroxy.testing import EchoServer


def tagged(tag: str) -> list[f.Filter]:
    """A set whose every answer says which set it was: a header on the request the upstream
    echoes, and one on the response."""
    return [f.SetRequestHeader("x-set", tag), f.SetResponseHeader("x-set", tag)]


class Recording(Proxy):
    """Keeps the ``session.route`` of each request, by its ``x-id`` header, else by path."""

    def __init__(self, upstream: EchoServer, filters: list[f.Filter], routes: list[Route]):
        self.upstream = upstream.addr
        self.filters = filters
        self.routes = routes
        self.route_of: dict[str, Route | None] = {}

    def logging(self, session: Session, error: ProxyError | None, ctx: object) -> None:
        self.route_of[session.req.headers.get("x-id") or session.req.path] = session.route


def test_reload_from_another_thread_swaps_filters_and_routes(upstreams, ferroxy_proxy) -> None:
    first, second, default = upstreams
    old_route = Route(path_prefix="/p/", upstream=first.addr)
    app = Recording(default, tagged("old"), [old_route])
    proxy = ferroxy_proxy(app, access_log=False)
    r = httpx.get(proxy.url + "/p/1")
    assert (r.headers["x-set"], first.requests) == ("old", 1)

    new_route = Route(path_prefix="/p/", upstream=second.addr, strip_prefix=True)
    reloader = threading.Thread(
        target=app.reload, kwargs={"filters": tagged("new"), "routes": [new_route]}
    )
    reloader.start()
    reloader.join()
    r = httpx.get(proxy.url + "/p/2")
    assert r.headers["x-set"] == "new"
    assert r.json()["headers"]["x-set"] == "new"
    assert (r.json()["path"], second.requests, first.requests) == ("/2", 1, 1)
    wait_until(lambda: "/p/2" in app.route_of)
    assert app.route_of["/p/1"] is old_route
    assert app.route_of["/p/2"] is new_route
    assert (app.filters, app.routes) == (tuple(tagged("new")), (new_route,))

    # One list given, the other kept: the routes stay; no filters at all.
    app.reload(filters=[])
    r = httpx.get(proxy.url + "/p/3")
    assert "x-set" not in r.headers and r.json()["path"] == "/3"
    # No routes: the app's upstream.
    app.reload(routes=[])
    r = httpx.get(proxy.url + "/p/4")
    assert (r.json()["path"], default.requests) == ("/p/4", 1)
    wait_until(lambda: "/p/4" in app.route_of)
    assert app.route_of["/p/4"] is None


def test_reload_from_a_hook(ferroxy_upstream, ferroxy_proxy) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr
        filters = (f.Respond(f.Path("/healthz"), body=b"old"),)

        def request_filter(self, session: Session, ctx: object) -> Response | None:
            if session.req.path == "/reload":
                self.reload(filters=[f.Respond(f.Path("/healthz"), body=b"new")])
                return Response(200, body=b"reloaded")
            return None

    proxy = ferroxy_proxy(App, access_log=False)
    assert httpx.get(proxy.url + "/healthz").content == b"old"
    assert httpx.get(proxy.url + "/reload").content == b"reloaded"
    assert httpx.get(proxy.url + "/healthz").content == b"new"


def test_every_answer_under_load_comes_whole_from_one_set(upstreams, ferroxy_proxy) -> None:
    """Client threads send requests without pause while another thread reloads back and
    forth between two sets: every request is answered, each answer entirely by one set (its
    request header, its route's path and upstream, its response header agree)."""
    a_upstream, b_upstream, default = upstreams
    sets: dict[str, dict[str, Any]] = {
        "a": {
            "filters": tagged("a"),
            "routes": [Route(path_prefix="/p/", upstream=a_upstream.addr, strip_prefix=True)],
        },
        "b": {
            "filters": tagged("b"),
            "routes": [Route(path_prefix="/p/", upstream=b_upstream.addr)],
        },
    }
    expected_path = {"a": "/x", "b": "/p/x"}
    app = Recording(default, **sets["a"])
    proxy = ferroxy_proxy(app, access_log=False, threads=2)
    stop = threading.Event()
    answers: Counter[str] = Counter()
    failures: list[str] = []
    # The set that answered each request, by request id: its session.route must be that set's.
    tag_of: dict[str, str] = {}
    ids = itertools.count()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=proxy.url) as http:
            while not stop.is_set():
                request_id = str(next(ids))
                try:
                    r = http.get("/p/x", headers={"x-id": request_id})
                    tag = r.headers.get("x-set", "?")
                    tag_of[request_id] = tag
                    body = r.json()
                    whole = (
                        r.status_code == 200
                        and body["headers"].get("x-set") == tag
                        and body["path"] == expected_path.get(tag)
                    )
                except Exception as error:  # each failure is reported below
                    whole, tag = False, repr(error)
                with lock:
                    answers[tag] += 1
                    if not whole:
                        failures.append(tag)

    def total() -> int:
        with lock:
            return sum(answers.values())

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        reloads = 60
        for i in range(reloads):
            # Some requests between two reloads, so that they interleave with traffic.
            seen = total()
            wait_until(lambda seen=seen: total() >= seen + 5, timeout=10)
            app.reload(**sets["ab"[i % 2 == 0]])
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert answers["a"] > 0 and answers["b"] > 0 and set(answers) == {"a", "b"}
    # Every request reached the upstream its set routes to, none elsewhere.
    assert (a_upstream.requests, b_upstream.requests, default.requests) == (
        answers["a"],
        answers["b"],
        0,
    )
    # The logging hook runs after the client has its answer.
    wait_until(lambda: tag_of.keys() <= app.route_of.keys(), timeout=10)
    wrong_route = [i for i, tag in tag_of.items() if app.route_of[i] is not sets[tag]["routes"][0]]
    assert wrong_route == []


def test_a_request_in_flight_finishes_on_the_set_it_began_with(upstreams, ferroxy_proxy) -> None:
    old_upstream, new_upstream, default = upstreams
    old_route, new_route = Route(upstream=old_upstream.addr), Route(upstream=new_upstream.addr)
    app = Recording(default, tagged("old"), [old_route])
    proxy = ferroxy_proxy(app, access_log=False)
    slow: dict[str, httpx.Response] = {}
    in_flight = threading.Thread(
        target=lambda: slow.setdefault("r", httpx.get(proxy.url + "/delay/500"))
    )
    in_flight.start()
    wait_until(lambda: old_upstream.requests == 1)
    app.reload(filters=tagged("new"), routes=[new_route])
    fresh = httpx.get(proxy.url + "/fresh")
    in_flight.join()
    assert (fresh.headers["x-set"], new_upstream.requests) == ("new", 1)
    # Its response filter is the old set's, as was its route.
    assert (slow["r"].status_code, slow["r"].headers["x-set"]) == (200, "old")
    # The logging hook runs after the client has its answer.
    wait_until(lambda: {"/delay/500", "/fresh"} <= app.route_of.keys())
    assert app.route_of["/delay/500"] is old_route
    assert app.route_of["/fresh"] is new_route


def test_a_bad_reload_raises_and_the_old_set_keeps_serving(ferroxy_upstream, ferroxy_proxy) -> None:
    app = Recording(ferroxy_upstream, tagged("old"), [])
    proxy = ferroxy_proxy(app, access_log=False)
    # Made good, then broken: what only the engine's own check at reload can catch.
    broken = f.Redirect(f.Path("/r"), to="/ok")
    broken.to = "/{hots}"  # type: ignore[misc]
    good_routes = [Route(path_prefix="/other/", upstream="127.0.0.1:9")]
    with pytest.raises(ValueError, match=re.escape("filters[1]: Redirect.to: unknown placeholder")):
        app.reload(filters=[f.RequestId(), broken], routes=good_routes)
    with pytest.raises(TypeError, match=re.escape("Recording.routes[0] must be a Route, not str")):
        app.reload(filters=tagged("new"), routes=["/x"])  # type: ignore[list-item]
    r = httpx.get(proxy.url + "/other/x")
    assert (r.status_code, r.headers["x-set"]) == (200, "old")
    assert app.filters == tagged("old") and app.routes == []


def test_reload_needs_a_running_server(ferroxy_upstream) -> None:
    from ferroxy import ProxyServer

    app = Recording(ferroxy_upstream, [], [])
    with pytest.raises(RuntimeError, match="Recording is not being served"):
        app.reload(filters=tagged("new"))
    with ProxyServer(app, access_log=False) as proxy:
        app.reload(filters=tagged("new"))
        assert httpx.get(proxy.url + "/").headers["x-set"] == "new"
    with pytest.raises(RuntimeError, match="Recording is not being served"):
        app.reload(filters=tagged("newer"))


def test_a_reloaded_routes_balancer_gets_its_health_checks(upstreams, ferroxy_proxy) -> None:
    app = Recording(upstreams[0], [], [])
    ferroxy_proxy(app, access_log=False)
    dead = f"127.0.0.1:{free_port()}"
    # Named by nothing the server looked at when it started: only the reload brings it in.
    pool = LoadBalancer(
        [upstreams[1].addr, dead],
        health_check=HealthCheck.tcp(interval=0.05, timeout=0.5, unhealthy=1, healthy=1),
    )
    app.reload(routes=[Route(upstream=pool)])
    wait_until(lambda: [b["healthy"] for b in pool.backends()] == [True, False], timeout=5)


class Knocks:
    """Listeners on 127.0.0.1 that count the connections made to each (a TCP health check
    is one)."""

    def __init__(self, count: int) -> None:
        self._listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
        self._counts = [0] * count
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._accept, args=(i,), daemon=True) for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def _accept(self, i: int) -> None:
        while True:
            try:
                connection, _ = self._listeners[i].accept()
            except OSError:  # closed
                return
            connection.close()
            with self._lock:
                self._counts[i] += 1

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self._listeners[i].getsockname()[1]}"

    def counts(self) -> list[int]:
        with self._lock:
            return list(self._counts)

    def close(self) -> None:
        for listener in self._listeners:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join()


@pytest.fixture
def knocks() -> Iterator[Knocks]:
    listeners = Knocks(21)
    yield listeners
    listeners.close()


def test_reloads_stop_the_health_checks_of_the_balancers_they_drop(
    ferroxy_upstream, ferroxy_proxy, knocks: Knocks
) -> None:
    """A watcher that reloads with a new balancer each time: only the one in effect is
    checked; those before it stop being checked, not one more connection each."""
    kept = LoadBalancer(
        [knocks.addr(0)], health_check=HealthCheck.tcp(interval=0.02, healthy=1, unhealthy=1)
    )
    app = Recording(ferroxy_upstream, [], [])
    ferroxy_proxy(app, access_log=False, balancers=[kept])
    for i in range(1, 21):
        pool = LoadBalancer(
            [knocks.addr(i)], health_check=HealthCheck.tcp(interval=0.02, healthy=1, unhealthy=1)
        )
        app.reload(routes=[Route(path_prefix="/kept/", upstream=kept), Route(upstream=pool)])
        wait_until(lambda i=i: knocks.counts()[i] > 0)
    # A reload of the filters alone keeps the routes and their checks.
    app.reload(filters=[])

    def checks_of_the_last() -> int:
        return knocks.counts()[20]

    # Long enough for a check that was under way when its pool was dropped to arrive.
    seen = checks_of_the_last()
    wait_until(lambda: checks_of_the_last() >= seen + 3)
    dropped = knocks.counts()[1:20]
    seen = checks_of_the_last()
    kept_checks = knocks.counts()[0]
    wait_until(lambda: checks_of_the_last() >= seen + 10)
    assert knocks.counts()[1:20] == dropped, "a dropped balancer is still checked"
    # The balancer the server was given, and the one in effect, are still checked.
    wait_until(lambda: knocks.counts()[0] > kept_checks)


def test_reloading_the_same_rate_limit_keeps_its_counts(ferroxy_upstream, ferroxy_proxy) -> None:
    limit = f.RateLimit(rate="3/m")
    app = Recording(ferroxy_upstream, [limit], [])
    proxy = ferroxy_proxy(app, access_log=False)
    with httpx.Client(base_url=proxy.url) as http:
        assert [http.get("/").status_code for _ in range(4)] == [200, 200, 200, 429]
        # The same object in a new list: the new list runs, the count goes on.
        app.reload(filters=[f.SetRequestHeader("x-set", "new"), limit])
        assert http.get("/").status_code == 429
        assert app.filters[0] == f.SetRequestHeader("x-set", "new")
        # A new object, even an equal one, starts afresh.
        app.reload(filters=[f.RateLimit(rate="3/m")])
        assert http.get("/").status_code == 200


def test_one_instance_is_served_by_one_server_at_a_time(ferroxy_upstream, ferroxy_proxy) -> None:
    app = Recording(ferroxy_upstream, [], [])
    ferroxy_proxy(app, access_log=False)
    with pytest.raises(RuntimeError, match="this Recording instance is already being served"):
        ferroxy_proxy(app, access_log=False)
    # The first server still has it: a reload reaches it.
    app.reload(filters=tagged("new"))


def test_concurrent_reloads_leave_the_lists_the_engine_runs(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    app = Recording(ferroxy_upstream, [], [])
    proxy = ferroxy_proxy(app, access_log=False)
    sets = [tagged(str(i)) for i in range(8)]
    threads = [
        threading.Thread(target=lambda s=s: [app.reload(filters=s) for _ in range(20)])
        for s in sets
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    running = httpx.get(proxy.url + "/").headers["x-set"]
    assert app.filters == tuple(tagged(running))


def test_reloading_away_the_only_routes_of_an_app_without_upstream_is_refused(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    class App(Proxy):
        routes = (Route(upstream=ferroxy_upstream.addr),)

    app = App()
    proxy = ferroxy_proxy(app, access_log=False)
    with pytest.raises(ValueError, match="routes: the app has no `upstream`"):
        app.reload(routes=[])
    assert httpx.get(proxy.url + "/x").json()["path"] == "/x"
