"""The load-balanced ferroxy apps the benchmark runs (issue 8): kept apart from apps.py so
that a baseline built before LoadBalancer existed can still import that one. The backends
come from FERROXY_BENCH_POOL (comma-separated ``host:port``): listeners of the one upstream
nginx, so each row costs the upstream what the static-peer row does."""

from __future__ import annotations

import os

from ferroxy import LoadBalancer, Proxy

POOL = os.environ.get("FERROXY_BENCH_POOL", "127.0.0.1:18080").split(",")


class Pool2(Proxy):
    """Round robin over two backends, picked in Rust: no Python per request."""

    upstream = LoadBalancer(POOL[:2])


class Pool100(Proxy):
    """Round robin over a hundred backends: what picking costs as the list grows."""

    upstream = LoadBalancer(POOL[:100])


class Consistent2(Proxy):
    """Ketama consistent hashing of the path over two backends."""

    upstream = LoadBalancer(POOL[:2], strategy="consistent", hash_key="path")
