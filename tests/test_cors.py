"""Cors over real sockets: preflights answered by the proxy (the upstream sees none), the
allow headers on proxied responses, disallowed origins, and the wildcard. The echo upstream
counts what reached it."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from conftest import free_port
from ferroxy import Proxy, ResponseHeader, Session
from ferroxy import filters as f
from ferroxy.testing import EchoServer

APP_ORIGIN = "https://app.example.com"


def app(upstream: EchoServer | str, *filters: f.Filter, **hooks: Any) -> type[Proxy]:
    addr = upstream if isinstance(upstream, str) else upstream.addr
    return type("App", (Proxy,), {"upstream": addr, "filters": list(filters), **hooks})


def allow_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def preflight(client: httpx.Client, origin: str, path: str = "/api/items") -> httpx.Response:
    return client.options(
        path,
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-token",
        },
    )


@pytest.fixture
def api(ferroxy_upstream, ferroxy_proxy) -> Any:
    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Cors(
                f.PathPrefix("/api/"),
                origins=[APP_ORIGIN, "http://localhost:3000"],
                methods=["GET", "post", "DELETE"],
                headers=["content-type", "x-token"],
                expose_headers=["x-total-count"],
                credentials=True,
                max_age=600,
            ),
        ),
        access_log=False,
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        yield client


def test_a_preflight_is_answered_by_the_proxy(ferroxy_upstream, api) -> None:
    r = preflight(api, APP_ORIGIN)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.headers["vary"] == "Origin"
    assert r.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    assert r.headers["access-control-allow-headers"] == "content-type, x-token"
    assert r.headers["access-control-max-age"] == "600"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert ferroxy_upstream.requests == 0


def test_a_preflight_from_another_origin_is_refused_without_allow_headers(
    ferroxy_upstream, api
) -> None:
    r = preflight(api, "https://evil.example")
    assert r.status_code == 403
    assert not [name for name in r.headers if name.startswith("access-control-")]
    assert ferroxy_upstream.requests == 0


def test_actual_requests_are_proxied_with_the_allow_headers(ferroxy_upstream, api) -> None:
    r = api.post("/api/items", headers={"origin": APP_ORIGIN}, content=b"{}")
    assert r.json()["method"] == "POST"
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.headers["access-control-expose-headers"] == "x-total-count"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["vary"] == "Origin"
    assert ferroxy_upstream.requests == 1


def test_other_origins_and_paths_are_proxied_without_allow_headers(ferroxy_upstream, api) -> None:
    other = api.get("/api/items", headers={"origin": "https://evil.example"})
    assert other.json()["path"] == "/api/items"
    assert "access-control-allow-origin" not in other.headers
    # The answer depends on the origin: caches must keep one per origin.
    assert other.headers["vary"] == "Origin"
    # Outside the condition, a preflight is the upstream's to answer.
    outside = preflight(api, APP_ORIGIN, path="/static/x")
    assert outside.json()["method"] == "OPTIONS"
    assert "access-control-allow-origin" not in outside.headers
    assert ferroxy_upstream.requests == 2


def test_any_origin(ferroxy_upstream, ferroxy_proxy) -> None:
    proxy = ferroxy_proxy(app(ferroxy_upstream, f.Cors(origins=["*"])), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        r = preflight(client, "https://anywhere.example")
        assert (r.status_code, r.headers["access-control-allow-origin"]) == (204, "*")
        assert r.headers["access-control-allow-methods"] == "GET, HEAD, POST"
        assert "access-control-allow-credentials" not in r.headers
        r = client.get("/", headers={"origin": "https://anywhere.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        # The same answer with an Origin or without: a cache may give either to anyone.
        r = client.get("/")
        assert r.headers["access-control-allow-origin"] == "*"
        assert "vary" not in r.headers
    assert ferroxy_upstream.requests == 2


def test_the_upstream_s_own_cors_headers_are_replaced(ferroxy_upstream, ferroxy_proxy) -> None:
    def response_filter(self: Proxy, session: Session, resp: ResponseHeader, ctx: object) -> None:
        # An upstream that lets every origin in, credentials and all.
        resp.headers["access-control-allow-origin"] = "https://evil.example"
        resp.headers["access-control-allow-credentials"] = "true"
        resp.headers["access-control-allow-methods"] = "PUT"

    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Cors(origins=[APP_ORIGIN], expose_headers=["x-total"]),
            response_filter=response_filter,
        ),
        access_log=False,
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        evil = client.get("/", headers={"origin": "https://evil.example"})
        assert evil.status_code == 200
        assert allow_headers(evil) == {}
        allowed = client.get("/", headers={"origin": APP_ORIGIN})
        assert allow_headers(allowed) == {
            "access-control-allow-origin": APP_ORIGIN,
            "access-control-expose-headers": "x-total",
        }


def test_a_path_rewritten_after_cors_keeps_the_allow_headers(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Cors(f.PathPrefix("/old/"), origins=[APP_ORIGIN]),
            f.RewritePath(r"^/old/(.*)", "/new/{1}"),
        ),
        access_log=False,
    )
    r = httpx.get(proxy.url + "/old/items", headers={"origin": APP_ORIGIN})
    assert r.json()["path"] == "/new/items"
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN


def test_error_pages_carry_the_allow_headers(ferroxy_proxy) -> None:
    # Nothing listens upstream: the proxy's 502 is what the page gets, and can read.
    proxy = ferroxy_proxy(
        app(f"127.0.0.1:{free_port()}", f.Cors(origins=[APP_ORIGIN])), access_log=False
    )
    r = httpx.get(proxy.url + "/", headers={"origin": APP_ORIGIN})
    assert r.status_code == 502
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.headers["vary"] == "Origin"


def test_cors_before_basic_auth_answers_preflights_without_credentials(
    ferroxy_upstream, ferroxy_proxy
) -> None:
    bcrypt_hash = "$2b$10$LU2z2SCJnyH2LEhNVUbGJ.s7h/NV30StIgYYfGGOck9MCWNolpibm"
    proxy = ferroxy_proxy(
        app(
            ferroxy_upstream,
            f.Cors(origins=[APP_ORIGIN]),
            f.BasicAuth(users={"dev": bcrypt_hash}),
        ),
        access_log=False,
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert preflight(client, APP_ORIGIN).status_code == 204
        refused = client.get("/", headers={"origin": APP_ORIGIN})
        assert refused.status_code == 401
        # The page can read the 401 (and so ask for the password): Cors marks the proxy's
        # own answers too.
        assert refused.headers["access-control-allow-origin"] == APP_ORIGIN
        assert refused.headers["vary"] == "Origin"
        assert refused.headers["www-authenticate"].startswith("Basic ")
    assert ferroxy_upstream.requests == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: f.Cors(origins=["*"], credentials=True),
            'Cors.credentials: origins=["*"] with credentials=True is refused by browsers',
        ),
        (lambda: f.Cors(origins=[]), "Cors.origins: name at least one origin"),
        (
            lambda: f.Cors(origins=[APP_ORIGIN, "app.example.com"]),
            'Cors.origins[1]: "app.example.com" is not an origin',
        ),
        (lambda: f.Cors(origins=[APP_ORIGIN + "/"]), "Cors.origins[0]"),
        (
            lambda: f.Cors(origins=[APP_ORIGIN + ":443"]),
            'Cors.origins[0]: "https://app.example.com:443" names its scheme\'s default port',
        ),
        (
            lambda: f.Cors(origins=["https://me@app.example.com"]),
            'Cors.origins[0]: "https://me@app.example.com" has user info',
        ),
        (lambda: f.Cors(origins=[APP_ORIGIN], methods=["GET", "NO WAY"]), "Cors.methods[1]"),
        (lambda: f.Cors(origins=[APP_ORIGIN], headers=["bad name"]), "Cors.headers[0]"),
        (
            lambda: f.Cors(origins=[APP_ORIGIN], expose_headers=["*"], credentials=True),
            "Cors.expose_headers[0]: '*' with credentials=True",
        ),
        (lambda: f.Cors(origins=[APP_ORIGIN], max_age=-1), "Cors.max_age must be an int >= 0"),
    ],
)
def test_bad_cors_names_the_field(make, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make()
