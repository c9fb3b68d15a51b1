"""ferroxy: a programmable HTTP proxy. A Rust engine does the I/O; Python hooks decide.

Subclass :class:`Proxy`, override the hooks you need (decorate a ``def`` hook that blocks with
:func:`blocking`), and serve it with :func:`run` or ``python -m ferroxy path/to/app.py:App``.
"""

from . import filters
from ._core import (
    ClientConn,
    Headers,
    HealthCheck,
    LoadBalancer,
    Peer,
    ProxyError,
    RequestHeader,
    Response,
    ResponseHeader,
    ServerConn,
    Session,
    __version__,
)
from .proxy import Proxy, blocking
from .routes import Route
from .server import ProxyServer, ServerOptions, run

__all__ = [
    "ClientConn",
    "Headers",
    "HealthCheck",
    "LoadBalancer",
    "Peer",
    "Proxy",
    "ProxyError",
    "ProxyServer",
    "RequestHeader",
    "Response",
    "ResponseHeader",
    "Route",
    "ServerConn",
    "ServerOptions",
    "Session",
    "__version__",
    "blocking",
    "filters",
    "run",
]
