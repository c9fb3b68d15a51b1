"""Runs an app's hooks for the engine, on the thread that runs the asyncio loop.

This is the hot path: every proxied request that needs Python passes through here, so the
per-call work is kept to a few attribute loads. Hooks and flags are bound once in
``Dispatcher.__init__``; a phase is one coroutine that calls its hooks in order and
completes the ``Call`` exactly once.

Running a phase: most hooks never really suspend (plain ``def`` hooks, or ``async def`` hooks
that do not await anything pending), so a phase coroutine is first stepped by hand
(``_drive``). When that step finishes, the phase is done without a Task or the event loop.
Only a phase that actually suspends is handed to the loop as a Task, which carries on from
where the first step stopped.

Exception: ``asyncio.timeout()`` and, from 3.12, ``asyncio.wait_for()`` need
``asyncio.current_task()``, which a hand-stepped coroutine does not have. On Python 3.12+ a
phase with an ``async def`` hook therefore runs as an eager Task: the same synchronous first
step, but inside a real Task (about 1 us more per phase). Python 3.10/3.11 have no eager
tasks and keep the hand-stepped start, so on 3.11 ``asyncio.timeout()`` used before a hook's
first real suspension raises RuntimeError; ``asyncio.wait_for()`` works there. A hand-stepped
phase also runs in the context of the loop's reader callback: a ContextVar it sets outlives
the request, where a Task would have worked on a copy.

ctx rule: ``session.ctx`` starts as None. When ``new_ctx`` is overridden, the first trip of a
request to Python calls it, and a later trip calls it again only while ``session.ctx`` is
still None (``new_ctx`` returned None).

Request trips: the engine calls every phase itself, and hands Python the consecutive
request-side hooks it overrides in one trip (``Call.steps`` says which); the hooks that the
app does not override never run.

Hooks that hold the thread: every hook is bound once through ``_Hooks.bind``. A
``@ferroxy.blocking`` hook becomes a coroutine that awaits it on the thread pool. Every step
of a phase is timed by its driver (``_drive``, ``_resume``) rather than around each hook (the
first step, which is most phases' only one, by ``_core.step`` on the engine's clock), and a
slow step is charged to the hook the phase was in when
the step ended (of `def` hooks run back to back in one trip, the last). A hook holding the
loop thread longer than ``slow_hook_threshold`` is reported once per hook per
``_SLOW_HOOK_REPORT_INTERVAL``. With ``hook_timeout`` set, a phase that suspends gets a timer
when it becomes a Task; when it fires the Task is cancelled and the call fails as
``hook_timeout`` (a thread-pool hook cannot be stopped: its thread runs on and its result is
dropped). Hook failures are logged through ``_FailureLog``: a traceback for the first, then
a line per ``_FAILURE_LOG_INTERVAL`` counting the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import sys
import time
import types
from collections.abc import Callable, Coroutine, Generator
from inspect import isawaitable, iscoroutinefunction
from time import perf_counter
from typing import Any, Final

from . import _core
from ._core import (
    Call,
    ConnectionCall,
    Peer,
    ProxyError,
    RequestBodyError,
    Response,
    Session,
    StreamCall,
)
from ._pool import DaemonPool
from .proxy import Drop, Proxy, is_blocking

__all__ = ["Dispatcher", "HookSettings"]

_log: Final = logging.getLogger("ferroxy")

# Results of these types are never awaitable: checking the type first spares the slow
# inspect.isawaitable() (an ABC instance check) for the usual hook results.
_PLAIN_RESULT_TYPES: Final = frozenset({type(None), Response, Peer, str, dict})

# The same for body filters and WebSocket messages.
_STREAM_RESULT_TYPES: Final = frozenset({type(None), bytes, str})

# Distinct upstream strings are few in practice; the bound only stops a hook that builds
# a new string per request from growing the cache without limit.
_PEER_CACHE_SIZE: Final = 1024

#: The request-side hooks a request trip may run, in bit order of ``Call.steps``.
_REQUEST_HOOKS: Final = _core.REQUEST_STEPS

_EAGER_TASKS: Final = sys.version_info >= (3, 12)
# Passed as **kwargs: the argument only exists on 3.12+, and mypy checks against 3.10.
_EAGER: Final[dict[str, Any]] = {"eager_start": True}

#: A phase: returns the hook it ended in (named when its last step held the thread).
_Phase = Coroutine[Any, Any, str]

# The first step of the phase _resume is given is still to be taken.
_UNSTARTED: Final = object()

#: A hook held the loop thread too long: said again for the same hook after this long.
_SLOW_HOOK_REPORT_INTERVAL: Final = 60.0

#: A hook that keeps failing logs its first traceback, then one line per this many seconds
#: with the count of the failures since (10,000 tracebacks would be megabytes of log).
_FAILURE_LOG_INTERVAL: Final = 10.0

# The message a Task cancelled by the hook timeout is cancelled with: tells that cancellation
# from the server's own at shutdown.
_HOOK_TIMED_OUT: Final = "ferroxy: hook_timeout"


@dataclasses.dataclass(frozen=True)
class HookSettings:
    """How hooks are run: the server options that Python carries out (``ServerOptions``;
    their defaults are in ``ferroxy.server``)."""

    #: Threads running ``@ferroxy.blocking`` hooks.
    blocking_threads: int
    #: Seconds a hook may hold the loop thread before it is reported.
    slow_hook_threshold: float
    #: Seconds a phase may wait before it is cancelled and answered 504; None: no limit.
    hook_timeout: float | None


# Call.steps bits: which request-side hooks a request trip runs.
_REQUEST_FILTER, _UPSTREAM_PEER, _UPSTREAM_REQUEST_FILTER = (
    1 << _REQUEST_HOOKS.index(h)
    for h in ("request_filter", "upstream_peer", "upstream_request_filter")
)


class Dispatcher:
    """Implements ``ferroxy._core.Dispatcher`` for one app instance.

    ``overridden`` names the hooks the app overrides (see ``proxy.overridden_hooks``); the
    others are never called. ``on_stopped`` runs when the engine reports it has stopped.
    """

    def __init__(
        self,
        app: Proxy[Any],
        overridden: frozenset[str],
        *,
        loop: asyncio.AbstractEventLoop,
        on_stopped: Callable[[], object],
        settings: HookSettings,
    ) -> None:
        self._loop = loop
        self._on_stopped = on_stopped
        self._hook_timeout = settings.hook_timeout
        self._slow_threshold = settings.slow_hook_threshold
        # Each phase that waits, with its hook_timeout timer (None without one).
        self._tasks: dict[asyncio.Task[None], asyncio.TimerHandle | None] = {}
        # Phases the hook timeout cancelled, until they end.
        self._timed_out_tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[str, Peer] = {}
        self._loggers: dict[str, logging.Logger] = {}
        self._failures = _FailureLog(loop)
        hooks = _Hooks(app, overridden, loop, settings)
        self._hooks = hooks

        bound_new_ctx = hooks.bind("new_ctx")
        self._new_ctx = bound_new_ctx if "new_ctx" in overridden else None
        # The engine asks only for the request-side hooks the app overrides (Call.steps).
        self._request_filter = hooks.bind("request_filter")
        self._upstream_peer = hooks.bind("upstream_peer")
        self._upstream_request_filter = hooks.bind("upstream_request_filter")
        self._response_filter = hooks.bind("response_filter")
        self._fail_to_connect = hooks.bind("fail_to_connect")
        self._fail_to_proxy = hooks.bind("fail_to_proxy")
        self._logging = hooks.bind("logging")
        # Only asked for when the app has one (a method: an IPAccess runs in Rust).
        if "connection_filter" in overridden:
            self._connection_filter = hooks.bind("connection_filter")
        # Per chunk or message, by the hook's name (StreamCall.hook); only those overridden.
        self._stream_hooks: dict[str, Callable[..., Any]] = {
            name: hooks.bind(name)
            for name in ("request_body_filter", "response_body_filter", "websocket_message")
            if name in overridden
        }

        def runner(*names: str) -> Callable[[_Phase], None]:
            # Chosen once per phase: see the module docstring.
            if _EAGER_TASKS and any(hooks.is_async(h) for h in ("new_ctx", *names)):
                return self._start_eager_task
            return self._drive

        self._run_request = runner(*(h for h in _REQUEST_HOOKS if h in overridden))
        self._run_response = runner("response_filter")
        self._run_connect_fail = runner("fail_to_connect")
        self._run_fail = runner("fail_to_proxy")
        self._run_logging = runner("logging")
        self._run_connection = runner("connection_filter")
        self._stream_runners: dict[str, Callable[[_Phase], None]] = {
            name: runner(name) for name in self._stream_hooks
        }

    # -- the Dispatcher protocol, called by Server.run_pending --------------------------

    def request_phase(self, call: Call, /) -> None:
        self._run_request(self._request(call))

    def response_phase(self, call: Call, /) -> None:
        self._run_response(self._response(call))

    def connect_fail_phase(self, call: Call, /) -> None:
        self._run_connect_fail(self._connect_fail(call))

    def fail_phase(self, call: Call, /) -> None:
        self._run_fail(self._fail(call))

    def logging_phase(self, session: Session, error: ProxyError | None, /) -> None:
        self._run_logging(self._log_request(session, error))

    def connection_phase(self, call: ConnectionCall, /) -> None:
        self._run_connection(self._connection(call))

    def stream_phase(self, call: StreamCall, /) -> None:
        self._stream_runners[call.hook](self._stream(call))

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
        self._hooks.close()

    async def cancel_pending(self) -> None:
        """Cancel the phases still waiting on something and wait until they have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def finish_pending(self) -> None:
        """Wait until the phases still waiting on something have ended on their own (those
        started meanwhile too)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- phases -------------------------------------------------------------------------

    async def _request(self, call: Call) -> str:
        session = call.session
        # Which of the request-side hooks this trip runs: the engine batches consecutive
        # ones into one trip (bit 0 request_filter, 1 upstream_peer, 2 upstream_request_filter).
        steps = call.steps
        hook = "new_ctx"
        response: Response | None = None
        peer: Peer | None = None
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                # Inline rather than _late_ctx: this is the first trip of most requests.
                ctx = self._new_ctx()
                if type(ctx) not in _PLAIN_RESULT_TYPES and isawaitable(ctx):
                    ctx = await ctx
                session.ctx = ctx

            if steps & _REQUEST_FILTER:
                hook = "request_filter"
                filtered = self._request_filter(session, ctx)
                if type(filtered) not in _PLAIN_RESULT_TYPES and isawaitable(filtered):
                    filtered = await filtered
                if filtered is not None and type(filtered) is not Response:
                    raise _WrongResult(filtered, "Response or None")
                response = filtered

            if response is None:
                if steps & _UPSTREAM_PEER:
                    hook = "upstream_peer"
                    chosen = self._upstream_peer(session, ctx)
                    if type(chosen) not in _PLAIN_RESULT_TYPES and isawaitable(chosen):
                        chosen = await chosen
                    if type(chosen) is str:
                        peer = self._peer_for(chosen)
                    elif type(chosen) is Peer:
                        peer = chosen
                    else:
                        raise _WrongResult(chosen, "Peer or str")

                if steps & _UPSTREAM_REQUEST_FILTER:
                    hook = "upstream_request_filter"
                    upstream_request = call.upstream_request
                    result = self._upstream_request_filter(session, upstream_request, ctx)
                    if result is not None and isawaitable(result):
                        await result
        except BaseException as error:
            self._hook_failed(call, hook, error)
            return hook
        # Completing the call stays outside the try: an engine error here is not the hook's.
        if response is not None:
            call.respond(response)
        else:
            call.proceed(peer)
        return hook

    async def _response(self, call: Call) -> str:
        session = call.session
        hook = "new_ctx"
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                ctx = await self._late_ctx(session)
            hook = "response_filter"
            upstream_response = call.upstream_response
            assert upstream_response is not None, "a response phase carries the response"
            result = self._response_filter(session, upstream_response, ctx)
            if result is not None and isawaitable(result):
                await result
        except BaseException as error:
            self._hook_failed(call, hook, error)
            return hook
        call.proceed()
        return hook

    async def _connect_fail(self, call: Call) -> str:
        session = call.session
        hook = "new_ctx"
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                ctx = await self._late_ctx(session)
            hook = "fail_to_connect"
            proxy_error = call.error
            assert proxy_error is not None, "a connect-fail phase carries the error"
            retry = self._fail_to_connect(session, proxy_error.peer, proxy_error, ctx)
            if type(retry) not in _PLAIN_RESULT_TYPES and isawaitable(retry):
                retry = await retry
            if retry is not None and type(retry) is not bool:
                raise _WrongResult(
                    retry, "True (retry), False (don't) or None (as the policy says)"
                )
        except BaseException as error:
            self._hook_failed(call, hook, error)
            return hook
        if retry is None:
            call.proceed()
        else:
            call.retry(retry)
        return hook

    async def _fail(self, call: Call) -> str:
        session = call.session
        hook = "new_ctx"
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                ctx = await self._late_ctx(session)
            hook = "fail_to_proxy"
            proxy_error = call.error
            assert proxy_error is not None, "a fail phase carries the error"
            response = self._fail_to_proxy(session, proxy_error, ctx)
            if type(response) not in _PLAIN_RESULT_TYPES and isawaitable(response):
                response = await response
        except BaseException as error:
            self._hook_failed(call, hook, error)
            return hook
        if type(response) is Response:
            call.respond(response)
            return hook
        if response is not None:
            # The request has failed already: the engine's error page beats a second error.
            self._failures.failed(
                "fail_to_proxy",
                f"fail_to_proxy returned {type(response).__name__}, expected Response or "
                "None; sending the default error page",
                None,
            )
        call.proceed()
        return hook

    async def _log_request(self, session: Session, error: ProxyError | None) -> str:
        hook = "new_ctx"
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                ctx = await self._late_ctx(session)
            hook = "logging"
            result = self._logging(session, error, ctx)
            if result is not None and isawaitable(result):
                await result
        except BaseException as failure:
            # The response is gone: there is nothing to complete, only to report.
            if self._timed_out(failure):
                _log.warning(
                    "hook %s was still running after hook_timeout (%ss): cancelled",
                    hook,
                    self._hook_timeout,
                )
            else:
                self._report(hook, failure)
            if _must_propagate(failure):
                raise
        return hook

    async def _connection(self, call: ConnectionCall) -> str:
        hook = "connection_filter"
        try:
            accepted = self._connection_filter(call.client_addr)
            if type(accepted) is not bool and isawaitable(accepted):
                accepted = await accepted
            if type(accepted) is not bool:
                raise _WrongResult(accepted, "True (serve the connection) or False (close it)")
        except BaseException as error:
            # Fail closed: a filter that cannot answer lets no one in (said before the
            # connection closes).
            try:
                if self._timed_out(error):
                    _log.warning(
                        "hook connection_filter was still running after hook_timeout (%ss): "
                        "connection refused",
                        self._hook_timeout,
                    )
                else:
                    self._report(hook, error)
            finally:
                call.answer(False)
            if _must_propagate(error):
                raise
            return hook
        call.answer(accepted)
        return hook

    async def _stream(self, call: StreamCall) -> str:
        session = call.session
        hook = "new_ctx"
        try:
            ctx = session.ctx
            if ctx is None and self._new_ctx is not None:
                ctx = await self._late_ctx(session)
            hook = call.hook
            result = self._stream_hooks[hook](session, call.data, call.flag, ctx)
            if type(result) not in _STREAM_RESULT_TYPES and isawaitable(result):
                result = await result
            if result is None:
                call.keep()
            elif type(result) is Drop:
                call.drop()
            else:
                call.replace(result)
        except BaseException as error:
            if call.is_pending():
                self._hook_failed(call, hook, error)
            elif _must_propagate(error):
                raise
            return hook
        return hook

    async def _late_ctx(self, session: Session) -> Any:
        """Make the ctx when no earlier trip made one (see the module docstring). Callers
        check first: once it exists, a trip costs no coroutine for it."""
        assert self._new_ctx is not None
        ctx = self._new_ctx()
        if type(ctx) not in _PLAIN_RESULT_TYPES and isawaitable(ctx):
            ctx = await ctx
        session.ctx = ctx
        return ctx

    def _hook_failed(self, call: Call | StreamCall, hook: str, error: BaseException) -> None:
        """Report why ``hook`` failed and fail the call; re-raise what must not be swallowed."""
        if self._timed_out(error):
            # The engine logs it, as it does an upstream's timeout.
            assert self._hook_timeout is not None, "only the hook timeout cancels so"
            call.time_out(hook, self._hook_timeout)
            return
        # The engine picks the status (502 for upstream_peer, else 500).
        call.fail(hook, self._report(hook, error))
        if _must_propagate(error):
            raise error

    def _report(self, hook: str, error: BaseException) -> str:
        """Log why ``hook`` failed (rate-limited per hook); returns the message for
        ``Call.fail``."""
        if isinstance(error, _WrongResult):
            message = f"{hook} returned {type(error.value).__name__}, expected {error.expected}"
            self._failures.failed(hook, message, None)
            return message
        message = f"{type(error).__name__}: {error}"
        if isinstance(error, RequestBodyError):
            # The client's doing (a body over the limit, an upload cut off), answered with
            # its own status: no traceback, as the engine logs client errors at debug.
            _log.debug("hook %s: %s", hook, message)
            return message
        if isinstance(error, asyncio.CancelledError):
            # Expected when the server stops with the hook still waiting: no traceback.
            _log.warning("hook %s was cancelled", hook)
        else:
            self._failures.failed(hook, message, error)
        return message

    def _peer_for(self, addr: str) -> Peer:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) >= _PEER_CACHE_SIZE:
                self._peers.clear()
            peer = self._peers[addr] = Peer(addr)
        return peer

    # -- running a phase ----------------------------------------------------------------

    def _drive(self, phase: _Phase) -> None:
        """Step ``phase`` by hand; only if it suspends does it become a Task on the loop.
        The step is timed (by ``_core.step``: the engine's clock costs a fraction of two
        ``perf_counter()`` calls, on every phase): a slow one is charged to the hook the
        phase was in when it ended (a trip that runs several `def` hooks back to back, to
        the last of them)."""
        stepped = _core.step(phase, self._slow_threshold)
        if stepped is None:
            return
        finished, value, held = stepped
        if held > self._slow_threshold:
            self._hooks.stepped(perf_counter() - held, value if finished else phase)
        if not finished:
            self._track(self._loop.create_task(_carry_on(phase, value, self._hooks.stepped)))

    def _start_eager_task(self, phase: _Phase) -> None:
        # eager_start runs the first step now, inside the Task; a phase that finishes in it
        # never reaches the loop's queue.
        stepped = _carry_on(phase, _UNSTARTED, self._hooks.stepped)
        task = asyncio.Task(stepped, loop=self._loop, **_EAGER)
        if not task.done():
            self._track(task)

    def _track(self, task: asyncio.Task[None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        timer = None
        if self._hook_timeout is not None:
            timer = self._loop.call_later(self._hook_timeout, self._time_out, task)
        self._tasks[task] = timer
        task.add_done_callback(self._task_done)

    def _time_out(self, task: asyncio.Task[None]) -> None:
        # Marked before it is cancelled: a hook may catch the CancelledError and raise
        # another, so its message cannot tell.
        self._timed_out_tasks.add(task)
        task.cancel(_HOOK_TIMED_OUT)

    def _timed_out(self, error: BaseException) -> bool:
        """Whether ``error`` ends a phase the hook timeout cancelled (see ``_track``)."""
        return (
            isinstance(error, asyncio.CancelledError)
            and asyncio.current_task(self._loop) in self._timed_out_tasks
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._timed_out_tasks.discard(task)
        timer = self._tasks.pop(task, None)
        if timer is not None:
            timer.cancel()
        # Phases handle hook errors themselves; what arrives here is an engine error from
        # completing the call, which nobody awaits: log it instead of losing it.
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("completing a phase failed", exc_info=error)


_Stepped = Callable[[float, "str | _Phase"], None]


async def _carry_on(phase: _Phase, pending: Any, stepped: _Stepped) -> None:
    """Finish a phase whose first step, already taken, yielded ``pending`` (or take it:
    ``_UNSTARTED``), timing each step."""
    await _resume(phase, pending, stepped)


@types.coroutine
def _resume(phase: _Phase, pending: Any, stepped: _Stepped) -> Generator[Any, Any, None]:
    """``yield from phase`` for a coroutine that was already started and yielded ``pending``:
    re-yield what it waits on to the Task and forward what comes back. Each step is timed:
    ``stepped(start, phase)``, or ``stepped(start, hook)`` for the last one."""
    sent: Any = None
    thrown: BaseException | None = None
    started = pending is not _UNSTARTED
    while True:
        if started:
            try:
                sent = yield pending
            except GeneratorExit:
                phase.close()
                raise
            except BaseException as error:
                thrown = error
        started = True
        start = perf_counter()
        try:
            pending = phase.send(sent) if thrown is None else phase.throw(thrown)
        except StopIteration as done:
            stepped(start, done.value)
            return
        thrown = None
        stepped(start, phase)


class _Hooks:
    """The app's hooks as the phases call them (see the module docstring): blocking ones on
    the thread pool, the others timed while they hold the loop thread."""

    def __init__(
        self,
        app: Proxy[Any],
        overridden: frozenset[str],
        loop: asyncio.AbstractEventLoop,
        settings: HookSettings,
    ) -> None:
        self._app = app
        self._loop = loop
        self._threshold = settings.slow_hook_threshold
        self._reported: dict[str, float] = {}
        # When a `def` hook was last found slow: the step it ran in is not reported again.
        self._last_slow = float("-inf")
        blocking = [name for name in overridden if is_blocking(getattr(app, name))]
        for name in blocking:
            if iscoroutinefunction(getattr(app, name)):
                # @blocking refuses an async def; this one was wrapped into one afterwards.
                raise TypeError(
                    f"{_hook_label(app, name)} is `async def` and marked @ferroxy.blocking: "
                    "an async hook already yields the loop, remove the decorator"
                )
        # Threads start on first use, up to the limit.
        self._pool = (
            DaemonPool(settings.blocking_threads, thread_name_prefix="ferroxy-blocking")
            if blocking
            else None
        )

    def is_async(self, name: str) -> bool:
        """Whether hook ``name`` is an ``async def`` (blocking hooks are not: they suspend
        at once, so a hand-stepped start suits them)."""
        return iscoroutinefunction(getattr(self._app, name))

    def bind(self, name: str) -> Callable[..., Any]:
        """Hook ``name`` of the app, to call as the app's own."""
        hook: Callable[..., Any] = getattr(self._app, name)
        if is_blocking(hook):
            return self._on_pool(hook)
        # Not wrapped: a phase's driver times each of its steps (see `stepped`). A wrapper
        # per hook call cost more than the rest of the bridge's Python side together.
        return hook

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _on_pool(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        loop, pool = self._loop, self._pool

        async def on_pool(*args: Any) -> Any:
            # The hook sees the caller's context variables, as asyncio.to_thread gives it.
            context = contextvars.copy_context()
            return await loop.run_in_executor(pool, context.run, hook, *args)

        return on_pool

    def stepped(self, start: float, phase: str | _Phase) -> None:
        """A step of a phase, begun at ``start`` (perf_counter), has ended: report it if it
        held the thread too long. ``phase`` is the hook it ended in, or the suspended phase
        (its ``hook`` says which hook waits)."""
        held = perf_counter() - start
        if held <= self._threshold or self._last_slow >= start:
            return
        if isinstance(phase, str):
            hook = phase
        else:
            frame = getattr(phase, "cr_frame", None)  # a native coroutine's, while suspended
            hook = frame.f_locals.get("hook", "?") if frame is not None else "?"
        self._slow(_hook_label(self._app, hook), held)

    def _slow(self, label: str, held: float) -> None:
        self._last_slow = perf_counter()
        now = time.monotonic()
        last = self._reported.get(label)
        if last is not None and now - last < _SLOW_HOOK_REPORT_INTERVAL:
            return
        self._reported[label] = now
        _log.warning(
            "hook %s held the Python thread for %.3fs (slow_hook_threshold: %ss): every "
            "request that needs Python waited meanwhile. Make it `async def` and await what "
            "it waits for, or decorate it with @ferroxy.blocking to run it on a thread "
            "(said at most once a minute per hook)",
            label,
            held,
            self._threshold,
        )


def _hook_label(app: Proxy[Any], name: str) -> str:
    """``App.request_filter``: the hook as its author wrote it."""
    return f"{type(app).__qualname__}.{name}"


@dataclasses.dataclass
class _Failures:
    """A hook's failures since its last traceback or count line."""

    count: int = 0
    last: str = ""


class _FailureLog:
    """Logs hook failures, rate-limited per hook: the first with its traceback, then every
    ``_FAILURE_LOG_INTERVAL`` seconds one line counting those since, with the last one's
    text. After a quiet interval the next failure shows its traceback again."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: dict[str, _Failures] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def failed(self, hook: str, message: str, error: BaseException | None) -> None:
        failures = self._pending.get(hook)
        if failures is not None:
            failures.count += 1
            failures.last = message
            return
        if error is None:
            _log.error("hook %s failed: %s", hook, message)
        else:
            _log.error("hook %s raised", hook, exc_info=error)
        self._pending[hook] = _Failures()
        self._timers[hook] = self._loop.call_later(_FAILURE_LOG_INTERVAL, self._tick, hook)

    def flush(self) -> None:
        """Count the failures not yet counted (the server is stopping)."""
        for hook in list(self._pending):
            self._timers.pop(hook).cancel()
            self._count(hook, self._pending.pop(hook))

    def _tick(self, hook: str) -> None:
        failures = self._pending[hook]
        if failures.count == 0:
            del self._pending[hook], self._timers[hook]
            return
        self._count(hook, failures)
        self._pending[hook] = _Failures()
        self._timers[hook] = self._loop.call_later(_FAILURE_LOG_INTERVAL, self._tick, hook)

    def _count(self, hook: str, failures: _Failures) -> None:
        if failures.count:
            _log.error(
                "hook %s failed %d more time(s) since (a traceback at most once per %ss per "
                "hook); last: %s",
                hook,
                failures.count,
                _FAILURE_LOG_INTERVAL,
                failures.last,
            )


class _WrongResult(Exception):
    """A hook returned a value of the wrong type (raised and caught inside a phase)."""

    def __init__(self, value: object, expected: str) -> None:
        super().__init__(value, expected)
        self.value = value
        self.expected = expected


def _must_propagate(error: BaseException) -> bool:
    """KeyboardInterrupt, SystemExit and GeneratorExit go on up once reported. A
    CancelledError ends with the phase: the Task that was cancelled has nothing left to do."""
    return not isinstance(error, (Exception, asyncio.CancelledError))
