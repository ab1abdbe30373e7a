"""The daemon thread pool the cycles fan their requests out on: the executor's
behaviour its callers rely on (results and exceptions through futures, ``map`` in
order, ``shutdown`` that waits or cancels), on daemon threads that never hold the
process at exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import wait

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.daemon_pool import DaemonThreadPool


@given(st.lists(st.integers(), max_size=40), st.integers(min_value=1, max_value=6))
def test_map_returns_every_result_in_the_items_order(items: list[int], workers: int) -> None:
    with DaemonThreadPool(workers) as pool:
        assert list(pool.map(lambda x: x * 2, items)) == [x * 2 for x in items]


def test_a_calls_exception_reaches_whoever_waits_on_its_future() -> None:
    def fails() -> None:
        raise ValueError("boom")

    with DaemonThreadPool(2) as pool:
        failed, fine = pool.submit(fails), pool.submit(lambda: 7)
        wait([failed, fine])
        assert isinstance(failed.exception(), ValueError) and fine.result() == 7
        with pytest.raises(ZeroDivisionError):
            list(pool.map(lambda x: 1 / x, [1, 0]))


def test_no_more_than_max_workers_calls_run_at_once() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def call() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    with DaemonThreadPool(3) as pool:
        wait([pool.submit(call) for _ in range(20)])
    assert most <= 3


def test_shutdown_cancels_what_has_not_started_and_refuses_more() -> None:
    gate = threading.Event()
    pool = DaemonThreadPool(1)
    blocking = pool.submit(gate.wait, 10)
    queued = [pool.submit(lambda: 1) for _ in range(5)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 1)
    gate.set()
    assert blocking.result(timeout=10) is True


def test_its_threads_are_daemons_and_a_hung_call_does_not_hold_the_process_at_exit() -> None:
    # A ThreadPoolExecutor's workers are joined at interpreter exit: a call hung on a
    # server that never answers held a stopping `run` ~40 s past its Lease's release.
    script = textwrap.dedent(
        """
        import threading, time
        from reconciler.daemon_pool import DaemonThreadPool
        pool = DaemonThreadPool(2)
        pool.submit(time.sleep, 600)
        time.sleep(0.2)
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("heteroscale-pool"))
        print("done")
        """
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert time.monotonic() - started < 20, "the hung call held the process at exit"
