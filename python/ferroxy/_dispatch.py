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
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from collections.abc import Callable, Coroutine, Generator
from inspect import isawaitable, iscoroutinefunction
from typing import Any, Final

from . import _core
from ._core import Call, Peer, ProxyError, Response, Session
from .proxy import Proxy

__all__ = ["Dispatcher"]

_log: Final = logging.getLogger("ferroxy")

# Results of these types are never awaitable: checking the type first spares the slow
# inspect.isawaitable() (an ABC instance check) for the usual hook results.
_PLAIN_RESULT_TYPES: Final = frozenset({type(None), Response, Peer, str, dict})

# Distinct upstream strings are few in practice; the bound only stops a hook that builds
# a new string per request from growing the cache without limit.
_PEER_CACHE_SIZE: Final = 1024

#: The request-side hooks a request trip may run, in bit order of ``Call.steps``.
_REQUEST_HOOKS: Final = _core.REQUEST_STEPS

_EAGER_TASKS: Final = sys.version_info >= (3, 12)
# Passed as **kwargs: the argument only exists on 3.12+, and mypy checks against 3.10.
_EAGER: Final[dict[str, Any]] = {"eager_start": True}

_Phase = Coroutine[Any, Any, None]

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
    ) -> None:
        self._loop = loop
        self._on_stopped = on_stopped
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[str, Peer] = {}
        self._loggers: dict[str, logging.Logger] = {}

        self._new_ctx = app.new_ctx if "new_ctx" in overridden else None
        # The engine asks only for the request-side hooks the app overrides (Call.steps).
        self._request_filter = app.request_filter
        self._upstream_peer = app.upstream_peer
        self._upstream_request_filter = app.upstream_request_filter
        self._response_filter = app.response_filter
        self._fail_to_proxy = app.fail_to_proxy
        self._logging = app.logging

        def runner(*hooks: Callable[..., object] | None) -> Callable[[_Phase], None]:
            # Chosen once per phase: see the module docstring.
            if _EAGER_TASKS and any(iscoroutinefunction(h) for h in (self._new_ctx, *hooks)):
                return self._start_eager_task
            return self._drive

        self._run_request = runner(
            *(getattr(app, h) for h in _REQUEST_HOOKS if h in overridden),
        )
        self._run_response = runner(self._response_filter)
        self._run_fail = runner(self._fail_to_proxy)
        self._run_logging = runner(self._logging)

    # -- the Dispatcher protocol, called by Server.run_pending --------------------------

    def request_phase(self, call: Call, /) -> None:
        self._run_request(self._request(call))

    def response_phase(self, call: Call, /) -> None:
        self._run_response(self._response(call))

    def fail_phase(self, call: Call, /) -> None:
        self._run_fail(self._fail(call))

    def logging_phase(self, session: Session, error: ProxyError | None, /) -> None:
        self._run_logging(self._log_request(session, error))

    def emit_logs(self, records: list[tuple[str, int, str]], /) -> None:
        loggers = self._loggers
        for name, level, message in records:
            logger = loggers.get(name)
            if logger is None:
                logger = loggers[name] = logging.getLogger(name)
            logger.log(level, message)

    def stopped(self) -> None:
        self._on_stopped()

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

    async def _request(self, call: Call) -> None:
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
            _hook_failed(call, hook, error)
            return
        # Completing the call stays outside the try: an engine error here is not the hook's.
        if response is not None:
            call.respond(response)
        else:
            call.proceed(peer)

    async def _response(self, call: Call) -> None:
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
            _hook_failed(call, hook, error)
            return
        call.proceed()

    async def _fail(self, call: Call) -> None:
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
            _hook_failed(call, hook, error)
            return
        if type(response) is Response:
            call.respond(response)
            return
        if response is not None:
            # The request has failed already: the engine's error page beats a second error.
            _log.error(
                "hook fail_to_proxy returned %s, expected Response or None; "
                "sending the default error page",
                type(response).__name__,
            )
        call.proceed()

    async def _log_request(self, session: Session, error: ProxyError | None) -> None:
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
            _report(hook, failure)
            if _must_propagate(failure):
                raise

    async def _late_ctx(self, session: Session) -> Any:
        """Make the ctx when no earlier trip made one (see the module docstring). Callers
        check first: once it exists, a trip costs no coroutine for it."""
        assert self._new_ctx is not None
        ctx = self._new_ctx()
        if type(ctx) not in _PLAIN_RESULT_TYPES and isawaitable(ctx):
            ctx = await ctx
        session.ctx = ctx
        return ctx

    def _peer_for(self, addr: str) -> Peer:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) >= _PEER_CACHE_SIZE:
                self._peers.clear()
            peer = self._peers[addr] = Peer(addr)
        return peer

    # -- running a phase ----------------------------------------------------------------

    def _drive(self, phase: _Phase) -> None:
        """Step ``phase`` by hand; only if it suspends does it become a Task on the loop."""
        try:
            pending = phase.send(None)
        except StopIteration:
            return
        self._track(self._loop.create_task(_carry_on(phase, pending)))

    def _start_eager_task(self, phase: _Phase) -> None:
        # eager_start runs the first step now, inside the Task; a phase that finishes in it
        # never reaches the loop's queue.
        task = asyncio.Task(phase, loop=self._loop, **_EAGER)
        if not task.done():
            self._track(task)

    def _track(self, task: asyncio.Task[None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they finish.
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Phases handle hook errors themselves; what arrives here is an engine error from
        # completing the call, which nobody awaits: log it instead of losing it.
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("completing a phase failed", exc_info=error)


async def _carry_on(phase: _Phase, pending: Any) -> None:
    """Finish a phase whose first step, already taken, yielded ``pending``."""
    await _resume(phase, pending)


@types.coroutine
def _resume(phase: _Phase, pending: Any) -> Generator[Any, Any, None]:
    """``yield from phase`` for a coroutine that was already started and yielded ``pending``:
    re-yield what it waits on to the Task and forward what comes back."""
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            phase.close()
            raise
        except BaseException as thrown:
            try:
                pending = phase.throw(thrown)
            except StopIteration:
                return
        else:
            try:
                pending = phase.send(sent)
            except StopIteration:
                return


class _WrongResult(Exception):
    """A hook returned a value of the wrong type (raised and caught inside a phase)."""

    def __init__(self, value: object, expected: str) -> None:
        super().__init__(value, expected)
        self.value = value
        self.expected = expected


def _hook_failed(call: Call, hook: str, error: BaseException) -> None:
    """Report why ``hook`` failed and fail the call; re-raise what must not be swallowed."""
    # The engine picks the status (502 for upstream_peer, else 500).
    call.fail(hook, _report(hook, error))
    if _must_propagate(error):
        raise error


def _report(hook: str, error: BaseException) -> str:
    """Log why ``hook`` failed; returns the message for ``Call.fail``."""
    if isinstance(error, _WrongResult):
        message = f"{hook} returned {type(error.value).__name__}, expected {error.expected}"
        _log.error("hook %s failed: %s", hook, message)
        return message
    if isinstance(error, asyncio.CancelledError):
        # Expected when the server stops with the hook still waiting: no traceback.
        _log.warning("hook %s was cancelled", hook)
    else:
        _log.error("hook %s raised", hook, exc_info=error)
    return f"{type(error).__name__}: {error}"


def _must_propagate(error: BaseException) -> bool:
    """KeyboardInterrupt, SystemExit and GeneratorExit go on up once reported. A
    CancelledError ends with the phase: the Task that was cancelled has nothing left to do."""
    return not isinstance(error, (Exception, asyncio.CancelledError))
