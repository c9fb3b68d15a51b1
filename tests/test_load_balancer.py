"""ferroxy.LoadBalancer from Python (issue 8, first step): built once, asked from a hook, the
choice made in Rust. Real backends: several echo upstreams on loopback."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from conftest import served_by
from ferroxy import LoadBalancer, Peer, Proxy, Session


def test_round_robin_through_a_hook_is_an_exact_rotation(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer([u.addr for u in upstreams])

    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return pool.select()

    proxy = ferroxy_proxy(App, access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(30):
            assert client.get(f"/{i}").status_code == 200
    assert served_by(upstreams) == [10, 10, 10]


def test_consistent_hashing_keeps_a_key_on_one_backend(upstreams, ferroxy_proxy) -> None:
    pool = LoadBalancer([u.addr for u in upstreams], strategy="consistent")

    class App(Proxy):
        def upstream_peer(self, session: Session, ctx: Any) -> Peer:
            return pool.select(key=session.req.headers.get("x-user"))

    proxy = ferroxy_proxy(App, access_log=False)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for user in ("ada", "grace", "linus"):
            before = served_by(upstreams)
            for _ in range(5):
                assert client.get("/", headers={"x-user": user}).status_code == 200
            moved = [after - was for after, was in zip(served_by(upstreams), before, strict=True)]
            assert sorted(moved) == [0, 0, 5], f"{user}'s requests were spread: {moved}"


def test_weights_and_backends_are_reported() -> None:
    pool = LoadBalancer(["127.0.0.1:9001", ("127.0.0.1:9002", 3)], strategy="weighted_round_robin")
    picks = Counter(pool.select().addr for _ in range(400))
    assert picks == {"127.0.0.1:9001": 100, "127.0.0.1:9002": 300}
    assert pool.backends() == [
        {
            "addr": "127.0.0.1:9001",
            "weight": 1,
            "healthy": True,
            "in_flight": 0,
            "requests": 100,
            "failures": 0,
        },
        {
            "addr": "127.0.0.1:9002",
            "weight": 3,
            "healthy": True,
            "in_flight": 0,
            "requests": 300,
            "failures": 0,
        },
    ]
    assert pool.strategy == "weighted_round_robin"


def test_set_backends_swaps_the_list_and_a_bad_one_changes_nothing() -> None:
    pool = LoadBalancer(["127.0.0.1:9001"])
    pool.set_backends(["127.0.0.1:9002", "127.0.0.1:9003"])
    assert {pool.select().addr for _ in range(4)} == {"127.0.0.1:9002", "127.0.0.1:9003"}
    with pytest.raises(ValueError, match="weight"):
        pool.set_backends([("127.0.0.1:9004", 0)])
    assert [b["addr"] for b in pool.backends()] == ["127.0.0.1:9002", "127.0.0.1:9003"]


@pytest.mark.parametrize(
    ("backends", "options", "field"),
    [
        ([], {}, "backends"),
        ([("127.0.0.1:9001", 0)], {}, r"backends\[0\]\.weight"),
        ([("127.0.0.1:9001", -2)], {}, r"backends\[0\]\.weight"),
        (["127.0.0.1:9001", "not an address"], {}, r"backends\[1\]"),
        (["127.0.0.1:9001"], {"strategy": "fastest"}, "strategy"),
    ],
    ids=["empty", "weight-zero", "weight-negative", "bad-address", "unknown-strategy"],
)
def test_bad_config_names_the_field(backends, options, field) -> None:
    with pytest.raises(ValueError, match=field):
        LoadBalancer(backends, **options)


def test_removing_one_of_ten_backends_moves_only_its_keys() -> None:
    backends = [f"10.0.0.{i}:8080" for i in range(1, 11)]
    pool = LoadBalancer(backends, strategy="consistent")
    keys = [f"user-{i}" for i in range(10_000)]
    before = {key: pool.select(key=key).addr for key in keys}
    removed = backends[3]
    pool.set_backends([b for b in backends if b != removed])
    after = {key: pool.select(key=key).addr for key in keys}
    moved = {key for key in keys if before[key] != after[key]}
    assert moved == {key for key in keys if before[key] == removed}, "only the removed one's keys"
    assert len(moved) <= 10_000 * (1 / 10 + 0.05)
