"""Serving an app: :func:`run` blocks the calling (main) thread, for the CLI;
:class:`ProxyServer` serves from a background thread, for tests and embedding.

Both wire one asyncio event loop to one ``_core.Server`` through ``_LoopServer``: the engine
serves on its own Rust runtime and queues the work that needs Python; the loop runs that work
whenever the server's descriptor becomes readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypedDict

from . import _core
from ._core import LoadBalancer, Peer
from ._dispatch import Dispatcher, HookSettings
from .compression import Compression
from .filters import Filter, IPAccess
from .listener import Listener
from .proxy import (
    Proxy,
    as_upstream,
    declared,
    overridden_hooks,
    resolve_upstream,
    serve_instance,
)
from .routes import Route
from .tls import TlsConfig

if TYPE_CHECKING:
    # Both in typing from 3.11; type checkers know typing_extensions without it installed.
    from typing_extensions import Self, Unpack

__all__ = [
    "DEFAULT_BLOCKING_THREADS",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HOOK_TIMEOUT",
    "DEFAULT_SLOW_HOOK_THRESHOLD",
    "ProxyServer",
    "ServerOptions",
    "run",
]

_log: Final = logging.getLogger("ferroxy")

#: The engine's default (``ServerConfig::default()``), as ``_core.DEFAULTS`` reports it.
DEFAULT_GRACE_PERIOD: Final[float] = _core.DEFAULTS["grace_period"]

# The options Python carries out (the hooks run here, the engine never sees them), and the one
# place their defaults are stated.
#: Threads for ``@ferroxy.blocking`` hooks; started on first use.
DEFAULT_BLOCKING_THREADS: Final[int] = 32
#: Seconds a hook may hold the Python thread before a warning names it.
DEFAULT_SLOW_HOOK_THRESHOLD: Final[float] = 0.1
#: No limit on how long a hook may wait.
DEFAULT_HOOK_TIMEOUT: Final[float | None] = None

_MAX_BLOCKING_THREADS: Final = 1024


class ServerOptions(TypedDict, total=False):
    """Keyword arguments of :func:`run`, :class:`ProxyServer`, ``ferroxy.testing.start_proxy``
    and the ``ferroxy_proxy`` fixture. An option left out keeps the engine's default (see
    ``ferroxy._core.DEFAULTS``); an unknown one raises TypeError naming it."""

    #: ``host:port`` to serve on, ``fd:N`` for an inherited listening socket, a
    #: ``ferroxy.Listener`` with its own TLS and PROXY protocol settings, or a list of them;
    #: overrides the app's ``listen`` (without either: the engine's default, and for
    #: ``ProxyServer`` an ephemeral port on 127.0.0.1).
    listen: str | Listener | Sequence[str | Listener]
    #: Listeners that speak TLS, beside ``listen``'s plain ones (with ``tls`` and no
    #: ``tls_listen``, every ``listen`` address speaks TLS).
    tls_listen: str | Sequence[str]
    #: Certificates for the TLS listeners, overriding the app's ``tls`` attribute.
    tls: TlsConfig | Sequence[TlsConfig]
    #: Response compression, overriding the app's ``compression`` attribute.
    compression: Compression
    #: Every listener given as an address (not a ``Listener``) expects a PROXY protocol
    #: header (v1 or v2) first, from the L4 load balancer in front: its source address
    #: becomes ``session.client_addr``. Connections without a valid one are closed.
    proxy_protocol: bool
    #: Which clients may connect (``ferroxy.filters.IPAccess``), overriding the app's
    #: ``connection_filter``.
    connection_filter: IPAccess
    #: Engine worker threads; 0 means one per CPU.
    threads: int
    #: Seconds in-flight requests may run on once a graceful shutdown begins.
    grace_period: float
    #: Longest wait, in seconds, for a client's request head or more of its body.
    client_read_timeout: float
    #: Longest a write to a client may stall, in seconds.
    client_write_timeout: float
    #: How long an idle keep-alive connection waits for its next request, in seconds.
    keepalive_timeout: float
    #: How long a tunnel (a WebSocket, once the upstream's 101 has switched it) may go without
    #: a byte either way before it is closed, in seconds.
    tunnel_idle_timeout: float
    #: Upper bound, in seconds, on how long a pooled upstream connection stays idle.
    pool_idle_timeout: float
    #: Idle upstream connections kept per peer.
    pool_max_idle_per_peer: int
    #: Where a line per request goes: a file path, ``"-"`` (stdout, also True) or ``"off"``
    #: (also False).
    access_log: str | os.PathLike[str] | bool
    #: ``"combined"`` (nginx's), ``"json"``, or a template of field names such as
    #: ``"{client} {method} {path} {status} {duration}"``.
    access_log_format: str
    #: The upstream, overriding the app's ``upstream`` attribute.
    upstream: Peer | LoadBalancer | str
    #: Load balancers whose health checks and DNS refresh run with this server, beside the
    #: ones found on their own: the app's ``upstream``, and balancers that are attributes of
    #: the app (class or instance) or globals of the module that defines it.
    balancers: Sequence[LoadBalancer]
    #: Threads that run ``@ferroxy.blocking`` hooks (at most this many block at once).
    blocking_threads: int
    #: Seconds a hook may hold the Python thread before a warning names it.
    slow_hook_threshold: float
    #: Seconds a phase's hooks may wait (an async hook awaiting, a blocking hook on its
    #: thread) before the client gets a 504 and later hooks see ``"hook_timeout"``; None
    #: for no limit.
    hook_timeout: float | None


#: The ServerOptions that Python, not ``_core.Server``, carries out.
PYTHON_OPTIONS: Final = frozenset({"blocking_threads", "slow_hook_threshold", "hook_timeout"})


# How often the engine learns the "ferroxy" logger's level, so that raising or lowering it at
# run time takes effect without the engine asking Python for every record.
_LOG_LEVEL_REFRESH_SECONDS: Final = 1.0

# Where a ProxyServer listens unless told: tests and embedders want a free port, not :8080.
_EPHEMERAL_LISTEN: Final = "127.0.0.1:0"

# ProxyServer.stop() waits this much longer than the grace period for the thread to end.
_STOP_MARGIN_SECONDS: Final = 5.0


def _instantiate(app: type[Proxy[Any]] | Proxy[Any]) -> Proxy[Any]:
    if isinstance(app, Proxy):
        return app
    if isinstance(app, type) and issubclass(app, Proxy):
        return app()
    raise TypeError(f"expected a Proxy subclass or instance, not {app!r}")


class _LoopServer:
    """A ``_core.Server`` for ``app`` whose Python work runs on ``loop``.

    Everything but the constructor and :meth:`start` must run on the loop's thread (or before
    the loop runs).
    """

    def __init__(
        self,
        app: type[Proxy[Any]] | Proxy[Any],
        loop: asyncio.AbstractEventLoop,
        options: ServerOptions,
        *,
        default_listen: str | None = None,
    ) -> None:
        proxy = _instantiate(app)
        cls = type(proxy)
        hooks = overridden_hooks(cls)
        engine_options: dict[str, Any] = dict(options)
        if "listen" not in engine_options:
            listen = proxy.listen if proxy.listen is not None else default_listen
            if listen is not None:
                engine_options["listen"] = listen
        if engine_options.get("connection_filter") is None:
            declared_filter = _connection_filter(proxy)
            if isinstance(declared_filter, IPAccess):
                engine_options["connection_filter"] = declared_filter
            elif declared_filter is not None:
                hooks = hooks | {CONNECTION_HOOK}
        if "upstream" in engine_options:
            upstream = as_upstream(engine_options.pop("upstream"), "upstream")
        else:
            upstream = resolve_upstream(proxy)
        if "tls" not in engine_options and proxy.tls is not None:
            engine_options["tls"] = proxy.tls
        if "compression" not in engine_options and proxy.compression is not None:
            engine_options["compression"] = proxy.compression
        routes = declared(proxy, "routes", Route)
        filters = declared(proxy, "filters", Filter)
        if upstream is None and "upstream_peer" not in hooks and not routes:
            raise TypeError(
                f"{cls.__name__} must set `upstream` or `routes`, or override upstream_peer()"
            )
        engine_options["balancers"] = balancers_of(
            proxy,
            upstream,
            [*engine_options.pop("balancers", ()), *(route.upstream for route in routes)],
        )
        self.loop = loop
        self.proxy = proxy
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._log_level_timer: asyncio.TimerHandle | None = None
        self._started = False
        settings = _hook_settings(engine_options)
        self.dispatcher = Dispatcher(
            proxy, hooks, loop=loop, on_stopped=self._on_stopped, settings=settings
        )
        try:
            self.server = _core.Server(
                self.dispatcher,
                hooks=hooks,
                upstream=upstream,
                filters=filters or None,
                routes=routes or None,
                **engine_options,
            )
        except BaseException:
            self.dispatcher.close()
            raise

    def start(self) -> None:
        """Bind (OSError names the address) and let the loop run the engine's queued work."""
        # The level first, so the engine forwards what it logs while starting.
        self._refresh_log_level()
        # For Proxy.reload, while this server runs the instance.
        serve_instance(self.proxy, self.server, self.server.start)
        self._started = True
        self.loop.add_reader(self.server.fileno(), self.server.run_pending)

    def shutdown(self, grace_period: float | None = None) -> None:
        """Stop accepting; in-flight requests get ``grace_period`` (default: configured)."""
        self.server.shutdown(grace_period)

    async def serve(self, *, finish_pending: bool = False) -> None:
        """Wait until the engine has stopped, then end the phases still waiting: cancel
        them, or with ``finish_pending`` let them run to their end (a simulated request's
        async ``logging`` hook)."""
        await self._stopped
        if finish_pending:
            await self.dispatcher.finish_pending()
        else:
            await self.dispatcher.cancel_pending()

    def close(self) -> None:
        """Detach from the loop; stops the engine at once if it is still running."""
        if self._log_level_timer is not None:
            self._log_level_timer.cancel()
            self._log_level_timer = None
        self.dispatcher.close()
        if not self._started:
            return
        if self.proxy._ferroxy_server is self.server:
            self.proxy._ferroxy_server = None
        if not self.server.stopped:
            self.server.shutdown(0.0)
        self.loop.remove_reader(self.server.fileno())

    def _on_stopped(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def _refresh_log_level(self) -> None:
        _core.set_log_level(_log.getEffectiveLevel())
        self._log_level_timer = self.loop.call_later(
            _LOG_LEVEL_REFRESH_SECONDS, self._refresh_log_level
        )


#: The hook asked once per connection rather than per request (``Proxy.connection_filter``).
CONNECTION_HOOK: Final = "connection_filter"


def _connection_filter(app: Proxy[Any]) -> IPAccess | object | None:
    """``app.connection_filter``: an IPAccess, a hook to call, or None; TypeError otherwise."""
    value = app.connection_filter
    if value is None or isinstance(value, IPAccess) or callable(value):
        return value
    raise TypeError(
        f"{type(app).__name__}.connection_filter must be a ferroxy.filters.IPAccess or a "
        f"method, not {type(value).__name__}"
    )


def _hook_settings(options: dict[str, Any]) -> HookSettings:
    """Take Python's own options out of ``options`` (ValueError naming a bad one)."""
    threads = options.pop("blocking_threads", DEFAULT_BLOCKING_THREADS)
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"blocking_threads must be an int, not {type(threads).__name__}")
    if not 1 <= threads <= _MAX_BLOCKING_THREADS:
        raise ValueError(
            f"blocking_threads must be between 1 and {_MAX_BLOCKING_THREADS}, got {threads}"
        )
    threshold = _seconds(
        "slow_hook_threshold", options.pop("slow_hook_threshold", DEFAULT_SLOW_HOOK_THRESHOLD)
    )
    timeout = options.pop("hook_timeout", DEFAULT_HOOK_TIMEOUT)
    return HookSettings(
        blocking_threads=threads,
        slow_hook_threshold=threshold,
        hook_timeout=None if timeout is None else _seconds("hook_timeout", timeout),
    )


def _seconds(field: str, value: object) -> float:
    """``value`` as a positive, finite number of seconds; else an error naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a positive number of seconds, got {value}")
    return float(value)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def run(app: type[Proxy[Any]] | Proxy[Any], **options: Unpack[ServerOptions]) -> None:
    """Serve ``app`` (a Proxy subclass, instantiated with no arguments, or an instance) until
    SIGINT or SIGTERM, then stop gracefully and return. SIGUSR1 reopens the access log file,
    SIGHUP reloads the TLS certificates.

    ``options`` are :class:`ServerOptions`, each defaulting to the engine's (``listen`` too:
    ``_core.DEFAULTS["listen"]``). An unknown option raises TypeError, a bad value ValueError,
    a failure to bind or to open the access log OSError.
    """
    loop = asyncio.new_event_loop()
    try:
        served = _LoopServer(app, loop, options)
        try:
            served.start()
            for addr, scheme in zip(served.server.addrs, served.server.schemes, strict=True):
                print(f"ferroxy listening on {scheme}://{addr}", file=sys.stderr)
            grace_period = options.get("grace_period", DEFAULT_GRACE_PERIOD)
            installed = _install_signal_handlers(served, grace_period)
            try:
                loop.run_until_complete(served.serve())
            finally:
                for signum in installed:
                    loop.remove_signal_handler(signum)
        finally:
            served.close()
    finally:
        _close_loop(loop)


def _reload_tls(served: _LoopServer) -> None:
    """SIGHUP: the certificates again from their files; a bad file keeps the old ones."""
    try:
        if served.server.reload_tls():
            _log.info("TLS certificates reloaded")
    except ValueError as error:
        _log.error("TLS certificates not reloaded, the old ones stay: %s", error)


def _install_signal_handlers(served: _LoopServer, grace_period: float) -> list[int]:
    """SIGINT/SIGTERM start a graceful shutdown, SIGUSR1 reopens the access log (logrotate
    renames the file, then signals, as for nginx); returns the signals handled."""

    shutting_down = False

    def on_signal() -> None:
        nonlocal shutting_down
        if shutting_down:
            # The engine's shutdown cannot be hurried once begun; the grace period bounds it.
            _log.info("already shutting down")
            return
        shutting_down = True
        _log.info("shutting down (grace %ss)", grace_period)
        served.shutdown()

    handlers = [(signal.SIGINT, on_signal), (signal.SIGTERM, on_signal)]
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        handlers.append((signal.SIGUSR1, served.server.reopen_access_log))
    if hasattr(signal, "SIGHUP"):
        handlers.append((signal.SIGHUP, lambda: _reload_tls(served)))
    installed: list[int] = []
    for signum, handler in handlers:
        try:
            served.loop.add_signal_handler(signum, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            # No loop signal support here (Windows, or not the main thread): the default
            # handlers stay in place.
            _log.debug("cannot handle signal %s on this loop", signum)
        else:
            installed.append(signum)
    return installed


def balancers_of(app: Proxy[Any], upstream: object, given: Sequence[object]) -> list[LoadBalancer]:
    """The load balancers ``app`` uses, whose background services (health checks, DNS
    refresh) its server runs: ``given``, ``upstream``, the balancers among the app's
    attributes (its class's, its bases', its own), the variables its hooks close over, and
    the globals of its class's module (where a pool picked from in ``upstream_peer`` usually
    lives). Each once."""
    cls = type(app)
    module = sys.modules.get(cls.__module__)
    namespaces = [*(vars(c) for c in cls.__mro__), getattr(app, "__dict__", {})]
    places: list[object] = [*given, upstream]
    for namespace in namespaces:
        for value in namespace.values():
            places.append(value)
            for cell in getattr(value, "__closure__", None) or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    places.append(cell.cell_contents)
    if module is not None:
        places.extend(vars(module).values())
    found: dict[int, LoadBalancer] = {}
    for value in places:
        if isinstance(value, LoadBalancer):
            found.setdefault(id(value), value)
    return list(found.values())


class ProxyServer:
    """``app`` served from a background thread, for tests and embedding.

    ``start()`` returns once the listener is bound (raising here if binding or the
    configuration fails); ``stop()`` shuts down gracefully and joins the thread. Also a
    context manager. No signal handlers are installed. ``options`` are :func:`run`'s, but
    ``listen`` defaults (when the app has no ``listen`` either) to an ephemeral port on
    127.0.0.1.
    """

    def __init__(
        self, app: type[Proxy[Any]] | Proxy[Any], **options: Unpack[ServerOptions]
    ) -> None:
        self._app = app
        self._options = options
        self._served: _LoopServer | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    def start(self) -> ProxyServer:
        if self._served is not None:
            raise RuntimeError("this ProxyServer was already started")
        # The loop and server are built and bound here, so start-up errors reach the caller;
        # the thread only runs the loop.
        loop = asyncio.new_event_loop()
        try:
            served = _LoopServer(self._app, loop, self._options, default_listen=_EPHEMERAL_LISTEN)
            served.start()
        except BaseException:
            loop.close()
            raise
        self._served = served
        self._thread = threading.Thread(
            target=self._serve, name=f"ferroxy-proxy-{served.server.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, grace_period: float | None = None) -> None:
        """Shut down (in-flight requests get ``grace_period``, default: configured) and wait
        for the thread. Raises TimeoutError if it does not end in time, and re-raises an
        exception that ended the thread. Does nothing if not running."""
        thread, served = self._thread, self._served
        if thread is None or served is None:
            return
        if thread.is_alive():
            # RuntimeError: the loop has just closed, the thread is ending on its own.
            with contextlib.suppress(RuntimeError):
                served.loop.call_soon_threadsafe(served.shutdown, grace_period)
        if grace_period is None:
            grace_period = self._options.get("grace_period", DEFAULT_GRACE_PERIOD)
        timeout = grace_period + _STOP_MARGIN_SECONDS
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the proxy on {self.url} did not stop within {timeout:.1f}s")
        self._thread = None
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error

    @property
    def addr(self) -> str:
        """``host:port`` the proxy listens on."""
        return self._server.addr

    @property
    def addrs(self) -> list[str]:
        """Every listener's ``host:port``, in the order ``listen`` gave them."""
        return self._server.addrs

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        """The first listener's URL: ``http://`` or ``https://`` and its address."""
        return f"{self._server.schemes[0]}://{self._server.addr}"

    @property
    def urls(self) -> list[str]:
        """Every listener's URL, in the order of ``addrs``."""
        return [
            f"{scheme}://{addr}"
            for addr, scheme in zip(self._server.addrs, self._server.schemes, strict=True)
        ]

    @property
    def python_calls(self) -> int:
        """Phase calls the engine has handed to Python so far."""
        return self._server.python_calls

    def reload_tls(self) -> None:
        """Read the TLS certificates again, as SIGHUP does for :func:`run` (see
        ``Proxy.reload_tls``)."""
        self._server.reload_tls()

    def reopen_access_log(self) -> None:
        """Reopen the access log file, as SIGUSR1 does for :func:`run`: lines logged from
        now on go to a new file at its path (after a log rotation renamed the old one)."""
        self._server.reopen_access_log()

    @property
    def _server(self) -> _core.Server:
        if self._served is None:
            raise RuntimeError("the ProxyServer has not been started")
        return self._served.server

    def _serve(self) -> None:
        assert self._served is not None
        served = self._served
        try:
            served.loop.run_until_complete(served.serve())
        except BaseException as error:
            self._thread_error = error
        finally:
            served.close()
            _close_loop(served.loop)

    def __enter__(self) -> Self:
        if self._served is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._served is not None else "not started"
        return f"<ProxyServer {where}>"
