"""The ``Proxy`` base class: subclass it and override the hooks you need.

Hooks run in this order for every request, each receiving the per-request ``ctx``:

1. ``new_ctx()`` builds ``ctx`` (stored on ``session.ctx``).
2. ``request_filter(session, ctx)`` may answer the client itself with a ``Response``.
3. ``upstream_peer(session, ctx)`` picks the upstream (or set the class attribute
   ``upstream`` to a ``Peer`` or ``LoadBalancer`` and no Python runs for this step at all).
4. ``upstream_request_filter(session, upstream_request, ctx)`` edits the request sent upstream.
5. ``fail_to_connect(session, peer, error, ctx)`` runs when connecting failed; it may veto or
   force another try, which starts again at 3.
6. ``response_filter(session, upstream_response, ctx)`` edits the response head.
7. ``fail_to_proxy(session, error, ctx)`` runs instead of 4-6 when anything failed.
8. ``logging(session, error, ctx)`` always runs last.

Once per connection, before any of these and before its TLS handshake,
``connection_filter(client_addr)`` may refuse the client: the connection is closed unanswered.

Any hook may be written as ``def`` or ``async def``. Only the hooks a subclass overrides are
ever called: the engine skips a phase entirely when its hook is the base class's. A ``def``
hook that blocks (a synchronous HTTP client, a database driver) is decorated with
:func:`blocking` so that it runs on a thread of its own rather than the event loop's.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from inspect import iscoroutinefunction
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar, cast, final

from . import _core
from ._core import (
    LoadBalancer,
    Peer,
    ProxyError,
    RequestHeader,
    Response,
    ResponseHeader,
    Session,
)

__all__ = ["DROP", "HOOK_NAMES", "Drop", "MaybeAwaitable", "Proxy", "blocking", "is_blocking"]

_T = TypeVar("_T")
_Hook = TypeVar("_Hook", bound=Callable[..., object])

# Set on a hook function by @blocking; a bound method reads it through to its function.
_BLOCKING_MARK: Final = "__ferroxy_blocking__"

if TYPE_CHECKING:
    # A default (PEP 696) lets a bare ``Proxy`` mean ``Proxy[Any]``, also under mypy --strict.
    # typing has it from 3.13 only; type checkers know typing_extensions without it being
    # installed, and at run time the default changes nothing.
    from typing_extensions import TypeVar as _TypeVarWithDefault

    from .compression import Compression
    from .filters import Filter, IPAccess
    from .listener import Listener
    from .routes import Route
    from .tls import TlsConfig

    CtxT = _TypeVarWithDefault("CtxT", default=Any)
else:
    CtxT = TypeVar("CtxT")

#: What a hook returns: the value itself (``def``) or an awaitable of it (``async def``).
MaybeAwaitable: TypeAlias = _T | Awaitable[_T]


@final
class Drop:
    """The type of :data:`DROP` (any instance means the same)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ferroxy.DROP"


#: Returned by ``websocket_message``: send nothing for this message.
DROP: Final = Drop()

#: Every hook, in the order the engine runs them (the engine's list: ``phase::HOOK_NAMES``).
HOOK_NAMES: Final[tuple[str, ...]] = _core.HOOK_NAMES


class Proxy(Generic[CtxT]):
    """Base class for a ferroxy application, generic over its per-request context.

    Set ``upstream`` for a fixed upstream, or override :meth:`upstream_peer` to choose one
    per request; override any other hook to inspect or change the traffic.

    ``class App(Proxy[MyCtx])`` types ``ctx`` as ``MyCtx`` in every hook and makes
    ``new_ctx`` return one; a bare ``class App(Proxy)`` leaves ``ctx`` untyped (``Any``).
    """

    #: Where requests go when ``upstream_peer`` is not overridden: a ``Peer``, a
    #: ``"host:port"``, or a ``LoadBalancer`` that picks a backend per request (with its
    #: retries). Either way no Python runs to route a request. Set on the class or on the
    #: instance that is served.
    upstream: Peer | LoadBalancer | str | None = None

    #: ``ferroxy.Route`` s, matched in Rust before any hook runs: the matched route's
    #: upstream is used unless ``upstream_peer`` is overridden (then it chooses, and may read
    #: ``session.route``); requests no route matches go to ``upstream``.
    routes: Sequence[Route] = ()

    #: ``ferroxy.filters`` run in Rust, in list order: request-phase ones before
    #: ``request_filter`` (one that answers ends the request before any hook), response-phase
    #: ones after ``response_filter``.
    filters: Sequence[Filter] = ()

    #: ``ferroxy.TlsConfig`` (or a list of them, chosen by SNI): the listeners speak TLS
    #: (every ``listen`` address, or the ``tls_listen`` ones when those are given).
    tls: TlsConfig | Sequence[TlsConfig] | None = None

    #: ``ferroxy.Compression``: responses compressed in Rust (gzip, brotli, zstd) for clients
    #: that accept it. None (the default) sends them as the upstream did.
    compression: Compression | None = None

    #: Where to serve, when the server is not told (the ``listen`` option wins): a
    #: ``"host:port"`` (or ``"fd:N"``), a ``ferroxy.Listener`` with its own TLS and PROXY
    #: protocol settings, or a list of them.
    listen: str | Listener | Sequence[str | Listener] | None = None

    #: Which clients may connect, asked once per connection (not per request), after its
    #: PROXY protocol header and before its TLS handshake: a ``ferroxy.filters.IPAccess``
    #: (allow/deny CIDRs, run in Rust), or a method
    #: ``def connection_filter(self, client_addr: str) -> bool`` (or ``async def``; may be
    #: ``@ferroxy.blocking``) given ``client_addr`` as ``session.client_addr`` shows it.
    #: False closes the connection at once, unanswered; so does a hook that raises (its
    #: traceback is logged) or returns anything but a bool.
    connection_filter: IPAccess | Callable[[str], MaybeAwaitable[bool]] | None = None

    #: The engine server serving this instance, while one does (set by the server; one at a
    #: time: see :func:`serve_instance`).
    _ferroxy_server: _core.Server | None = None

    def reload(
        self, *, filters: Sequence[Filter] | None = None, routes: Sequence[Route] | None = None
    ) -> None:
        """Swap the running proxy's ``filters`` and/or ``routes`` at once: requests that
        arrive from now on run the new lists, requests in flight finish on the old ones, none
        is dropped. A list given replaces that one (``[]`` clears it), one left out (None)
        stays. Callable from a hook or from any thread.

        Checked as at start-up: a bad filter or route raises (ValueError naming
        ``filters[i]`` and the field, TypeError for what is not one) and nothing changes.
        The new routes' load balancers get their health checks and DNS refresh from this
        server; a balancer only routes reloaded away used has them stopped (requests still
        on those routes are served by it on the health it last saw); those the server
        started with keep them until it stops. On
        success the instance's ``filters`` and ``routes`` are the new lists (concurrent
        reloads take turns, so the lists always match what the engine runs). RuntimeError
        when no server is running this instance: before it starts, set the lists instead.

        A filter object keeps its state across reloads: the very same ``RateLimit`` keeps its
        counters, the same ``BasicAuth`` its remembered verdicts; a new object (even an equal
        one) starts afresh.
        """
        # Imported here: both modules import this one.
        from .filters import Filter
        from .routes import Route

        name = type(self).__name__
        new_filters = None if filters is None else checked_items(filters, f"{name}.filters", Filter)
        new_routes = None if routes is None else checked_items(routes, f"{name}.routes", Route)
        balancers = [r.upstream for r in new_routes or () if isinstance(r.upstream, LoadBalancer)]
        with _instance_lock(self):
            server = self._ferroxy_server
            if server is None or server.stopped:
                raise RuntimeError(
                    f"{name} is not being served: reload() changes a running proxy's rules "
                    "(before it starts, set its `filters` and `routes`)"
                )
            server.reload(filters=new_filters, routes=new_routes, balancers=balancers)
            if new_filters is not None:
                self.filters = new_filters
            if new_routes is not None:
                self.routes = new_routes

    def reload_tls(self) -> None:
        """Read the TLS certificates, keys and CA bundle again from their files, as SIGHUP
        does for ``python -m ferroxy``: new handshakes use them, open connections keep theirs.
        A file that cannot be used raises ValueError naming it, and the certificates in use
        stay. RuntimeError when no server is running this instance."""
        with _instance_lock(self):
            server = self._ferroxy_server
            if server is None or server.stopped:
                raise RuntimeError(f"{type(self).__name__} is not being served")
            server.reload_tls()

    def new_ctx(self) -> MaybeAwaitable[CtxT]:
        """Create the per-request context passed as ``ctx`` to every hook.

        Default: None, which suits ``Proxy`` and ``Proxy[None]``; an app that names another
        ctx type overrides this to build one."""
        return cast("CtxT", None)

    def request_filter(self, session: Session, ctx: CtxT) -> MaybeAwaitable[Response | None]:
        """Return a ``Response`` to answer the client without proxying; None to go on."""
        return None

    def upstream_peer(self, session: Session, ctx: CtxT) -> MaybeAwaitable[Peer | str]:
        """Return the upstream for this request, as a ``Peer`` or ``"host:port"``."""
        raise NotImplementedError(
            f"{type(self).__name__} must set `upstream` or override upstream_peer()"
        )

    def upstream_request_filter(
        self, session: Session, upstream_request: RequestHeader, ctx: CtxT
    ) -> MaybeAwaitable[None]:
        """Edit ``upstream_request`` (already free of hop-by-hop headers) in place."""
        return None

    def response_filter(
        self, session: Session, upstream_response: ResponseHeader, ctx: CtxT
    ) -> MaybeAwaitable[None]:
        """Edit the upstream's response head in place before it reaches the client."""
        return None

    def fail_to_connect(
        self, session: Session, peer: Peer | None, error: ProxyError, ctx: CtxT
    ) -> MaybeAwaitable[bool | None]:
        """Connecting to ``peer`` failed, before anything was sent. ``error.retry`` says
        whether the proxy will ask ``upstream_peer`` (or the balancer) again, as the retry
        policy allows; return True to retry anyway, False to fail now, None to leave it.
        ``error.tries`` lists the failed tries before this one."""
        return None

    def request_body_filter(
        self, session: Session, chunk: bytes, end_of_stream: bool, ctx: CtxT
    ) -> MaybeAwaitable[bytes | None]:
        """See each chunk of the request body on its way upstream; return the bytes to send
        instead (``b""`` for none), or None to send it unchanged. Called in order, then with
        ``end_of_stream`` True (with the last chunk, or with ``b""`` after it), so a filter
        may add to the end. Only for requests with a body. The request then goes upstream
        without its Content-Length (chunked over HTTP/1.1), as the length may change. The
        next chunk is read only once this one is answered: a slow hook slows the client.
        ``session.req`` is not available here (the engine holds the head meanwhile): decide
        in ``request_filter`` and keep what you need in ``ctx``. A request sent again (a
        retry) is filtered again, from the client's bytes. An exception ends the request
        with a 500 (if the upstream has not answered yet)."""
        return None

    def response_body_filter(
        self, session: Session, chunk: bytes, end_of_stream: bool, ctx: CtxT
    ) -> MaybeAwaitable[bytes | None]:
        """See each chunk of the response body on its way to the client, as the upstream sent
        it (compression, when set, encodes what this returns); return the bytes to send
        instead (``b""`` for none), or None to send it unchanged. Called in order, then with
        ``end_of_stream`` True, as ``request_body_filter`` is. Not called for responses
        without a body (HEAD, 204, 304), nor for a 206 (its Content-Range describes the
        bytes as sent). The response then loses its Content-Length (chunked
        over HTTP/1.1) and its ETag becomes weak. The next chunk is read from the upstream
        only once the client has taken this one. ``session.req`` shows the request as it
        was sent (edits to it change nothing now). An exception cuts the response off (the
        client sees it incomplete) and logs the traceback."""
        return None

    def websocket_message(
        self, session: Session, message: str | bytes, from_client: bool, ctx: CtxT
    ) -> MaybeAwaitable[str | bytes | Drop | None]:
        """See each message of a WebSocket the request became (text as ``str``, binary as
        ``bytes``, fragments joined); return the message to send instead, None to send it
        unchanged, or ``ferroxy.DROP`` to send nothing. Messages come in order per direction;
        ping, pong and close frames pass on their own. Without this hook the tunnel copies
        bytes without parsing them. A hook that raises (or outlives ``hook_timeout``) drops
        that message (the traceback is logged) and the tunnel goes on. ``session.req`` is
        not available here: decide at the handshake, in ``request_filter``, into ``ctx``."""
        return None

    def fail_to_proxy(
        self, session: Session, error: ProxyError, ctx: CtxT
    ) -> MaybeAwaitable[Response | None]:
        """Return the ``Response`` to send when proxying failed; None for the default page."""
        return None

    def logging(
        self, session: Session, error: ProxyError | None, ctx: CtxT
    ) -> MaybeAwaitable[None]:
        """Runs last for every request, after the response was sent; ``error`` is None on
        success. Exceptions raised here are logged and otherwise ignored."""
        return None


def _instance_lock(app: Proxy[Any]) -> threading.Lock:
    """``app``'s lock for its server and its rule lists, made on first use (a subclass need
    not call ``__init__``; ``setdefault`` is atomic)."""
    lock: threading.Lock = vars(app).setdefault("_ferroxy_lock", threading.Lock())
    return lock


def serve_instance(app: Proxy[Any], server: _core.Server, start: Callable[[], None]) -> None:
    """Run ``start`` and make ``server`` the one serving ``app``, unless another running
    server already serves it: RuntimeError then, as ``reload`` could not keep two servers'
    rules in step (one refusing the new lists after the other took them)."""
    with _instance_lock(app):
        serving = app._ferroxy_server
        if serving is not None and not serving.stopped:
            raise RuntimeError(
                f"this {type(app).__name__} instance is already being served: serve another "
                "instance (each server runs one, and reload() swaps its rules)"
            )
        start()
        app._ferroxy_server = server


def blocking(hook: _Hook) -> _Hook:
    """Run this ``def`` hook on the server's thread pool (``blocking_threads`` threads), off
    the event loop, so that while it blocks only its own request waits.

    For hooks that call blocking code: a synchronous HTTP client, a database driver,
    ``time.sleep``. The hook gets the same arguments and its result is used as a plain
    hook's; it must not touch the event loop. An ``async def`` hook never needs this (it
    already yields the loop while it waits): decorating one raises TypeError.
    """
    if iscoroutinefunction(hook):
        raise TypeError(
            f"@ferroxy.blocking is for `def` hooks, and {_hook_name(hook)} is `async def` "
            "(it already yields the loop while it awaits): remove the decorator"
        )
    try:
        setattr(hook, _BLOCKING_MARK, True)
    except AttributeError:
        raise TypeError(
            f"@ferroxy.blocking takes a hook function, not {type(hook).__name__}"
        ) from None
    return hook


def is_blocking(hook: object) -> bool:
    """Whether ``hook`` (a function or a bound method) was decorated with :func:`blocking`."""
    return getattr(hook, _BLOCKING_MARK, False) is True


def _hook_name(hook: object) -> str:
    return str(getattr(hook, "__qualname__", hook))


def overridden_hooks(cls: type[Proxy[Any]]) -> frozenset[str]:
    """Names of the hooks whose implementation on ``cls`` is not the base class's."""
    return frozenset(name for name in HOOK_NAMES if getattr(cls, name) is not getattr(Proxy, name))


def resolve_upstream(app: Proxy[Any]) -> Peer | LoadBalancer | None:
    """``app.upstream`` (the instance's own, else its class's) as a ``Peer`` or
    ``LoadBalancer`` (a ``"host:port"`` str is converted), or None when it is not set."""
    return as_upstream(app.upstream, f"{type(app).__name__}.upstream")


def declared(app: Proxy[Any], name: str, kind: type[_T]) -> tuple[_T, ...]:
    """``app.routes`` or ``app.filters`` as a tuple, each item checked to be a ``kind``
    (TypeError naming ``App.routes[i]`` otherwise)."""
    return checked_items(getattr(app, name), f"{type(app).__name__}.{name}", kind)


def checked_items(items: object, where: str, kind: type[_T]) -> tuple[_T, ...]:
    """``items`` as a tuple, each checked to be a ``kind`` (TypeError naming ``where[i]``,
    or ``where`` when it is not a list)."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{where} must be a list, not {type(items).__name__}")
    checked = tuple(cast("Iterable[object]", items))
    for i, item in enumerate(checked):
        if not isinstance(item, kind):
            raise TypeError(f"{where}[{i}] must be a {kind.__name__}, not {type(item).__name__}")
    return cast("tuple[_T, ...]", checked)


def as_upstream(value: object, name: str) -> Peer | LoadBalancer | None:
    """``value`` (a Peer, a LoadBalancer, ``"host:port"`` or None) as a Peer, a LoadBalancer
    or None; TypeError naming ``name`` for anything else."""
    if value is None or isinstance(value, (Peer, LoadBalancer)):
        return value
    if isinstance(value, str):
        return Peer(value)
    raise TypeError(
        f"{name} must be a Peer, a LoadBalancer or a 'host:port' str, not {type(value).__name__}"
    )
