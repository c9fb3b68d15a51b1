"""A fixed upstream and no hooks: the engine proxies every request without calling Python.

Run: python -m ferroxy examples/static_upstream.py:App --demo-upstream 127.0.0.1:8081
"""

from ferroxy import Peer, Proxy


class App(Proxy):
    upstream = Peer("127.0.0.1:8081")
