"""The Headers view: case-insensitive, multi-valued and mutable, on the client's request,
the upstream request and the upstream response."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import raw_connect, read_response
from ferroxy import Proxy, Response


def _get_with_headers(url: str, headers: list[tuple[str, str]]) -> httpx.Response:
    with httpx.Client(timeout=10) as c:
        return c.get(url, headers=headers)


def test_request_headers_read_api(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            h = session.req.headers
            seen["first"] = h["X-Multi"]
            seen["lower"] = h["x-multi"]
            seen["all"] = h.get_all("X-MULTI")
            seen["all_missing"] = h.get_all("x-nope")
            seen["contains"] = "x-MuLtI" in h
            seen["not_contains"] = "x-nope" in h
            seen["get_missing"] = h.get("x-nope")
            seen["get_default"] = h.get("x-nope", "dflt")
            seen["get_present"] = h.get("X-Single")
            seen["len"] = len(h)
            seen["iter"] = list(h)
            seen["keys"] = h.keys()
            seen["values"] = h.values()
            seen["items"] = h.items()
            try:
                h["x-nope"]
                seen["keyerror"] = False
            except KeyError:
                seen["keyerror"] = True

    proxy = ferroxy_proxy(App)
    r = _get_with_headers(
        proxy.url + "/h",
        [("X-Multi", "a"), ("x-single", "s"), ("X-MULTI", "b"), ("x-multi", "c")],
    )
    assert r.status_code == 200

    assert seen["first"] == "a"
    assert seen["lower"] == "a"
    assert seen["all"] == ["a", "b", "c"]
    assert seen["all_missing"] == []
    assert seen["contains"] is True
    assert seen["not_contains"] is False
    assert seen["get_missing"] is None
    assert seen["get_default"] == "dflt"
    assert seen["get_present"] == "s"
    assert seen["keyerror"] is True, "h[missing] must raise KeyError"

    names = seen["iter"]
    assert all(n == n.lower() for n in names), f"iteration must yield lower-case names: {names}"
    assert len(names) == len(set(names)), f"iteration must yield each name once: {names}"
    assert {"x-multi", "x-single", "host"} <= set(names)
    assert sorted(seen["keys"]) == sorted(names)
    assert seen["len"] == len(names), "len(headers) must match iteration (distinct names)"

    items = seen["items"]
    assert [v for k, v in items if k == "x-multi"] == ["a", "b", "c"], items
    assert ("x-single", "s") in items
    assert "s" in seen["values"]


def test_upstream_request_headers_mutation(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def upstream_request_filter(self, session, upstream_request, ctx):
            h = upstream_request.headers
            h["X-Replace"] = "new"  # replaces both client values
            h.add("x-added", "1")
            h.add("X-Added", "2")
            del h["x-remove"]
            seen["popped"] = h.pop("x-pop")
            seen["pop_default"] = h.pop("x-pop", "gone")
            h["X-Mixed-Case"] = "v"

    proxy = ferroxy_proxy(App)
    r = _get_with_headers(
        proxy.url + "/m",
        [
            ("x-replace", "old1"),
            ("x-replace", "old2"),
            ("x-remove", "bye"),
            ("x-pop", "popme"),
            ("x-keep", "kept"),
        ],
    )
    assert r.status_code == 200
    lst = [(k.lower(), v) for k, v in r.json()["header_list"]]
    assert [v for k, v in lst if k == "x-replace"] == ["new"]
    assert [v for k, v in lst if k == "x-added"] == ["1", "2"]
    assert not any(k == "x-remove" for k, _ in lst)
    assert not any(k == "x-pop" for k, _ in lst)
    assert ("x-keep", "kept") in lst
    assert ("x-mixed-case", "v") in lst
    assert seen == {"popped": "popme", "pop_default": "gone"}


def test_response_headers_mutation(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session, upstream_response, ctx):
            h = upstream_response.headers
            seen["had_content_type"] = "content-type" in h
            if "content-type" in h:
                del h["Content-Type"]
            h["x-served-by"] = "ferroxy"
            h.add("set-cookie", "a=1")
            h.add("Set-Cookie", "b=2")
            h["X-Twice"] = "first"
            h["x-twice"] = "second"

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/resp", timeout=10)
    assert r.status_code == 200
    assert "content-type" not in r.headers
    assert r.headers["x-served-by"] == "ferroxy"
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers.get_list("x-twice") == ["second"]
    assert r.json()["path"] == "/resp", "the body must pass through unchanged"


def test_response_headers_on_raw_wire(ferroxy_upstream, ferroxy_proxy) -> None:
    """Multiple values added in response_filter arrive as separate header lines."""

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers.add("x-multi", "one")
            upstream_response.headers.add("x-multi", "two")

    proxy = ferroxy_proxy(App)
    sock = raw_connect(proxy.port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /wire HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = read_response(rfile)
    assert resp.status == 200
    assert resp.header_all("x-multi") == ["one", "two"], resp.headers


def test_generated_response_headers_api() -> None:
    resp = Response(200, headers=[("X-A", "1"), ("x-a", "2"), ("X-B", "3")], body=b"x")
    h = resp.headers
    assert h["x-a"] == "1"
    assert h.get_all("X-A") == ["1", "2"]
    assert "x-b" in h and "X-B" in h
    h["x-b"] = "4"
    h.add("x-c", "5")
    del h["x-a"]
    assert "x-a" not in h
    assert h.get_all("x-b") == ["4"]
    assert h.get("x-c") == "5"
    assert set(h) == {"x-b", "x-c"}
