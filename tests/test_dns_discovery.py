"""LoadBalancer backends given by name (issue 8, DNS discovery): each address the name
resolves to becomes a backend. ``localhost`` resolves from /etc/hosts, as the system resolver
resolves it; ``.invalid`` names never resolve (RFC 6761): neither sends a DNS query. The
refresh on an interval is tested in Rust (rust/engine/src/lb/discovery_tests.rs), where the
answers can change."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from ferroxy import LoadBalancer, Peer, Proxy, Session
from ferroxy.testing import EchoServer


def localhost_addrs(port: int) -> list[str]:
    """What the system resolver gives for ``localhost:port``, as backend addresses."""
    infos = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
    ips = sorted({info[4][0] for info in infos}, key=lambda ip: (":" in ip, ip))
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def addrs(pool: LoadBalancer) -> list[str]:
    return [backend["addr"] for backend in pool.backends()]


def test_a_name_stands_for_each_address_it_resolves_to(
    upstreams: list[EchoServer], ferroxy_proxy: Any
) -> None:
    upstream = upstreams[0]
    pool = LoadBalancer([f"localhost:{upstream.port}", (upstreams[1].addr, 2)])
    assert addrs(pool) == [*localhost_addrs(upstream.port), upstreams[1].addr]
    assert [b["weight"] for b in pool.backends()][-1] == 2
    assert "localhost" in repr(pool), "the list as given"

    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return pool.select()

    proxy = ferroxy_proxy(App, access_log=False)
    pool.set_backends([f"localhost:{upstream.port}"])
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.get("/").status_code == 200
    assert upstream.requests == 1


def test_set_backends_resolves_names_and_a_bad_one_changes_nothing() -> None:
    pool = LoadBalancer(["127.0.0.1:9001"])
    pool.set_backends(["localhost:9002"])
    assert addrs(pool) == localhost_addrs(9002)
    with pytest.raises(ValueError, match=r"backends\[1\]: cannot resolve \"nothing\.invalid\""):
        pool.set_backends(["127.0.0.1:9003", "nothing.invalid:80"])
    assert addrs(pool) == localhost_addrs(9002)


@pytest.mark.parametrize(
    ("backends", "options", "field"),
    [
        (["127.0.0.1:9001", "nothing.invalid:80"], {}, r"backends\[1\]"),
        (["localhost:9001"], {"dns_refresh": 0}, "dns_refresh"),
        (["localhost:9001"], {"dns_refresh": -5.0}, "dns_refresh"),
    ],
    ids=["unresolvable", "refresh-zero", "refresh-negative"],
)
def test_bad_discovery_config_names_the_field(
    backends: list[str], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        LoadBalancer(backends, **options)
