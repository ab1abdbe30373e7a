"""A small thread pool of daemon threads, for the requests a reconcile cycle fans out
(Prometheus queries, the API server's lists and dry runs).

Why not ``concurrent.futures.ThreadPoolExecutor``: since Python 3.9 the interpreter
joins every such executor's worker threads at exit. A cycle that a stop leaves running
(``ReconcileLoop.stop_cycles``: "left to end with the process") then held the stopping
process until its query timed out: a prober's `run` exited 57.9 s after SIGTERM, past
Kubernetes' 30 s grace, with a traceback of "cannot schedule new futures after
interpreter shutdown". These threads are daemons: the process ends when `run` is done,
as the cycles' own threads already do (``reconciler.loop.running``).

The subset of the executor's interface those callers use: ``submit`` (a
``concurrent.futures.Future``, so ``concurrent.futures.wait`` works on it), ``map``,
``shutdown`` and the context manager (which waits for the work, as the executor's
does).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_WorkItem = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_pool_numbers = itertools.count()


class DaemonThreadPool:
    """Runs submitted calls on at most ``max_workers`` daemon threads, started as work
    arrives."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix or f"heteroscale-pool-{next(_pool_numbers)}"
        self._work: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._lock = threading.Lock()
        self._shut_down = False

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot submit to a pool that was shut down")
            self._work.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._run,
                    name=f"{self._prefix}_{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle = max(0, self._idle - 1)
        return future

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` of every item, in the items' order (each submitted at once); a call's
        exception is raised where its result is reached."""
        futures = [self.submit(fn, item) for item in items]

        def results() -> Iterator[R]:
            for future in futures:
                yield future.result()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submissions; with ``cancel_futures`` the calls not yet started are
        cancelled; with ``wait``, returns once the threads are done."""
        with self._lock:
            self._shut_down = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def __enter__(self) -> DaemonThreadPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown(wait=True)

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1
