"""Helpers for trying an app in-process, outside pytest too: the built-in echo upstream, a
proxy served from a background thread, and :func:`simulate`, which runs one request through
an app's real phases with no sockets at all.

    with start_upstream() as upstream, start_proxy(App, upstream=upstream.addr) as proxy:
        urllib.request.urlopen(proxy.url + "/hello")

    out = simulate(App, request("GET", "/blocked"))
    assert out.status == 403 and out.upstream_request is None
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _core
from ._core import SimulationResult
from .proxy import Proxy
from .server import ProxyServer, ServerOptions, _close_loop, _LoopServer

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = [
    "EchoServer",
    "ProxyServer",
    "SimulatedRequest",
    "SimulationResult",
    "TcpEchoServer",
    "request",
    "simulate",
    "start_proxy",
    "start_tcp_upstream",
    "start_upstream",
]


class EchoServer:
    """The built-in echo upstream on its own thread: it answers every request with a JSON
    description of what it received. Serving as soon as it is created.

    With ``tls_cert`` and ``tls_key`` (PEM files) it serves TLS, HTTP/1.1 and h2 by ALPN; with
    ``client_ca`` too it requires a client certificate that CA signed. Its JSON says whether a
    request came over TLS (``tls``) and with a client certificate (``client_cert``)."""

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        *,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client_ca: str | None = None,
    ) -> None:
        self._echo = _core.EchoUpstream(
            listen, tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca
        )
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


class TcpEchoServer:
    """A TCP echo upstream on its own thread: every byte a client sends comes back, for a
    ``TcpProxy`` to proxy to. Serving as soon as it is created."""

    def __init__(self, listen: str = "127.0.0.1:0") -> None:
        self._echo = _core.TcpEchoUpstream(listen)
        self._stopped = False

    @property
    def addr(self) -> str:
        """``host:port``, ready to use as a TcpProxy's ``upstream``."""
        return self._echo.addr

    @property
    def port(self) -> int:
        return self._echo.port

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        return self._echo.connections

    def stop(self) -> None:
        """Stop serving and close its connections; later calls do nothing."""
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
        return f"<TcpEchoServer {self.addr}{' stopped' if self._stopped else ''}>"


def start_tcp_upstream(listen: str = "127.0.0.1:0") -> TcpEchoServer:
    """Start a TCP echo upstream (on an ephemeral port by default)."""
    return TcpEchoServer(listen)


def start_upstream(
    listen: str = "127.0.0.1:0",
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    client_ca: str | None = None,
) -> EchoServer:
    """Start an echo upstream (on an ephemeral port by default); TLS options as
    :class:`EchoServer`'s."""
    return EchoServer(listen, tls_cert=tls_cert, tls_key=tls_key, client_ca=client_ca)


def start_proxy(
    app: type[Proxy[Any]] | Proxy[Any], **options: Unpack[ServerOptions]
) -> ProxyServer:
    """Serve ``app`` from a background thread (on an ephemeral port unless ``listen`` is
    given) and return once it is listening; ``options`` are ``ProxyServer``'s."""
    return ProxyServer(app, **options).start()


@dataclasses.dataclass(frozen=True)
class SimulatedRequest:
    """A request for :func:`simulate`; build it with :func:`request`."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client_addr: str
    local_addr: str


def request(
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    body: bytes | str = b"",
    client_addr: str = "127.0.0.1:50000",
    local_addr: str = "127.0.0.1:8080",
) -> SimulatedRequest:
    """An HTTP/1.1 request for :func:`simulate`. ``path`` may carry a query (``/a?b=1``);
    a ``Host`` header (``localhost``) and a ``Content-Length`` for a body are added unless
    ``headers`` has them, as a client would send."""
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    names = {name.lower() for name, _ in pairs}
    if "host" not in names:
        pairs.insert(0, ("host", "localhost"))
    data = body.encode() if isinstance(body, str) else bytes(body)
    if data and "content-length" not in names and "transfer-encoding" not in names:
        pairs.append(("content-length", str(len(data))))
    return SimulatedRequest(method, path, tuple(pairs), data, client_addr, local_addr)


def simulate(
    app: type[Proxy] | Proxy,
    req: SimulatedRequest,
    *,
    upstream: _core.Response | None = None,
) -> SimulationResult:
    """Run ``req`` through ``app``'s real phases (hooks, and whatever the engine runs between
    them) with the sockets replaced: every upstream answers ``upstream`` (default: an empty
    200). Needs no running server; sync and async hooks both work, on a loop of its own.

    Returns the response the client would get (``status``, ``headers``, ``body``), what the
    upstream was sent (``upstream_request`` and ``upstream_body``, None when nothing was
    proxied), the ``peer`` chosen, and the ``error`` that ``fail_to_proxy`` and ``logging``
    saw. A fixed peer is the app's ``upstream`` attribute, as when serving.
    """
    loop = asyncio.new_event_loop()
    try:
        # No access log: nothing is served, and a writer thread per call would be waste.
        served = _LoopServer(app, loop, ServerOptions(access_log=False))
        simulation = served.server.simulate(
            req.method,
            req.path,
            list(req.headers),
            req.body,
            req.client_addr,
            req.local_addr,
            upstream,
        )
        loop.add_reader(served.server.fileno(), served.server.run_pending)
        try:
            loop.run_until_complete(served.serve(finish_pending=True))
        finally:
            loop.remove_reader(served.server.fileno())
        return simulation.result()
    finally:
        _close_loop(loop)
