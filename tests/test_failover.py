"""Failover end to end (issue 8): `upstream = pool` with health checks, passive ejection and
retries working together, as a user of nginx's upstream module would expect. Real backends on
loopback: echo upstreams, a port where nothing listens, and a small http.server whose status
the test sets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
from conftest import StatusServer, free_port, wait_until
from ferroxy import HealthCheck, LoadBalancer, Proxy
from ferroxy.testing import EchoServer, start_upstream


def balanced(pool: LoadBalancer) -> type[Proxy]:
    return type("Balanced", (Proxy,), {"upstream": pool})


def status(pool: LoadBalancer, addr: str) -> dict[str, Any]:
    return next(b for b in pool.backends() if b["addr"] == addr)


def test_one_stopped_backend_of_three_loses_no_request_and_comes_back(
    upstreams: list[EchoServer], ferroxy_proxy: Any
) -> None:
    check = HealthCheck.tcp(interval=0.05, timeout=0.5, healthy=2, unhealthy=2)
    pool = LoadBalancer([u.addr for u in upstreams], health_check=check)
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    stopped = upstreams[2]
    stopped.stop()
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        statuses = Counter(client.get(f"/{i}").status_code for i in range(1000))
    assert statuses == {200: 1000}, "retries on the other backends hide the stopped one"
    assert wait_until(lambda: not status(pool, stopped.addr)["healthy"], timeout=5)
    with start_upstream(stopped.addr) as restarted:
        assert wait_until(lambda: status(pool, stopped.addr)["healthy"], timeout=5)
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for i in range(30):
                assert client.get(f"/{i}").status_code == 200
        assert restarted.requests == 10, "back in the rotation"


def test_connect_failures_eject_a_backend_passively(
    upstreams: list[EchoServer], ferroxy_proxy: Any
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    # No active checks: only what requests meet.
    pool = LoadBalancer([dead, upstreams[0].addr], max_fails=3, fail_timeout=60)
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert all(client.get(f"/{i}").status_code == 200 for i in range(100))
    # Three failed connects ejected it; the other 97 requests never tried it.
    assert status(pool, dead)["failures"] == 3
    assert not status(pool, dead)["healthy"]
    assert upstreams[0].requests == 100


def test_a_backend_answering_5xx_is_ejected_for_its_cool_down(
    status_server: StatusServer, upstreams: list[EchoServer], ferroxy_proxy: Any
) -> None:
    status_server.status = 503
    pool = LoadBalancer([status_server.addr, upstreams[0].addr], max_fails=2, fail_timeout=0.5)
    proxy = ferroxy_proxy(balanced(pool), access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        first = [client.get("/").status_code for _ in range(4)]
        # A 5xx is an answer, passed on (not retried); two in a row eject the backend.
        assert first == [503, 200, 503, 200]
        assert all(client.get("/").status_code == 200 for _ in range(20))
        assert len(status_server.seen) == 2
        # After the cool-down it is tried again, and now answers well.
        status_server.status = 200
        assert wait_until(lambda: status(pool, status_server.addr)["healthy"], timeout=5)
        assert all(client.get("/").status_code == 200 for _ in range(10))
    assert len(status_server.seen) > 2, "back in the rotation after its cool-down"
