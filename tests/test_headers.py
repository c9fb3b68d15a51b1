"""The Headers view: case-insensitive, multi-valued and mutable, on the client's request,
the upstream request and the upstream response."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from conftest import raw_connect, read_response
from ferroxy import Headers, Proxy, Response


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
            # Views are live, like a dict's: listed here, while the request is there to see.
            seen["keys"] = list(h.keys())
            seen["values"] = list(h.values())
            seen["items"] = list(h.items())
            seen["multi_items"] = h.multi_items()
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
    assert [name for name, _ in items] == names, "items() has each name once, as iteration"
    assert ("x-multi", "a") in items and ("x-single", "s") in items, "with its first value"
    assert seen["values"] == [value for _, value in items]
    multi_items = seen["multi_items"]
    assert [v for k, v in multi_items if k == "x-multi"] == ["a", "b", "c"], multi_items
    assert ("x-single", "s") in multi_items


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


def _raw_get(port: int, *header_lines: bytes) -> Any:
    """GET /raw with the given header lines sent byte for byte; returns the RawResponse."""
    sock = raw_connect(port)
    with sock, sock.makefile("rb") as rfile:
        sock.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\n" + b"".join(header_lines) + b"\r\n")
        return read_response(rfile)


def test_latin1_value_written_back_is_byte_identical(ferroxy_upstream, ferroxy_proxy) -> None:
    """``h[k] = h[k]`` sends the bytes that came in: a non-ASCII value read as Latin-1 is
    written back as Latin-1, upstream and downstream."""
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def upstream_request_filter(self, session, upstream_request, ctx):
            h = upstream_request.headers
            seen["str"] = h["x-name"]
            h["x-name"] = h["x-name"]

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers["x-name"] = session.req.headers["x-name"]

    proxy = ferroxy_proxy(App)
    resp = _raw_get(proxy.port, b"X-Name: caf\xe9\r\n")
    assert resp.status == 200
    assert seen["str"] == "caf\xe9", "a non-ASCII byte reads as its Latin-1 character"
    # read_response decodes the head as Latin-1: one character per byte on the wire.
    assert resp.header("x-name").encode("latin-1") == b"caf\xe9"
    # The echo shows values as lossy UTF-8: a lone 0xE9 byte is U+FFFD; UTF-8 re-encoding
    # would have sent C3 A9, shown as "é".
    assert resp.json()["headers"]["x-name"] == "caf\ufffd"


def test_bytes_values_read_and_written_as_is(ferroxy_upstream, ferroxy_proxy) -> None:
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            h = session.req.headers
            seen["first"] = h.get_bytes("x-raw")
            seen["all"] = h.get_all_bytes("x-raw")
            seen["missing"] = h.get_bytes("x-nope")
            seen["default"] = h.get_bytes("x-nope", b"dflt")
            seen["all_missing"] = h.get_all_bytes("x-nope")

        def response_filter(self, session, upstream_response, ctx):
            upstream_response.headers["x-utf8"] = "caf\u00e9 \u2615".encode()
            upstream_response.headers.add("x-utf8", b"second")

    proxy = ferroxy_proxy(App)
    resp = _raw_get(proxy.port, b"X-Raw: \xff\xfe one\r\n", b"x-raw: two\r\n")
    assert resp.status == 200
    assert seen == {
        "first": b"\xff\xfe one",
        "all": [b"\xff\xfe one", b"two"],
        "missing": None,
        "default": b"dflt",
        "all_missing": [],
    }
    utf8 = [v.encode("latin-1") for v in resp.header_all("x-utf8")]
    assert utf8 in ([b"caf\xc3\xa9 \xe2\x98\x95", b"second"], [b"caf\xc3\xa9 \xe2\x98\x95, second"])


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\rb", "a\x00b", b"a\r\nb"])
def test_control_characters_in_values_are_refused(value: str | bytes) -> None:
    h = Headers()
    with pytest.raises(ValueError, match="x-bad"):
        h["x-bad"] = value
    with pytest.raises(ValueError, match="x-bad"):
        h.add("x-bad", value)
    with pytest.raises(ValueError, match="x-bad"):
        Response(200, headers={"x-bad": value})
    assert "x-bad" not in h


def test_str_values_are_latin1_and_others_need_bytes() -> None:
    h = Headers()
    h["x-latin1"] = "Jörg"
    assert h.get_bytes("x-latin1") == b"J\xf6rg"
    assert h["x-latin1"] == "Jörg", "a str set is the str read back"
    with pytest.raises(ValueError, match=r"x-cup.*U\+00FF.*bytes"):
        h["x-cup"] = "\u2615"
    h["x-cup"] = "\u2615".encode()
    assert h.get_bytes("x-cup") == b"\xe2\x98\x95"
    with pytest.raises(TypeError, match="x-num"):
        h["x-num"] = 1


def test_headers_is_a_mutable_mapping() -> None:
    h = Headers([("X-A", "1"), ("x-a", "2"), ("X-B", "3")])
    assert isinstance(h, MutableMapping)
    assert h == Headers([("x-a", "1"), ("X-A", "2"), ("x-b", "3")]), "names compare lower-cased"
    assert h != {"x-a": "1", "x-b": "3"}, "a dict cannot hold x-a's second value"
    assert h != Headers([("x-a", "2"), ("x-a", "1"), ("x-b", "3")]), "values keep their order"
    assert Headers({"X-A": "1"}) == {"x-a": "1"} == Headers({"x-a": "1"})
    assert h != [("x-a", "1")]

    assert list(h.keys()) == ["x-a", "x-b"]
    assert list(h.values()) == ["1", "3"]
    assert list(h.items()) == [("x-a", "1"), ("x-b", "3")]
    assert h.multi_items() == [("x-a", "1"), ("x-a", "2"), ("x-b", "3")]
    assert h.keys() == {"x-a", "x-b"} and ("x-b", "3") in h.items(), "set-like, as a dict's"
    assert dict(h) == {"x-a": "1", "x-b": "3"}

    assert h.pop("x-a") == "1", "pop returns the first value and removes them all"
    assert "x-a" not in h
    with pytest.raises(KeyError):
        h.pop("x-a")
    assert h.pop("x-a", None) is None
    assert h.pop("x-a", "gone") == "gone"

    assert h.setdefault("x-b", "other") == "3"
    assert h.setdefault("x-c", "4") == "4"
    assert h["x-c"] == "4"

    h.update({"x-b": "5"}, x_d="6")
    h.update([("set-cookie", "a=1"), ("set-cookie", "b=2")])
    assert h.multi_items() == [
        ("x-b", "5"),
        ("x-c", "4"),
        ("x_d", "6"),
        ("set-cookie", "a=1"),
        ("set-cookie", "b=2"),
    ]
    h.update(Headers([("set-cookie", "c=3")]))
    assert h.get_all("set-cookie") == ["c=3"], "update replaces the values of a name it gives"

    assert h.popitem() == ("x-b", "5")
    h.clear()
    assert len(h) == 0 and h == {}
    with pytest.raises(KeyError):
        h.popitem()
    with pytest.raises(TypeError):
        hash(h)


def test_live_headers_behave_as_a_mapping(ferroxy_upstream, ferroxy_proxy) -> None:
    """The mixin behaviour on a view of a real request, and a ``Headers`` as the headers of
    a generated response."""
    seen: dict[str, Any] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def request_filter(self, session, ctx):
            h = session.req.headers
            seen["is_mapping"] = isinstance(h, MutableMapping)
            seen["dict"] = dict(h)
            h.update({"x-from-update": "1"})
            seen["has_update"] = h.get("x-from-update")
            return Response(200, headers=h, body=b"")

    proxy = ferroxy_proxy(App)
    r = httpx.get(proxy.url + "/live", headers={"x-sent": "yes"}, timeout=10)
    assert r.status_code == 200
    assert seen["is_mapping"] is True
    assert seen["dict"]["x-sent"] == "yes"
    assert seen["has_update"] == "1"
    assert r.headers["x-sent"] == "yes" and r.headers["x-from-update"] == "1"
