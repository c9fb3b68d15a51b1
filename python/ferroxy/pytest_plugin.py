"""pytest fixtures, registered through the ``pytest11`` entry point when ferroxy is installed.

``ferroxy_upstream`` is a running echo upstream (``ferroxy_tcp_upstream`` a TCP byte echo);
``ferroxy_proxy(App, **options)`` serves an app in-process on an ephemeral port. All are
stopped at the end of the test.

    def test_blocked(ferroxy_upstream, ferroxy_proxy):
        proxy = ferroxy_proxy(App, upstream=ferroxy_upstream.addr)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from .proxy import Proxy
from .server import ProxyServer, ServerOptions
from .testing import EchoServer, TcpEchoServer, start_proxy, start_tcp_upstream, start_upstream

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ProxyFactory", "ferroxy_proxy", "ferroxy_tcp_upstream", "ferroxy_upstream"]


class ProxyFactory(Protocol):
    """The type of the ``ferroxy_proxy`` fixture, for annotating tests."""

    def __call__(
        self, app: type[Proxy[Any]] | Proxy[Any], /, **options: Unpack[ServerOptions]
    ) -> ProxyServer: ...


@pytest.fixture
def ferroxy_upstream() -> Iterator[EchoServer]:
    """A running echo upstream on an ephemeral port."""
    with start_upstream() as upstream:
        yield upstream


@pytest.fixture
def ferroxy_tcp_upstream() -> Iterator[TcpEchoServer]:
    """A running TCP echo upstream on an ephemeral port."""
    with start_tcp_upstream() as upstream:
        yield upstream


@pytest.fixture
def ferroxy_proxy() -> Iterator[ProxyFactory]:
    """Start a proxy for an app: ``ferroxy_proxy(App, **options) -> ProxyServer``."""
    started: list[ProxyServer] = []

    def start(
        app: type[Proxy[Any]] | Proxy[Any], /, **options: Unpack[ServerOptions]
    ) -> ProxyServer:
        proxy = start_proxy(app, **options)
        started.append(proxy)
        return proxy

    yield start

    # Stop every proxy even if one fails to stop; report the first failure.
    failures: list[BaseException] = []
    for proxy in reversed(started):
        try:
            proxy.stop()
        except Exception as error:
            failures.append(error)
    if failures:
        raise failures[0]
