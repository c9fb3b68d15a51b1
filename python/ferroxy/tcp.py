"""The ``TcpProxy`` base class: a TCP (L4) proxy. Each client connection is joined to one
upstream connection and the bytes are copied both ways in Rust, until either side closes or
nothing has moved for ``idle_timeout``.

Set ``upstream`` (a ``"host:port"``, a ``Peer``, or a ``LoadBalancer`` with its health checks:
no Python runs per connection), or override ``upstream_peer(client_addr)`` to choose per
connection. ``tls`` terminates TLS at the proxy (the upstream gets plain TCP, unless its
``Peer`` asks for TLS). ``connection_filter`` may refuse a client before anything else.
Serve it with ``ferroxy.Server`` (beside HTTP ``Proxy`` services, in one process) or
``python -m ferroxy app.py:Tcp``.

Its hooks run on the asyncio loop's thread, as a ``Proxy``'s do: ``def``, ``async def``, or
``@ferroxy.blocking`` for one that blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from inspect import isawaitable, iscoroutinefunction
from typing import TYPE_CHECKING, Any, Final, TypedDict

from . import _core
from ._core import ConnectionCall, LoadBalancer, Peer, TcpPeerCall
from ._dispatch import HookSettings, _FailureLog
from ._pool import DaemonPool
from .proxy import MaybeAwaitable, is_blocking

if TYPE_CHECKING:
    from .filters import IPAccess
    from .listener import Listener
    from .tls import TlsConfig

__all__ = ["DEFAULT_CONNECT_TRIES", "DEFAULT_IDLE_TIMEOUT", "TcpOptions", "TcpProxy"]

_log: Final = logging.getLogger("ferroxy")

#: The engine's defaults (``TcpProxyConfig``), as ``_core.DEFAULTS`` reports them.
DEFAULT_IDLE_TIMEOUT: Final[float] = _core.DEFAULTS["tcp_idle_timeout"]
DEFAULT_CONNECT_TRIES: Final[int] = _core.DEFAULTS["tcp_connect_tries"]

# Distinct upstream strings are few; the bound only stops a hook that makes a new one per
# connection from growing the cache without limit.
_PEER_CACHE_SIZE: Final = 1024

# A slow hook is said again for the same hook after this long.
_SLOW_HOOK_REPORT_INTERVAL: Final = 60.0


class TcpProxy:
    """Base class for a TCP (L4) proxy service: set ``upstream`` or override
    :meth:`upstream_peer`."""

    #: Where connections go when ``upstream_peer`` is not overridden: a ``"host:port"``, a
    #: ``Peer``, or a ``LoadBalancer`` (its pick per connection, another backend tried when
    #: connecting fails, its health checks run with the server).
    upstream: Peer | LoadBalancer | str | None = None

    #: Where to serve, when the server is not told: a ``"host:port"`` (or ``"fd:N"``), a
    #: ``ferroxy.Listener``, or a list of them.
    listen: str | Listener | Sequence[str | Listener] | None = None

    #: ``ferroxy.TlsConfig`` (or a list, chosen by SNI): every listener terminates TLS.
    tls: TlsConfig | Sequence[TlsConfig] | None = None

    #: Seconds a connection may go without a byte either way before it is closed.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT

    #: Connect attempts per client connection, each to a backend not tried yet (a
    #: ``LoadBalancer`` upstream; a single peer is tried once).
    connect_tries: int = DEFAULT_CONNECT_TRIES

    #: Every listener given as an address expects a PROXY protocol header first.
    proxy_protocol: bool = False

    #: Which clients may connect: a ``ferroxy.filters.IPAccess`` (run in Rust), or a method
    #: ``def connection_filter(self, client_addr: str) -> bool`` (or ``async def``, or
    #: ``@ferroxy.blocking``). False closes the connection at once; so does a hook that
    #: raises (its traceback is logged) or returns anything but a bool.
    connection_filter: IPAccess | Callable[[str], MaybeAwaitable[bool]] | None = None

    def upstream_peer(self, client_addr: str) -> MaybeAwaitable[Peer | str]:
        """The upstream for the connection from ``client_addr`` (``host:port``): a ``Peer``
        or a ``"host:port"``. Raising closes that connection (its traceback is logged)."""
        raise NotImplementedError


#: The hooks a TcpProxy may override (beside ``connection_filter``, which may be an IPAccess).
TCP_HOOK_NAMES: Final = ("upstream_peer",)


def overridden_tcp_hooks(cls: type[TcpProxy]) -> frozenset[str]:
    """Names of the hooks whose implementation on ``cls`` is not the base class's."""
    return frozenset(
        name for name in TCP_HOOK_NAMES if getattr(cls, name) is not getattr(TcpProxy, name)
    )


class TcpOptions(TypedDict, total=False):
    """Options of a TcpProxy service (``ferroxy.Server.add(Tcp, **options)``); each one
    given overrides the app's attribute of the same name."""

    listen: str | Listener | Sequence[str | Listener]
    tls: TlsConfig | Sequence[TlsConfig]
    proxy_protocol: bool
    connection_filter: IPAccess
    upstream: Peer | LoadBalancer | str
    idle_timeout: float
    connect_tries: int
    #: Engine worker threads for this service; 0 means one per CPU.
    threads: int
    #: Seconds open connections may go on once a graceful shutdown begins.
    grace_period: float
    #: Load balancers whose health checks run with this service (beside those found on the
    #: app and its module).
    balancers: Sequence[LoadBalancer]
    blocking_threads: int
    slow_hook_threshold: float
    hook_timeout: float | None


class TcpDispatcher:
    """Runs a TcpProxy's hooks for ``_core.TcpServer``, on the loop's thread: a ``def`` hook
    is called at once, an ``async def`` or ``@blocking`` one becomes a Task."""

    def __init__(
        self,
        app: TcpProxy,
        *,
        upstream_peer: bool,
        connection_filter: bool,
        loop: asyncio.AbstractEventLoop,
        on_stopped: Callable[[], object],
        settings: HookSettings,
    ) -> None:
        self._app = app
        self._loop = loop
        self._on_stopped = on_stopped
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[str, Peer] = {}
        self._loggers: dict[str, logging.Logger] = {}
        self._failures = _FailureLog(loop)
        self._slow_reported: dict[str, float] = {}
        hooks = [
            name
            for name, wanted in (
                ("upstream_peer", upstream_peer),
                ("connection_filter", connection_filter),
            )
            if wanted
        ]
        blocking = [name for name in hooks if is_blocking(getattr(app, name))]
        self._pool = (
            DaemonPool(settings.blocking_threads, thread_name_prefix="ferroxy-blocking")
            if blocking
            else None
        )
        self._upstream_peer = self._bind("upstream_peer") if upstream_peer else None
        self._connection_filter = self._bind("connection_filter") if connection_filter else None

    # -- what _core.TcpServer calls -------------------------------------------------------

    def peer_phase(self, call: TcpPeerCall, /) -> None:
        assert self._upstream_peer is not None
        self._run("upstream_peer", self._upstream_peer, call.client_addr, self._peer_answer(call))

    def connection_phase(self, call: ConnectionCall, /) -> None:
        assert self._connection_filter is not None
        self._run(
            "connection_filter",
            self._connection_filter,
            call.client_addr,
            self._connection_answer(call),
        )

    def emit_logs(self, records: list[tuple[str, int, str]], /) -> None:
        loggers = self._loggers
        for name, level, message in records:
            logger = loggers.get(name)
            if logger is None:
                logger = loggers[name] = logging.getLogger(name)
            logger.log(level, message)

    def stopped(self) -> None:
        self._failures.flush()
        self._on_stopped()

    def close(self) -> None:
        """Let go of the blocking hooks' threads (a hook still running finishes on its own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def cancel_pending(self) -> None:
        """Cancel the hooks still waiting and wait until they have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- running a hook --------------------------------------------------------------------

    def _bind(self, name: str) -> Callable[[str], Any]:
        hook: Callable[[str], Any] = getattr(self._app, name)
        if iscoroutinefunction(hook) and is_blocking(hook):
            raise TypeError(
                f"{self._label(name)} is `async def` and marked @ferroxy.blocking: an async "
                "hook already yields the loop, remove the decorator"
            )
        if not is_blocking(hook):
            return hook
        loop, pool = self._loop, self._pool

        def on_pool(client_addr: str) -> Awaitable[Any]:
            return loop.run_in_executor(pool, hook, client_addr)

        return on_pool

    def _run(
        self,
        name: str,
        hook: Callable[[str], Any],
        client_addr: str,
        answer: Callable[[BaseException | None, object], None],
    ) -> None:
        start = time.perf_counter()
        try:
            result = hook(client_addr)
        except Exception as error:
            answer(error, None)
            return
        finally:
            self._check_slow(name, start)
        if not isawaitable(result):
            answer(None, result)
            return
        task = self._loop.create_task(self._await(name, result, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await(
        self,
        name: str,
        result: Awaitable[Any],
        answer: Callable[[BaseException | None, object], None],
    ) -> None:
        timeout = self._settings.hook_timeout
        try:
            value = await (result if timeout is None else asyncio.wait_for(result, timeout))
        except asyncio.TimeoutError:
            _log.warning(
                "hook %s was still running after hook_timeout (%ss): connection closed",
                self._label(name),
                timeout,
            )
            answer(asyncio.CancelledError(), None)
        except asyncio.CancelledError as error:
            # The server is stopping: close the connection, no traceback.
            answer(error, None)
            raise
        except Exception as error:
            answer(error, None)
        else:
            answer(None, value)

    def _peer_answer(self, call: TcpPeerCall) -> Callable[[BaseException | None, object], None]:
        def answer(error: BaseException | None, value: object) -> None:
            if error is None:
                try:
                    peer = self._as_peer(value)
                except (TypeError, ValueError) as wrong:
                    error = wrong
                else:
                    call.answer(peer)
                    return
            call.fail(self._report("upstream_peer", error))

        return answer

    def _connection_answer(
        self, call: ConnectionCall
    ) -> Callable[[BaseException | None, object], None]:
        def answer(error: BaseException | None, value: object) -> None:
            if error is None and type(value) is not bool:
                error = TypeError(
                    f"returned {type(value).__name__}, expected True (serve the connection) "
                    "or False (close it)"
                )
            if error is not None:
                # Fail closed: a filter that cannot answer lets no one in.
                self._report("connection_filter", error)
                call.answer(False)
                return
            call.answer(value is True)

        return answer

    def _as_peer(self, value: object) -> Peer:
        if isinstance(value, Peer):
            return value
        if isinstance(value, str):
            peer = self._peers.get(value)
            if peer is None:
                if len(self._peers) >= _PEER_CACHE_SIZE:
                    self._peers.clear()
                peer = self._peers[value] = Peer(value)
            return peer
        raise TypeError(f"returned {type(value).__name__}, expected a Peer or a 'host:port' str")

    def _report(self, name: str, error: BaseException) -> str:
        """Log why hook ``name`` failed (rate-limited); returns the message."""
        label = self._label(name)
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, asyncio.CancelledError):
            _log.debug("hook %s was cancelled", label)
        else:
            self._failures.failed(label, message, error)
        return f"{label} failed: {message}"

    def _check_slow(self, name: str, start: float) -> None:
        held = time.perf_counter() - start
        threshold = self._settings.slow_hook_threshold
        if held <= threshold:
            return
        label = self._label(name)
        now = time.monotonic()
        last = self._slow_reported.get(label)
        if last is not None and now - last < _SLOW_HOOK_REPORT_INTERVAL:
            return
        self._slow_reported[label] = now
        _log.warning(
            "hook %s held the Python thread for %.3fs (slow_hook_threshold: %ss): every "
            "connection that needs Python waited meanwhile. Make it `async def`, or decorate "
            "it with @ferroxy.blocking (said at most once a minute per hook)",
            label,
            held,
            threshold,
        )

    def _label(self, name: str) -> str:
        return f"{type(self._app).__qualname__}.{name}"
