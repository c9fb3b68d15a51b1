"""Live reload of filters and routes (issue 9) over real sockets: ``self.reload(...)`` from a
hook and from another thread, the swap atomic under load, requests in flight finishing on the
old set, a bad reload changing nothing, and the new routes' balancers checked."""

from __future__ import annotations

import re
import threading
from collections import Counter
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
    """Keeps the ``session.route`` of each request, by path."""

    def __init__(self, upstream: EchoServer, filters: list[f.Filter], routes: list[Route]):
        self.upstream = upstream.addr
        self.filters = filters
        self.routes = routes
        self.route_of: dict[str, Route | None] = {}

    def logging(self, session: Session, error: ProxyError | None, ctx: object) -> None:
        self.route_of[session.req.path] = session.route


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
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=proxy.url) as http:
            while not stop.is_set():
                try:
                    r = http.get("/p/x")
                    tag = r.headers.get("x-set", "?")
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


def test_a_request_in_flight_finishes_on_the_set_it_began_with(upstreams, ferroxy_proxy) -> None:
    old_upstream, new_upstream, default = upstreams
    app = Recording(default, tagged("old"), [Route(upstream=old_upstream.addr)])
    proxy = ferroxy_proxy(app, access_log=False)
    slow: dict[str, httpx.Response] = {}
    in_flight = threading.Thread(
        target=lambda: slow.setdefault("r", httpx.get(proxy.url + "/delay/500"))
    )
    in_flight.start()
    wait_until(lambda: old_upstream.requests == 1)
    app.reload(filters=tagged("new"), routes=[Route(upstream=new_upstream.addr)])
    fresh = httpx.get(proxy.url + "/fresh")
    in_flight.join()
    assert (fresh.headers["x-set"], new_upstream.requests) == ("new", 1)
    # Its response filter is the old set's, as was its route.
    assert (slow["r"].status_code, slow["r"].headers["x-set"]) == (200, "old")
    assert app.route_of["/delay/500"] is not app.route_of["/fresh"]


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
