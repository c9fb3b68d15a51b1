"""The ferroxy app of the h2-upstream row: kept apart from apps.py so that a baseline built
before ``Peer(alpn=...)`` existed can still import that one. The upstream is
FERROXY_BENCH_H2C_UPSTREAM (``host:port``), the upstream nginx's cleartext HTTP/2 listener."""

from __future__ import annotations

import os

from ferroxy import Peer, Proxy


class H2Upstream(Proxy):
    """The pure Rust path, speaking HTTP/2 with prior knowledge (h2c) to the upstream."""

    upstream = Peer(os.environ.get("FERROXY_BENCH_H2C_UPSTREAM", "127.0.0.1:18082"), alpn="h2")
