"""ferroxy: a programmable HTTP proxy. A Rust engine does the I/O; Python hooks decide.

Subclass :class:`Proxy`, override the hooks you need (decorate a ``def`` hook that blocks with
:func:`blocking`), and serve it with :func:`run` or ``python -m ferroxy path/to/app.py:App``.
A :class:`TcpProxy` proxies TCP (L4); a :class:`Server` serves several services in one
process.
"""

from . import filters
from ._core import (
    ClientCert,
    ClientConn,
    Headers,
    HealthCheck,
    LoadBalancer,
    Peer,
    ProxyError,
    RequestBodyError,
    RequestHeader,
    Response,
    ResponseHeader,
    ServerConn,
    Session,
    TlsInfo,
    __version__,
)
from .compression import Compression
from .listener import Listener
from .proxy import DROP, Proxy, blocking
from .routes import Route
from .server import ProxyServer, Server, ServerOptions, run
from .tcp import TcpProxy
from .tls import TlsConfig

__all__ = [
    "DROP",
    "ClientCert",
    "ClientConn",
    "Compression",
    "Headers",
    "HealthCheck",
    "Listener",
    "LoadBalancer",
    "Peer",
    "Proxy",
    "ProxyError",
    "ProxyServer",
    "RequestBodyError",
    "RequestHeader",
    "Response",
    "ResponseHeader",
    "Route",
    "Server",
    "ServerConn",
    "ServerOptions",
    "Session",
    "TcpProxy",
    "TlsConfig",
    "TlsInfo",
    "__version__",
    "blocking",
    "filters",
    "run",
]
