"""An HTTP proxy and a TCP (L4) proxy in one process: HTTP on 8080 to the demo upstream,
and TCP on 6380 to a Redis on 6379 (or to whatever the ``REDIS`` environment variable
names), choosing the upstream per connection.

Run: python -m ferroxy examples/tcp.py:App examples/tcp.py:Redis \\
         --listen 127.0.0.1:8080 --listen 127.0.0.1:6380 --demo-upstream 127.0.0.1:8081
"""

import os

from ferroxy import Proxy, TcpProxy


class App(Proxy):
    upstream = "127.0.0.1:8081"


class Redis(TcpProxy):
    idle_timeout = 300.0

    def upstream_peer(self, client_addr: str) -> str:
        # Bytes are copied in Rust; Python runs once per connection, here.
        return os.environ.get("REDIS", "127.0.0.1:6379")
