"""The thread pool that ``@ferroxy.blocking`` hooks run on.

Not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the interpreter
exits, so one hook still blocked (the very case ``hook_timeout`` gave up on) would hold the
process past its graceful shutdown until a supervisor kills it. These threads are daemons:
at exit, a hook still running is abandoned, as its request already was.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["DaemonPool"]

_T = TypeVar("_T")
_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonPool(Executor):
    """Up to ``max_workers`` daemon threads, started as work arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        if kwargs:
            raise TypeError("DaemonPool.submit takes positional arguments only")
        future: Future[_T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a blocking hook after the server has stopped")
            if self._idle == 0 and self._threads < self._max_workers:
                # Started before the work is queued: if it cannot start, nothing is left
                # queued with no thread counted to run it.
                name = f"{self._prefix}_{self._threads + 1}"
                threading.Thread(target=self._run, name=name, daemon=True).start()
                self._threads += 1
            else:
                self._idle -= 1 if self._idle else 0
            self._work.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args = work
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:
                    future.set_exception(error)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = self._threads
        if cancel_futures:
            while True:
                try:
                    work = self._work.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0].cancel()
        for _ in range(threads):
            self._work.put(None)
