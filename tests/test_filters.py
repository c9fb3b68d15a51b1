"""Declarative filters (issue 9) through the proxy over real sockets: each condition and action,
IPv6 client addresses, regex captures in templates, body limits, and the order against the
Python hooks (a filter that answers runs none but logging). The echo upstream reports what it
was sent."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import wait_until
from ferroxy import Proxy, ProxyError, ResponseHeader, Route, Session
from ferroxy import filters as f
from ferroxy.testing import EchoServer, request, simulate


def app(upstream: EchoServer, *filters: f.Filter, **hooks: Any) -> type[Proxy]:
    return type("App", (Proxy,), {"upstream": upstream.addr, "filters": list(filters), **hooks})


def test_deny_by_client_ip_answers_before_the_upstream(ferroxy_upstream, ferroxy_proxy) -> None:
    denied = ferroxy_proxy(
        app(ferroxy_upstream, f.Deny(f.ClientIP(not_in=["10.0.0.0/8"]), status=403)),
        access_log=False,
    )
    r = httpx.get(denied.url + "/x")
    assert (r.status_code, r.text) == (403, "403 Forbidden\n")
    assert ferroxy_upstream.requests == 0
    allowed = ferroxy_proxy(
        app(ferroxy_upstream, f.Deny(f.ClientIP(not_in=["10.0.0.0/8", "127.0.0.1"]))),
        access_log=False,
    )
    assert httpx.get(allowed.url + "/x").json()["path"] == "/x"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_client_ip_matches_ipv6_networks(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.Deny(f.ClientIP(in_=["::1/128"]), status=451)),
        listen=["[::1]:0", "127.0.0.1:0"],
        access_log=False,
    )
    v6, v4 = proxy.addrs
    assert httpx.get(f"http://{v6}/").status_code == 451
    assert httpx.get(f"http://{v4}/").status_code == 200


CONDITIONS = [
    (f.Method("POST", "put"), {"method": "PUT"}, {"method": "GET"}),
    (f.Path("/exact"), {"path": "/exact"}, {"path": "/exact/more"}),
    (f.PathPrefix("/api/"), {"path": "/api/users"}, {"path": "/apix"}),
    (f.PathRegex(r"^/items/\d+$"), {"path": "/items/42"}, {"path": "/items/x"}),
    (f.Host("api.example.com"), {"host": "API.example.com:8080"}, {"host": "example.com"}),
    (f.Host("*.example.com"), {"host": "www.example.com"}, {"host": "example.com"}),
    (f.Header("x-debug"), {"headers": {"x-debug": ""}}, {"headers": {}}),
    (
        f.Header("x-env", equals="prod"),
        {"headers": {"x-env": "prod"}},
        {"headers": {"x-env": "Prod"}},
    ),
    (f.Header("user-agent", regex="(?i)bot"), {"headers": {"user-agent": "GoodBot/1"}}, {}),
    (f.Query("debug", equals="1"), {"path": "/?a=2&debug=1"}, {"path": "/?debugx=1"}),
    (f.Cookie("session", regex="^adm-"), {"headers": {"cookie": "a=1; session=adm-7"}}, {}),
    (f.All(f.Method("GET"), f.PathPrefix("/a")), {"path": "/a"}, {"method": "POST", "path": "/a"}),
    (f.Any(f.Path("/a"), f.Path("/b")), {"path": "/b"}, {"path": "/c"}),
    (f.Not(f.PathPrefix("/public/")), {"path": "/private"}, {"path": "/public/x"}),
]


def _send(
    client: httpx.Client, method: str = "GET", path: str = "/", **extra: Any
) -> httpx.Response:
    headers = dict(extra.get("headers", {}))
    if "host" in extra:
        headers["host"] = extra["host"]
    return client.request(method, path, headers=headers)


@pytest.mark.parametrize(
    ("condition", "matching", "other"), CONDITIONS, ids=[repr(c[0]) for c in CONDITIONS]
)
def test_each_condition(ferroxy_upstream, ferroxy_proxy, condition, matching, other) -> None:
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.Respond(condition, status=200, body="hit")), access_log=False
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert _send(client, **matching).text == "hit"
        # Not answered by the filter: proxied, so the echo's JSON.
        assert "path" in _send(client, **other).json()


def test_respond_sends_its_headers(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Respond(
                f.Path("/healthz"),
                body='{"ok": true}',
                headers={"content-type": "application/json", "cache-control": "no-store"},
            ),
        ),
        access_log=False,
    )
    r = httpx.get(proxy.url + "/healthz")
    assert r.json() == {"ok": True}
    assert (r.headers["content-type"], r.headers["cache-control"]) == (
        "application/json",
        "no-store",
    )
    assert ferroxy_upstream.requests == 0


def test_redirect_templates_use_request_values_and_captures(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Redirect(
                f.PathRegex(r"^/old/(?P<rest>.*)$"),
                to="https://{host}/new/{rest}?{query}",
                status=308,
            ),
            f.Redirect(f.Header("x-forwarded-proto", equals="http"), to="https://{host}{path}"),
        ),
        access_log=False,
    )
    with httpx.Client(
        base_url=proxy.url, timeout=10, headers={"host": "shop.example:8080"}
    ) as client:
        r = client.get("/old/a/b?x=1")
        assert (r.status_code, r.headers["location"]) == (308, "https://shop.example/new/a/b?x=1")
        r = client.get("/cart", headers={"x-forwarded-proto": "http"})
        assert (r.status_code, r.headers["location"]) == (302, "https://shop.example/cart")
        assert client.get("/cart").json()["path"] == "/cart"
    assert ferroxy_upstream.requests == 1


def test_request_headers_path_rewrite_and_request_id(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: list[str | None] = []

    def request_filter(self: Proxy, session: Session, ctx: object) -> None:
        seen.append(session.request_id)

    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.RequestId(),
            f.SetRequestHeader("x-copy", "{request_id} {path}"),
            f.AddRequestHeader("x-multi", "second"),
            f.RemoveRequestHeader(f.Header("x-secret", equals="drop"), "x-secret"),
            f.RewritePath(r"^/api/v1/(.*)$", "/v2/{1}"),
            request_filter=request_filter,
        ),
        access_log=False,
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        sent = client.get(
            "/api/v1/users?page=2", headers={"x-multi": "first", "x-secret": "drop"}
        ).json()
        kept = client.get("/", headers={"x-request-id": "from-client"}).json()
    request_id = sent["headers"]["x-request-id"]
    assert re.fullmatch("[0-9a-f]{32}", request_id)
    assert sent["headers"]["x-copy"] == f"{request_id} /api/v1/users"
    assert sent["headers"]["x-multi"] == "first, second"
    assert "x-secret" not in sent["headers"]
    assert (sent["path"], sent["query"]) == ("/v2/users", "page=2")
    assert kept["headers"]["x-request-id"] == "from-client"
    assert seen == [request_id, "from-client"]


def test_the_access_log_names_the_id_a_filter_gave(
    ferroxy_upstream, ferroxy_proxy, tmp_path
) -> None:
    log = tmp_path / "access.log"
    proxy = ferroxy_proxy(
        app(ferroxy_upstream, f.RequestId()), access_log=str(log), access_log_format="json"
    )
    sent = httpx.get(proxy.url + "/").json()
    assert wait_until(lambda: log.exists() and log.read_text(), timeout=5)
    [line] = log.read_text().splitlines()
    assert json.loads(line)["request_id"] == sent["headers"]["x-request-id"]


def test_response_filters_run_after_response_filter(ferroxy_upstream, ferroxy_proxy) -> None:
    def response_filter(self: Proxy, session: Session, resp: ResponseHeader, ctx: object) -> None:
        resp.headers["x-from-hook"] = "1"
        resp.headers["x-served-by"] = "hook"

    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.RemoveResponseHeader("x-from-hook"),
            f.SetResponseHeader("x-served-by", "filter"),
            f.AddResponseHeader(f.PathPrefix("/tagged"), "x-tag", "{path}"),
            response_filter=response_filter,
        ),
        access_log=False,
    )
    r = httpx.get(proxy.url + "/tagged/1")
    assert "x-from-hook" not in r.headers
    assert r.headers["x-served-by"] == "filter"
    assert r.headers["x-tag"] == "/tagged/1"
    assert "x-tag" not in httpx.get(proxy.url + "/other").headers


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"x" * size


def test_max_body_size_known_length_and_streamed(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(app(ferroxy_upstream, f.MaxBodySize(4096)), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/", content=b"x" * 4096).json()["body_length"] == 4096
        assert client.post("/", content=b"x" * 4097).status_code == 413
        assert ferroxy_upstream.requests == 1
        # Chunked: no length known up front; refused once the stream crosses the limit.
        assert client.post("/", content=_chunks(2048)).json()["body_length"] == 2048
        assert client.post("/", content=_chunks(64 * 1024)).status_code == 413


def test_a_filter_that_answers_runs_no_hook_but_logging(ferroxy_upstream, ferroxy_proxy) -> None:
    calls: list[str] = []

    def request_filter(self: Proxy, session: Session, ctx: object) -> None:
        calls.append("request_filter")

    def response_filter(self: Proxy, session: Session, resp: ResponseHeader, ctx: object) -> None:
        calls.append("response_filter")

    def logging(self: Proxy, session: Session, error: ProxyError | None, ctx: object) -> None:
        calls.append(f"logging {session.req.path}")

    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Respond(f.Path("/healthz"), body=b"ok"),
            request_filter=request_filter,
            response_filter=response_filter,
            logging=logging,
        ),
        access_log=False,
    )
    assert httpx.get(proxy.url + "/healthz").text == "ok"
    wait_until(lambda: calls == ["logging /healthz"])
    assert httpx.get(proxy.url + "/other").status_code == 200
    wait_until(lambda: calls[1:] == ["request_filter", "response_filter", "logging /other"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: f.Redirect(to="https://{hots}{path}"), "Redirect.to: unknown placeholder {hots}"),
        (lambda: f.Redirect(f.Path("/a"), to="/b/{1}"), "Redirect.to: unknown placeholder {1}"),
        (lambda: f.Redirect(to="/", status=200), "Redirect.status: must be 300..=399, got 200"),
        (lambda: f.Deny(status=101), "Deny.status: must be 200..=599, got 101"),
        (lambda: f.Respond(status=1000), "Respond.status: 1000 is not a status"),
        (lambda: f.PathRegex("(unclosed"), "PathRegex.pattern: regex parse error"),
        (lambda: f.Header("x", regex="["), "Header.regex: regex parse error"),
        (
            lambda: f.ClientIP(not_in=["10.0.0.0/8", "10.0.0.0/33"]),
            'ClientIP.not_in[1]: "10.0.0.0/33"',
        ),
        (lambda: f.RewritePath("^/a/(.*)$", "/b/{2}"), "RewritePath.to: unknown placeholder {2}"),
        (lambda: f.RewritePath("^/a$", "b"), "RewritePath.to: must start with '/'"),
        (lambda: f.SetRequestHeader("bad name", "v"), 'SetRequestHeader.name: "bad name"'),
        (lambda: f.Path("no-slash"), "Path.path: must start with '/'"),
        (lambda: f.MaxBodySize(-1), "MaxBodySize.max_bytes must be an int >= 0"),
        (
            lambda: f.Respond(headers={"bad name": "v"}),
            'Respond.headers["bad name"]: is not a valid header name',
        ),
        (
            lambda: f.Respond(headers={"x-a": "line\nbreak"}),
            'Respond.headers["x-a"]: is not a valid header value',
        ),
        (
            lambda: f.Respond(headers={"Content-Length": "5"}),
            'Respond.headers["content-length"]: is set by the engine',
        ),
        (
            lambda: f.Respond(headers={"connection": "close"}),
            'Respond.headers["connection"]: is set by the engine',
        ),
    ],
)
def test_bad_filters_name_the_filter_and_field(make, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_a_non_filter_in_filters_is_named(ferroxy_upstream, ferroxy_proxy) -> None:
    bad = type(
        "Bad", (Proxy,), {"upstream": ferroxy_upstream.addr, "filters": [f.RequestId(), "x"]}
    )
    with pytest.raises(TypeError, match=re.escape("Bad.filters[1] must be a Filter, not str")):
        ferroxy_proxy(bad)


def test_simulate_runs_the_filters_and_routes() -> None:
    class App(Proxy):
        routes = (Route(path_prefix="/api/", upstream="127.0.0.1:9", strip_prefix=True),)
        filters = (f.Respond(f.Path("/healthz"), body=b"ok"),)

    out = simulate(App, request("GET", "/healthz"))
    assert (out.status, out.body, out.upstream_request) == (200, b"ok", None)
    out = simulate(App, request("GET", "/api/users?x=1"))
    assert out.upstream_request is not None and out.peer is not None
    assert (out.upstream_request.uri, out.peer.addr) == ("/users?x=1", "127.0.0.1:9")
