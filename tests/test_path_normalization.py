"""Path normalization over real sockets: other spellings of a path a filter guards (escapes,
repeated slashes, dot segments) get the filter's answer and never reach the upstream; routes
match, hooks read and the upstream receives the canonical path; paths with no canonical form
get 400; an app with neither filters nor routes forwards the path as sent. Requests are
written by hand: HTTP clients would normalize some of these spellings themselves."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import RawResponse, raw_connect, read_response, served_by, simple_request
from ferroxy import Proxy, Route, Session
from ferroxy import filters as f
from test_basic_auth import OPS_ARGON2ID, basic

BYPASSES = ["/%61dmin/panel", "//admin/panel", "/./admin/panel", "/x/../admin/panel"]
MORE_SPELLINGS = [
    "/%2e/admin/panel",
    "/x/%2E%2e/admin//panel",
    "/admin/./panel",
    "/ADMIN/../admin/panel",
]


def send(port: int, target: str, headers: dict[str, str] | None = None) -> RawResponse:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    with raw_connect(port) as sock:
        sock.sendall(simple_request("GET", target, extra=extra + "connection: close\r\n"))
        return read_response(sock.makefile("rb"))


@pytest.mark.parametrize(
    ("guard", "status"),
    [
        (f.BasicAuth(f.PathPrefix("/admin/"), users={"ops": OPS_ARGON2ID}), 401),
        (f.Deny(f.PathPrefix("/admin/"), status=403), 403),
    ],
    ids=["basic-auth", "deny"],
)
@pytest.mark.parametrize("target", BYPASSES + MORE_SPELLINGS)
def test_other_spellings_of_a_guarded_path_get_the_filters_answer(
    ferroxy_upstream, ferroxy_proxy, guard: f.Filter, status: int, target: str
) -> None:
    app = type("App", (Proxy,), {"upstream": ferroxy_upstream.addr, "filters": [guard]})
    proxy = ferroxy_proxy(app, access_log=False)
    assert send(proxy.port, target).status == status
    assert ferroxy_upstream.requests == 0
    # Paths beside the guarded one still go through.
    assert send(proxy.port, "/x/../public/%61").json()["path"] == "/public/a"


def test_the_upstream_receives_the_path_the_filters_let_through(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    seen: list[str] = []

    def request_filter(self: Proxy, session: Session, ctx: object) -> None:
        seen.append(session.req.path)

    app = type(
        "App",
        (Proxy,),
        {
            "upstream": ferroxy_upstream.addr,
            "filters": [f.BasicAuth(f.PathPrefix("/admin/"), users={"ops": OPS_ARGON2ID})],
            "request_filter": request_filter,
        },
    )
    proxy = ferroxy_proxy(app, access_log=False)
    got = send(proxy.port, "//x/../%61dmin/p%61nel%2fraw?next=/a/../b", basic("ops", "s3cret"))
    assert got.status == 200
    # `%2F` stays encoded (it is data, not a separator); the query is untouched.
    assert (got.json()["path"], got.json()["query"]) == ("/admin/panel%2Fraw", "next=/a/../b")
    assert seen == ["/admin/panel%2Fraw"]


def test_routes_match_the_canonical_path_and_forward_it(upstreams, ferroxy_proxy) -> None:
    api, web, _ = upstreams
    routes = [Route(path_prefix="/api/", upstream=api.addr), Route(upstream=web.addr)]
    proxy = ferroxy_proxy(type("Routed", (Proxy,), {"routes": routes}), access_log=False)

    def get(target: str) -> tuple[list[int], Any]:
        before = served_by(upstreams)
        got = send(proxy.port, target)
        after = served_by(upstreams)
        return [b - a for a, b in zip(before, after, strict=True)], got.json()["path"]

    assert get("/static/../api/%75sers") == ([1, 0, 0], "/api/users")
    assert get("//api//users/") == ([1, 0, 0], "/api/users/")
    assert get("/%61pi%2fusers") == ([0, 1, 0], "/api%2Fusers")


@pytest.mark.parametrize("target", ["/../admin/panel", "/a/../../admin", "/%2e%2e/admin", "/a%zz"])
def test_a_path_with_no_canonical_form_gets_400(ferroxy_upstream, ferroxy_proxy, target) -> None:
    app = type(
        "App",
        (Proxy,),
        {"upstream": ferroxy_upstream.addr, "filters": [f.Deny(f.PathPrefix("/admin/"))]},
    )
    proxy = ferroxy_proxy(app, access_log=False)
    assert send(proxy.port, target).status == 400
    assert ferroxy_upstream.requests == 0


def test_without_filters_or_routes_the_path_goes_upstream_as_sent(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    app = type("App", (Proxy,), {"upstream": ferroxy_upstream.addr})
    proxy = ferroxy_proxy(app, access_log=False)
    for target in ["/x/../a//b/./%61%2f", "/../above"]:
        assert send(proxy.port, target).json()["path"] == target
