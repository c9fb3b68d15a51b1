"""LoadBalancer health checks (issue 8): active TCP and HTTP checks run while a proxy server
runs, eject a dead backend and bring it back; bad options name their field. Real backends on
loopback: echo upstreams, and a small http.server whose status the test sets. (Passive
ejection needs the proxy to report each request's outcome: its timing is tested in Rust,
rust/engine/src/lb/health_tests.rs.)"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from conftest import LogCapture, StatusServer, free_port, wait_until
from ferroxy import HealthCheck, LoadBalancer, Peer, Proxy, Session
from ferroxy.testing import EchoServer, start_upstream

INTERVAL = 0.05
#: Enough for the thresholds below at INTERVAL, with room for a loaded machine.
CHANGE_WITHIN = 2 * INTERVAL + 3.0


def selecting_from(pool: LoadBalancer) -> type[Proxy]:
    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return pool.select()

    return App


def healthy(pool: LoadBalancer) -> dict[str, bool]:
    return {backend["addr"]: backend["healthy"] for backend in pool.backends()}


def health_logs(logs: LogCapture, text: str) -> list[logging.LogRecord]:
    return logs.wait_for(lambda r: r.name == "ferroxy.health" and text in r.getMessage())


def test_a_stopped_backend_is_ejected_and_comes_back_when_restarted(
    upstreams: list[EchoServer], ferroxy_logs: LogCapture, ferroxy_proxy: Any
) -> None:
    changes: list[tuple[str, bool]] = []
    pool = LoadBalancer(
        [u.addr for u in upstreams],
        health_check=HealthCheck.tcp(interval=INTERVAL, timeout=0.5, healthy=2, unhealthy=2),
        on_health_change=lambda backend, up: changes.append((backend["addr"], up)),
    )
    proxy = ferroxy_proxy(selecting_from(pool), access_log=False)
    stopped = upstreams[2]
    stopped.stop()
    assert wait_until(lambda: not healthy(pool)[stopped.addr], timeout=CHANGE_WITHIN)
    assert {pool.select().addr for _ in range(30)} == {upstreams[0].addr, upstreams[1].addr}
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert all(client.get(f"/{i}").status_code == 200 for i in range(20))
    assert [u.requests for u in upstreams[:2]] == [10, 10]
    assert wait_until(lambda: changes == [(stopped.addr, False)])
    warned = ferroxy_logs.wait_for(
        lambda r: r.name == "ferroxy.health" and "unhealthy" in r.getMessage()
    )
    assert stopped.addr in warned[0].getMessage()
    assert "connect failed" in warned[0].getMessage()

    with start_upstream(stopped.addr) as restarted:
        assert wait_until(lambda: healthy(pool)[stopped.addr], timeout=CHANGE_WITHIN)
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert all(client.get(f"/{i}").status_code == 200 for i in range(30))
        assert restarted.requests == 10, "back in the rotation"
    assert wait_until(lambda: changes == [(stopped.addr, False), (stopped.addr, True)])
    assert ferroxy_logs.wait_for(
        lambda r: r.name == "ferroxy.health" and "healthy again" in r.getMessage()
    )


def test_an_http_check_ejects_a_backend_answering_an_unexpected_status(
    upstreams: list[EchoServer], status_server: StatusServer, ferroxy_proxy: Any
) -> None:
    pool = LoadBalancer(
        [upstreams[0].addr, upstreams[1].addr, status_server.addr],
        health_check=HealthCheck.http(
            "/health", interval=INTERVAL, healthy=1, unhealthy=1, expect_status=range(200, 400)
        ),
    )
    ferroxy_proxy(selecting_from(pool), access_log=False)
    assert wait_until(lambda: status_server.seen, timeout=CHANGE_WITHIN)
    assert status_server.seen[0] == ("/health", status_server.addr)
    status_server.status = 500
    assert wait_until(lambda: not healthy(pool)[status_server.addr], timeout=CHANGE_WITHIN)
    assert healthy(pool)[upstreams[0].addr] and healthy(pool)[upstreams[1].addr], (
        "the echo upstreams answer 200 on /health"
    )
    status_server.status = 302
    assert wait_until(lambda: healthy(pool)[status_server.addr], timeout=CHANGE_WITHIN)


def test_an_exception_in_on_health_change_is_logged_and_checks_go_on(
    ferroxy_logs: LogCapture, ferroxy_proxy: Any
) -> None:
    calls: list[bool] = []

    def on_health_change(backend: dict[str, Any], up: bool) -> None:
        calls.append(up)
        raise RuntimeError("the pager is down")

    with start_upstream() as upstream:
        pool = LoadBalancer(
            [upstream.addr],
            health_check=HealthCheck.tcp(interval=INTERVAL, healthy=1, unhealthy=1),
            on_health_change=on_health_change,
        )
        ferroxy_proxy(selecting_from(pool), access_log=False)
        addr = upstream.addr
    assert wait_until(lambda: calls == [False], timeout=CHANGE_WITHIN)
    logged = ferroxy_logs.wait_for(lambda r: r.getMessage() == "on_health_change failed")
    assert "the pager is down" in LogCapture.text(logged[0])
    with start_upstream(addr):
        assert wait_until(lambda: calls == [False, True], timeout=CHANGE_WITHIN)


def test_checks_use_the_engine_defaults_unless_given() -> None:
    check = HealthCheck.http("/health", timeout=0.25)
    assert (check.kind, check.path, check.timeout) == ("http", "/health", 0.25)
    default = HealthCheck.tcp()
    assert (default.kind, default.path) == ("tcp", None)
    assert (check.interval, check.healthy, check.unhealthy) == (
        default.interval,
        default.healthy,
        default.unhealthy,
    )
    assert repr(check) == (
        f'HealthCheck.http("/health", interval={check.interval!r}, timeout=0.25, '
        f"healthy={check.healthy}, unhealthy={check.unhealthy})"
    )


def test_backends_report_requests() -> None:
    pool = LoadBalancer(["127.0.0.1:9001", "127.0.0.1:9002"], max_fails=0)
    for _ in range(3):
        pool.select()
    assert pool.backends() == [
        {
            "addr": "127.0.0.1:9001",
            "weight": 1,
            "healthy": True,
            "in_flight": 0,
            "requests": 2,
            "failures": 0,
        },
        {
            "addr": "127.0.0.1:9002",
            "weight": 1,
            "healthy": True,
            "in_flight": 0,
            "requests": 1,
            "failures": 0,
        },
    ]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: HealthCheck.tcp(interval=0), r"health_check\.interval"),
        (lambda: HealthCheck.tcp(timeout=-1), r"health_check\.timeout"),
        (lambda: HealthCheck.tcp(healthy=0), r"health_check\.healthy"),
        (lambda: HealthCheck.tcp(unhealthy=-2), r"health_check\.unhealthy"),
        (lambda: HealthCheck.http("health"), r"health_check\.path"),
        (lambda: HealthCheck.http("/h", expect_status=[200, 600]), r"health_check\.expect_status"),
        (lambda: HealthCheck.http("/h", expect_status=[]), r"health_check\.expect_status"),
        (lambda: HealthCheck.http("/h", expect_status="2xx"), r"health_check\.expect_status"),
        (lambda: HealthCheck.http("/h", host="a\nb"), r"health_check\.host"),
        (lambda: LoadBalancer(["127.0.0.1:9001"], max_fails=-1), "max_fails"),
        (lambda: LoadBalancer(["127.0.0.1:9001"], fail_timeout=0), "fail_timeout"),
        (
            lambda: LoadBalancer(["127.0.0.1:9001"], fail_timeout=5, max_fail_timeout=1),
            "max_fail_timeout",
        ),
    ],
    ids=[
        "interval",
        "timeout",
        "healthy",
        "unhealthy",
        "path",
        "status-range",
        "no-status",
        "status-text",
        "host",
        "max-fails",
        "fail-timeout",
        "max-fail-timeout",
    ],
)
def test_bad_health_options_name_the_field(make: Any, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_health_options_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(TypeError, match="health_check must be a HealthCheck"):
        LoadBalancer(["127.0.0.1:9001"], health_check="tcp")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_health_change must be callable"):
        LoadBalancer(["127.0.0.1:9001"], on_health_change=5)  # type: ignore[arg-type]


def test_a_server_checks_the_balancers_its_app_uses_and_those_it_is_given(
    upstreams: list[EchoServer], ferroxy_proxy: Any
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    check = HealthCheck.tcp(interval=INTERVAL, timeout=0.5, healthy=1, unhealthy=1)
    used = LoadBalancer([upstreams[0].addr, dead], health_check=check)
    unused = LoadBalancer([dead], health_check=check)
    ferroxy_proxy(selecting_from(used), access_log=False)
    assert wait_until(lambda: not healthy(used)[dead], timeout=CHANGE_WITHIN)
    # A balancer the app does not use is none of this server's business.
    assert healthy(unused)[dead]
    ferroxy_proxy(selecting_from(used), access_log=False, balancers=[unused])
    assert wait_until(lambda: not healthy(unused)[dead], timeout=CHANGE_WITHIN)
