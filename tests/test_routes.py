"""Routes (issue 9) over real sockets: by host (exact, wildcard, any), longest prefix, regex in
list order and a default, strip_prefix, `session.route`, and a Python upstream_peer that
overrides them. Three echo upstreams tell who served each request and what path it got."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from conftest import free_port, served_by, wait_until
from ferroxy import LoadBalancer, Peer, Proxy, ProxyError, Route, Session


def routed(routes: list[Route], **attrs: Any) -> type[Proxy]:
    return type("Routed", (Proxy,), {"routes": routes, **attrs})


def test_host_then_longest_prefix_then_regex_then_default(upstreams, ferroxy_proxy) -> None:
    api, web, other = upstreams
    proxy = ferroxy_proxy(
        routed(
            [
                Route(
                    host="api.example.com", path_prefix="/v1/", upstream=api.addr, strip_prefix=True
                ),
                Route(host="api.example.com", path_prefix="/v1/admin/", upstream=other.addr),
                Route(host="*.example.com", path_prefix="/", upstream=other.addr),
                Route(path_regex=r"^/static/.*\.(css|js)$", upstream=LoadBalancer([web.addr])),
                Route(upstream=Peer(web.addr)),
            ]
        ),
        access_log=False,
    )

    def get(host: str, path: str) -> tuple[list[int], str]:
        before = served_by(upstreams)
        sent = httpx.get(proxy.url + path, headers={"host": host}).json()
        after = served_by(upstreams)
        return [b - a for a, b in zip(before, after, strict=True)], sent["path"]

    assert get("api.example.com", "/v1/users?x=1") == ([1, 0, 0], "/users")
    assert get("API.example.com:443", "/v1/admin/keys") == ([0, 0, 1], "/v1/admin/keys")
    # The exact host has no route for this path: the wildcard's, then any host's.
    assert get("api.example.com", "/other") == ([0, 0, 1], "/other")
    assert get("www.example.com", "/v1/users") == ([0, 0, 1], "/v1/users")
    assert get("example.com", "/static/app.css") == ([0, 1, 0], "/static/app.css")
    assert get("example.com", "/anything") == ([0, 1, 0], "/anything")


def test_session_route_is_the_route_that_matched(upstreams, ferroxy_proxy) -> None:
    routes = [Route(path_prefix="/a/", upstream=upstreams[0].addr)]
    seen: list[Route | None] = []

    def logging(self: Proxy, session: Session, error: ProxyError | None, ctx: object) -> None:
        seen.append(session.route)

    proxy = ferroxy_proxy(
        routed(routes, upstream=upstreams[1].addr, logging=logging), access_log=False
    )
    assert httpx.get(proxy.url + "/a/1").status_code == 200
    # No route matches: the app's `upstream`.
    assert httpx.get(proxy.url + "/b").status_code == 200
    assert served_by(upstreams) == [1, 1, 0]
    wait_until(lambda: len(seen) == 2)
    assert seen[0] is routes[0] and seen[1] is None


def test_no_route_and_no_upstream_is_404(upstreams, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(routed([Route(path_prefix="/a/", upstream=upstreams[0].addr)]))
    assert httpx.get(proxy.url + "/b").status_code == 404
    assert served_by(upstreams) == [0, 0, 0]


def test_a_python_upstream_peer_overrides_routes(upstreams, ferroxy_proxy) -> None:
    chosen: list[str] = []

    def upstream_peer(self: Proxy, session: Session, ctx: object) -> str:
        route = session.route
        assert route is not None
        chosen.append(route.path_prefix or "")
        return upstreams[2].addr

    routes = [Route(path_prefix="/api/", upstream=upstreams[0].addr, strip_prefix=True)]
    proxy = ferroxy_proxy(routed(routes, upstream_peer=upstream_peer), access_log=False)
    # The hook chose the backend; the route still strips its prefix.
    assert httpx.get(proxy.url + "/api/x").json()["path"] == "/x"
    assert served_by(upstreams) == [0, 0, 1]
    assert chosen == ["/api/"]


def test_routes_and_upstream_request_filter(upstreams, ferroxy_proxy) -> None:
    """upstream_request_filter sees the head with the prefix already stripped."""

    def request_filter(self: Proxy, session: Session, ctx: object) -> None:
        return None

    def upstream_request_filter(self: Proxy, session: Session, head: Any, ctx: object) -> None:
        head.headers["x-seen-path"] = head.path

    routes = [Route(path_prefix="/api", upstream=upstreams[0].addr, strip_prefix=True)]
    proxy = ferroxy_proxy(
        routed(
            routes,
            request_filter=request_filter,
            upstream_request_filter=upstream_request_filter,
        ),
        access_log=False,
    )
    sent = httpx.get(proxy.url + "/api/users").json()
    assert sent["path"] == "/users"
    assert sent["headers"]["x-seen-path"] == "/users"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"path_regex": "(", "upstream": "127.0.0.1:1"},
            ValueError,
            "Route.path_regex: regex parse error",
        ),
        (
            {"strip_prefix": True, "upstream": "127.0.0.1:1"},
            ValueError,
            "Route.strip_prefix: needs a path_prefix",
        ),
        (
            {"path_prefix": "v1", "upstream": "127.0.0.1:1"},
            ValueError,
            "Route.path_prefix: must start with '/'",
        ),
        ({"host": "bad host", "upstream": "127.0.0.1:1"}, ValueError, 'Route.host: "bad host"'),
        ({"upstream": 5}, TypeError, "Route.upstream must be a Peer"),
    ],
)
def test_bad_routes_name_the_field(kwargs, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        Route(**kwargs)


def test_an_app_needs_upstream_routes_or_upstream_peer(ferroxy_proxy) -> None:
    with pytest.raises(TypeError, match="must set `upstream` or `routes`"):
        ferroxy_proxy(routed([]))


def test_a_routes_balancer_retries_on_its_other_backends(upstreams, ferroxy_proxy) -> None:
    dead = f"127.0.0.1:{free_port()}"
    pool = LoadBalancer([dead, upstreams[0].addr], max_retries=1)
    proxy = ferroxy_proxy(routed([Route(path_prefix="/", upstream=pool)]), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert [client.get(f"/{i}").status_code for i in range(10)] == [200] * 10
    assert served_by(upstreams) == [10, 0, 0]
