"""Helpers for trying an app in-process, outside pytest too: the built-in echo upstream and
a proxy served from a background thread.

    with start_upstream() as upstream, start_proxy(App, upstream=upstream.addr) as proxy:
        urllib.request.urlopen(proxy.url + "/hello")
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from .proxy import Proxy
from .server import ProxyServer, ServerOptions

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = ["EchoServer", "ProxyServer", "start_proxy", "start_upstream"]


class EchoServer:
    """The built-in echo upstream on its own thread: it answers every request with a JSON
    description of what it received. Serving as soon as it is created."""

    def __init__(self, listen: str = "127.0.0.1:0") -> None:
        self._echo = _core.EchoUpstream(listen)
        self._stopped = False

    @property
    def url(self) -> str:
        return self._echo.url

    @property
    def port(self) -> int:
        return self._echo.port

    @property
    def addr(self) -> str:
        """``host:port``, ready to use as a Proxy's ``upstream``."""
        return self._echo.addr

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (tells whether the proxy reused one)."""
        return self._echo.connections

    @property
    def requests(self) -> int:
        return self._echo.requests

    def stop(self) -> None:
        """Stop serving; later calls do nothing."""
        if not self._stopped:
            self._stopped = True
            self._echo.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EchoServer {self.url}{' stopped' if self._stopped else ''}>"


def start_upstream(listen: str = "127.0.0.1:0") -> EchoServer:
    """Start an echo upstream (on an ephemeral port by default)."""
    return EchoServer(listen)


def start_proxy(
    app: type[Proxy[Any]] | Proxy[Any], **options: Unpack[ServerOptions]
) -> ProxyServer:
    """Serve ``app`` from a background thread (on an ephemeral port unless ``listen`` is
    given) and return once it is listening; ``options`` are ``ProxyServer``'s."""
    return ProxyServer(app, **options).start()
