"""Configuration: server options and their defaults, value validation, the hook list. Bad
configuration fails at start-up with an exception naming the field."""

from __future__ import annotations

import inspect

import httpx
import pytest
from ferroxy import Peer, Proxy, Response, ServerOptions, _core
from ferroxy.proxy import HOOK_NAMES
from ferroxy.server import DEFAULT_GRACE_PERIOD, PYTHON_OPTIONS
from ferroxy.testing import start_proxy


def test_unknown_server_option_is_a_type_error_naming_it(ferroxy_upstream) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    with pytest.raises(TypeError, match="no_such_option"):
        start_proxy(App, no_such_option=1)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("grace_period", -1.0),
        ("client_read_timeout", 0.0),
        ("client_write_timeout", float("nan")),
        ("keepalive_timeout", -5.0),
        ("pool_idle_timeout", float("inf")),
        ("pool_max_idle_per_peer", -1),
        ("threads", 5000),
        ("blocking_threads", 0),
        ("slow_hook_threshold", -1.0),
        ("hook_timeout", float("nan")),
    ],
)
def test_bad_server_option_value_names_it(ferroxy_upstream, option: str, value: float) -> None:
    class App(Proxy):
        upstream = ferroxy_upstream.addr

    with pytest.raises(ValueError, match=option):
        start_proxy(App, **{option: value})


def test_server_options_lists_every_server_keyword() -> None:
    """ServerOptions is the typed face of _core.Server's options (the dispatcher, and the
    app's hooks, filters and routes, are not options) and of the few that Python carries out."""
    from_app = {"dispatcher", "hooks", "filters", "routes"}
    engine = set(inspect.signature(_core.Server).parameters) - from_app
    assert not engine & PYTHON_OPTIONS
    assert engine | PYTHON_OPTIONS == ServerOptions.__optional_keys__


def test_peer_defaults_are_the_engines() -> None:
    peer = Peer("127.0.0.1:1")
    assert peer.connect_timeout == _core.DEFAULTS["connect_timeout"] == 5.0
    assert peer.read_timeout == _core.DEFAULTS["read_timeout"] == 60.0
    assert peer.write_timeout == _core.DEFAULTS["write_timeout"] == 60.0
    assert peer.idle_timeout == _core.DEFAULTS["idle_timeout"] == 60.0
    given = Peer("127.0.0.1:1", read_timeout=2.5)
    assert given.read_timeout == 2.5
    assert given.connect_timeout == _core.DEFAULTS["connect_timeout"]


def test_server_defaults_are_the_engines() -> None:
    assert _core.DEFAULTS["grace_period"] == DEFAULT_GRACE_PERIOD == 5.0
    assert _core.DEFAULTS["listen"] == "127.0.0.1:8080"
    assert _core.DEFAULTS["threads"] == 0
    assert _core.DEFAULTS["client_read_timeout"] == _core.DEFAULTS["client_write_timeout"] == 60
    assert _core.DEFAULTS["keepalive_timeout"] == 75.0
    assert _core.DEFAULTS["pool_idle_timeout"] == 60.0
    assert _core.DEFAULTS["pool_max_idle_per_peer"] == 128


def test_cli_defaults_come_from_the_engine() -> None:
    from ferroxy.__main__ import _parser

    args = _parser().parse_args(["app.py:App"])
    assert args.grace_period == _core.DEFAULTS["grace_period"]
    assert args.listen is None, "no --listen: the server's default listener"
    assert args.threads == _core.DEFAULTS["threads"]
    assert args.access_log == _core.DEFAULTS["access_log"] == "-"
    assert args.access_log_format == _core.DEFAULTS["access_log_format"] == "combined"


@pytest.mark.parametrize("field", ["connect_timeout", "read_timeout", "write_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_peer_timeout_names_it(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Peer.{field}"):
        Peer("127.0.0.1:1", **{field: value})


def test_status_is_checked_the_same_way_on_both_sides(ferroxy_upstream, ferroxy_proxy) -> None:
    with pytest.raises(ValueError, match=r"Response\.status must be 200\.\.=999"):
        Response(101)
    seen: dict[str, str] = {}

    class App(Proxy):
        upstream = ferroxy_upstream.addr

        def response_filter(self, session, upstream_response, ctx):
            try:
                upstream_response.status = 199
            except ValueError as error:
                seen["error"] = str(error)
            upstream_response.status = 299

    proxy = ferroxy_proxy(App)
    assert httpx.get(proxy.url + "/status", timeout=10).status_code == 299
    assert "ResponseHeader.status must be 200..=999" in seen["error"]


def test_hook_names_are_the_engines_and_the_proxy_methods() -> None:
    assert HOOK_NAMES is _core.HOOK_NAMES
    assert HOOK_NAMES == (
        "new_ctx",
        "request_filter",
        "upstream_peer",
        "upstream_request_filter",
        "fail_to_connect",
        "response_filter",
        "request_body_filter",
        "response_body_filter",
        "websocket_message",
        "fail_to_proxy",
        "logging",
    )
    methods = {name for name, _ in inspect.getmembers(Proxy, inspect.isfunction)}
    # reload() and reload_tls() are the methods that are not hooks (they act on the running
    # proxy).
    assert methods == {*HOOK_NAMES, "reload", "reload_tls"}, (
        "every hook is a Proxy method, and only the reloads are not"
    )


def test_server_refuses_a_hook_name_the_engine_does_not_have() -> None:
    with pytest.raises(ValueError, match='unknown hook "request_filer"'):
        _core.Server(object(), hooks=["request_filer"])
