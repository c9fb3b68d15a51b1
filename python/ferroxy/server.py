"""Serving an app: :func:`run` blocks the calling (main) thread, for the CLI;
:class:`ProxyServer` serves from a background thread, for tests and embedding; :class:`Server`
serves several services (HTTP ``Proxy`` and TCP ``TcpProxy`` apps) in one process, either way.

Each service is one engine server (``_core.Server`` through ``_LoopServer``, or
``_core.TcpServer`` through ``_TcpLoopServer``): the engine serves on its own Rust runtime
and queues the work that needs Python; one asyncio loop runs that work for every service,
whenever a server's descriptor becomes readable.
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
from .tcp import TcpDispatcher, TcpOptions, TcpProxy, overridden_tcp_hooks
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
    "Server",
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
    if isinstance(app, TcpProxy) or (isinstance(app, type) and issubclass(app, TcpProxy)):
        raise TypeError(f"{app!r} is a TcpProxy: serve it with ferroxy.Server")
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


def _connection_filter(app: Proxy[Any] | TcpProxy) -> IPAccess | object | None:
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


def _reload_tls(served: _LoopServer | _TcpLoopServer) -> None:
    """SIGHUP: the certificates again from their files; a bad file keeps the old ones."""
    try:
        if served.server.reload_tls():
            _log.info("TLS certificates reloaded")
    except ValueError as error:
        _log.error("TLS certificates not reloaded, the old ones stay: %s", error)


def _install_signal_handlers(
    served: _LoopServer | Sequence[_LoopServer | _TcpLoopServer], grace_period: float
) -> list[int]:
    """SIGINT/SIGTERM start a graceful shutdown (of every service), SIGUSR1 reopens the
    access logs (logrotate renames the file, then signals, as for nginx), SIGHUP reloads the
    TLS certificates; returns the signals handled."""
    services = [served] if isinstance(served, _LoopServer) else list(served)
    loop = services[0].loop

    shutting_down = False

    def on_signal() -> None:
        nonlocal shutting_down
        if shutting_down:
            # The engine's shutdown cannot be hurried once begun; the grace period bounds it.
            _log.info("already shutting down")
            return
        shutting_down = True
        _log.info("shutting down (grace %ss)", grace_period)
        for service in services:
            service.shutdown()

    def reopen_access_logs() -> None:
        for service in services:
            if isinstance(service, _LoopServer):
                service.server.reopen_access_log()

    def reload_tls() -> None:
        for service in services:
            _reload_tls(service)

    handlers = [(signal.SIGINT, on_signal), (signal.SIGTERM, on_signal)]
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        handlers.append((signal.SIGUSR1, reopen_access_logs))
    if hasattr(signal, "SIGHUP"):
        handlers.append((signal.SIGHUP, reload_tls))
    installed: list[int] = []
    for signum, handler in handlers:
        try:
            loop.add_signal_handler(signum, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            # No loop signal support here (Windows, or not the main thread): the default
            # handlers stay in place.
            _log.debug("cannot handle signal %s on this loop", signum)
        else:
            installed.append(signum)
    return installed


def balancers_of(
    app: Proxy[Any] | TcpProxy, upstream: object, given: Sequence[object]
) -> list[LoadBalancer]:
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


def _instantiate_tcp(app: type[TcpProxy] | TcpProxy) -> TcpProxy:
    if isinstance(app, TcpProxy):
        return app
    if isinstance(app, type) and issubclass(app, TcpProxy):
        return app()
    raise TypeError(f"expected a TcpProxy subclass or instance, not {app!r}")


class _TcpLoopServer:
    """A ``_core.TcpServer`` for the TcpProxy ``app`` whose hooks run on ``loop``; the same
    protocol as ``_LoopServer``'s (all but the constructor and :meth:`start` on the loop's
    thread)."""

    def __init__(
        self,
        app: type[TcpProxy] | TcpProxy,
        loop: asyncio.AbstractEventLoop,
        options: TcpOptions,
        *,
        default_listen: str | None = None,
    ) -> None:
        tcp = _instantiate_tcp(app)
        name = type(tcp).__name__
        hooks = overridden_tcp_hooks(type(tcp))
        engine_options: dict[str, Any] = dict(options)
        if "listen" not in engine_options:
            listen = tcp.listen if tcp.listen is not None else default_listen
            if listen is not None:
                engine_options["listen"] = listen
        connection_hook = False
        if engine_options.get("connection_filter") is None:
            declared_filter = _connection_filter(tcp)
            if isinstance(declared_filter, IPAccess):
                engine_options["connection_filter"] = declared_filter
            elif declared_filter is not None:
                connection_hook = True
        if "upstream" in engine_options:
            upstream = as_upstream(engine_options.pop("upstream"), "upstream")
        else:
            upstream = as_upstream(tcp.upstream, f"{name}.upstream")
        if upstream is None and "upstream_peer" not in hooks:
            raise TypeError(f"{name} must set `upstream` or override upstream_peer()")
        if upstream is not None and "upstream_peer" in hooks:
            # The hook would win, and the unused balancer's health checks would still run.
            raise TypeError(
                f"{name} sets `upstream` and overrides upstream_peer(): choose one (a hook "
                "that picks from a pool returns pool.select())"
            )
        for field in ("tls", "idle_timeout", "connect_tries", "proxy_protocol"):
            if field not in engine_options:
                engine_options[field] = getattr(tcp, field)
            where = field if field in options else f"{name}.{field}"
            if field == "idle_timeout":
                engine_options[field] = _seconds(where, engine_options[field])
            elif field == "connect_tries":
                tries = engine_options[field]
                if isinstance(tries, bool) or not isinstance(tries, int) or not 1 <= tries <= 100:
                    raise ValueError(f"{where} must be an int from 1 to 100, got {tries!r}")
            elif field == "proxy_protocol" and not isinstance(engine_options[field], bool):
                kind = type(engine_options[field]).__name__
                raise TypeError(f"{where} must be a bool, not {kind}")
        engine_options["balancers"] = balancers_of(
            tcp, upstream, list(engine_options.pop("balancers", ()))
        )
        self.loop = loop
        self.proxy = tcp
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._log_level_timer: asyncio.TimerHandle | None = None
        self._started = False
        settings = _hook_settings(engine_options)
        self.dispatcher = TcpDispatcher(
            tcp,
            upstream_peer="upstream_peer" in hooks,
            connection_filter=connection_hook,
            loop=loop,
            on_stopped=self._on_stopped,
            settings=settings,
        )
        try:
            self.server = _core.TcpServer(
                self.dispatcher,
                upstream=upstream,
                upstream_peer="upstream_peer" in hooks,
                connection_filter_hook=connection_hook,
                **engine_options,
            )
        except BaseException:
            self.dispatcher.close()
            raise

    def start(self) -> None:
        """Bind (OSError names the address) and let the loop run the engine's queued work."""
        self._refresh_log_level()
        self.server.start()
        self._started = True
        self.loop.add_reader(self.server.fileno(), self.server.run_pending)

    def shutdown(self, grace_period: float | None = None) -> None:
        """Stop accepting; open connections get ``grace_period`` (default: configured)."""
        self.server.shutdown(grace_period)

    async def serve(self) -> None:
        """Wait until the engine has stopped, then cancel the hooks still waiting."""
        await self._stopped
        await self.dispatcher.cancel_pending()

    def close(self) -> None:
        """Detach from the loop; stops the engine at once if it is still running."""
        if self._log_level_timer is not None:
            self._log_level_timer.cancel()
            self._log_level_timer = None
        self.dispatcher.close()
        if not self._started:
            return
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


#: A service a :class:`Server` holds: an HTTP or a TCP app, a class or an instance.
App = type[Proxy[Any]] | Proxy[Any] | type[TcpProxy] | TcpProxy


def _is_tcp(app: App) -> bool:
    return isinstance(app, TcpProxy) or (isinstance(app, type) and issubclass(app, TcpProxy))


class ServiceInfo:
    """One of a started :class:`Server`'s services: where it listens."""

    def __init__(self, served: _LoopServer | _TcpLoopServer) -> None:
        self._engine = served.server
        addrs, schemes = served.server.addrs, served.server.schemes
        #: The app instance serving.
        self.app = served.proxy
        #: Every listener's ``host:port``, in the order ``listen`` gave them.
        self.addrs = addrs
        #: Every listener's URL: ``http://``, ``https://``, ``tcp://`` or ``tls://``.
        self.urls = [f"{scheme}://{addr}" for scheme, addr in zip(schemes, addrs, strict=True)]

    @property
    def addr(self) -> str:
        """The first listener's ``host:port``."""
        return self.addrs[0]

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def python_calls(self) -> int:
        """Hook calls the engine has handed to Python for this service so far."""
        return self._engine.python_calls

    def __repr__(self) -> str:
        return f"<{type(self.app).__name__} on {', '.join(self.urls)}>"


class Server:
    """Several services in one process, as Pingora's Server holds them: HTTP ``Proxy`` apps
    and TCP ``TcpProxy`` apps (classes, instantiated with no arguments, or instances), each
    on its own listeners, their hooks all run by one Python thread's asyncio loop.

        server = ferroxy.Server()
        server.add(App, listen="0.0.0.0:8080")
        server.add(Tcp, listen="0.0.0.0:5432")
        server.run()

    ``Server([App, Tcp])`` adds each with its own ``listen``. :meth:`add` takes the
    service's options: :class:`ServerOptions` for a Proxy, ``ferroxy.tcp.TcpOptions`` for a
    TcpProxy. ``options`` given here apply to every service that takes them and does not
    set them in :meth:`add` (``grace_period``, ``threads``: each service runs an engine of
    its own; ``access_log`` goes to the HTTP ones).

    :meth:`run` serves until SIGINT or SIGTERM, then stops every service gracefully, as
    :func:`run` does. :meth:`start` serves from a background thread instead (``listen``
    defaulting to an ephemeral port on 127.0.0.1), for tests and embedding: then
    :meth:`stop`, or use it as a context manager; :attr:`services` says where each listens.
    """

    def __init__(self, services: Sequence[App] = (), **options: Any) -> None:
        unknown = set(options) - ServerOptions.__optional_keys__ - TcpOptions.__optional_keys__
        if unknown:
            raise TypeError(f"Server: unknown options {', '.join(sorted(unknown))}")
        self._options = options
        self._services: list[tuple[App, dict[str, Any]]] = []
        self._served: list[_LoopServer | _TcpLoopServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        for app in services:
            self.add(app)

    def add(self, app: App, **options: Any) -> Self:
        """Add a service; ``options`` are its own (see the class docstring). Returns self."""
        if not _is_tcp(app) and not (
            isinstance(app, Proxy) or (isinstance(app, type) and issubclass(app, Proxy))
        ):
            raise TypeError(
                f"Server services are Proxy or TcpProxy subclasses or instances, not {app!r}"
            )
        if self._loop is not None:
            raise RuntimeError("add services before the server starts")
        self._services.append((app, options))
        return self

    @property
    def services(self) -> list[ServiceInfo]:
        """Each started service's listeners, in the order they were added."""
        if not self._served:
            raise RuntimeError("the Server has not been started")
        return [ServiceInfo(served) for served in self._served]

    @property
    def addrs(self) -> list[list[str]]:
        """Each service's listener addresses, in the order the services were added."""
        return [service.addrs for service in self.services]

    @property
    def urls(self) -> list[list[str]]:
        """Each service's listener URLs, in the order of :attr:`addrs`."""
        return [service.urls for service in self.services]

    def run(self) -> None:
        """Serve every service until SIGINT or SIGTERM, then stop them gracefully and
        return. Start-up errors raise as :func:`run`'s do (and no service is left running)."""
        if self._loop is not None:
            raise RuntimeError("this Server was already started")
        loop = asyncio.new_event_loop()
        try:
            try:
                served = self._bind(loop, default_listen=None)
                for service in self.services:
                    for url in service.urls:
                        print(f"ferroxy listening on {url}", file=sys.stderr)
                installed = _install_signal_handlers(served, self._grace_period())
                try:
                    loop.run_until_complete(self._serve_all())
                finally:
                    for signum in installed:
                        loop.remove_signal_handler(signum)
            finally:
                self._close_all()
        finally:
            _close_loop(loop)

    def start(self) -> Self:
        """Bind every service and serve from a background thread; start-up errors raise
        here (and no service is left running)."""
        if self._loop is not None:
            raise RuntimeError("this Server was already started")
        loop = asyncio.new_event_loop()
        try:
            self._bind(loop, default_listen=_EPHEMERAL_LISTEN)
        except BaseException:
            self._close_all()
            loop.close()
            # Nothing is left running: it may be started again.
            self._served, self._loop = [], None
            raise
        self._thread = threading.Thread(target=self._serve, name="ferroxy-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace_period: float | None = None) -> None:
        """Shut every service down (open requests and connections get ``grace_period``,
        default: each service's own) and wait for the thread. Raises TimeoutError if it does
        not end in time, and re-raises an exception that ended the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._shutdown_all, grace_period)
        if grace_period is None:
            grace_period = self._grace_period()
        timeout = grace_period + _STOP_MARGIN_SECONDS
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the server did not stop within {timeout:.1f}s")
        self._thread = None
        if self._thread_error is not None:
            error, self._thread_error = self._thread_error, None
            raise error

    def _grace_period(self) -> float:
        """The longest of the services' grace periods: the whole stop may take that long."""
        periods = [
            own.get("grace_period", self._options.get("grace_period", DEFAULT_GRACE_PERIOD))
            for _, own in self._services
        ]
        return float(max(periods, default=DEFAULT_GRACE_PERIOD))

    def _bind(
        self, loop: asyncio.AbstractEventLoop, *, default_listen: str | None
    ) -> list[_LoopServer | _TcpLoopServer]:
        if not self._services:
            raise ValueError("Server: no services (add a Proxy or a TcpProxy first)")
        self._loop = loop
        for app, own in self._services:
            # The shared options each kind of service takes (access_log is HTTP's only).
            kind = TcpOptions if _is_tcp(app) else ServerOptions
            shared = {k: v for k, v in self._options.items() if k in kind.__optional_keys__}
            options = {**shared, **own}
            served: _LoopServer | _TcpLoopServer
            if _is_tcp(app):
                served = _TcpLoopServer(
                    app,  # type: ignore[arg-type]
                    loop,
                    TcpOptions(**options),  # type: ignore[typeddict-item]
                    default_listen=default_listen,
                )
            else:
                served = _LoopServer(
                    app,  # type: ignore[arg-type]
                    loop,
                    ServerOptions(**options),  # type: ignore[typeddict-item]
                    default_listen=default_listen,
                )
            self._served.append(served)
            served.start()
        return self._served

    def _shutdown_all(self, grace_period: float | None = None) -> None:
        for served in self._served:
            served.shutdown(grace_period)

    async def _serve_all(self) -> None:
        await asyncio.gather(*(served.serve() for served in self._served))

    def _close_all(self) -> None:
        for served in self._served:
            served.close()

    def _serve(self) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._serve_all())
        except BaseException as error:
            self._thread_error = error
        finally:
            self._close_all()
            _close_loop(self._loop)

    def __enter__(self) -> Self:
        if self._loop is None:
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
        if not self._served:
            return f"<Server of {len(self._services)} services, not started>"
        return f"<Server {self.services}>"
