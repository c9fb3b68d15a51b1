"""Routes: which upstream a request goes to, by host and path, matched in Rust.

``Proxy.routes`` is compiled at start-up into one matcher: the host first (routes naming it
exactly, then ``*.suffix`` routes, longest first, then routes for any host); within them the
longest ``path_prefix`` that matches, then the ``path_regex`` routes in list order, then a
route with neither (the default). The matched route's ``upstream`` is used unless the app
overrides ``upstream_peer``; ``session.route`` is the ``Route`` object that matched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _core
from .filters import _Declared, _optional_text
from .proxy import as_upstream

if TYPE_CHECKING:
    from ._core import LoadBalancer, Peer

__all__ = ["Route"]


class Route(_Declared):
    """Send requests for ``host`` (``"api.example.com"`` or ``"*.example.com"``; any when
    None) whose path starts with ``path_prefix`` or matches ``path_regex`` to ``upstream``
    (a ``Peer``, ``"host:port"`` or ``LoadBalancer``). ``strip_prefix`` sends the path
    without its ``path_prefix`` (``/v1/users`` under ``/v1/`` goes up as ``/users``)."""

    __slots__ = ("host", "path_prefix", "path_regex", "strip_prefix", "upstream")

    def __init__(
        self,
        *,
        host: str | None = None,
        path_prefix: str | None = None,
        path_regex: str | None = None,
        upstream: Peer | LoadBalancer | str,
        strip_prefix: bool = False,
    ) -> None:
        self.host = _optional_text(self, "host", host)
        self.path_prefix = _optional_text(self, "path_prefix", path_prefix)
        self.path_regex = _optional_text(self, "path_regex", path_regex)
        resolved = as_upstream(upstream, "Route.upstream")
        if resolved is None:
            raise TypeError("Route.upstream is required: a Peer, a LoadBalancer or 'host:port'")
        self.upstream = resolved
        self.strip_prefix = bool(strip_prefix)
        _core.check_route(self)
