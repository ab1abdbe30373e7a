"""The client's request counts stay exact when threads share it (the snapshot lists
and the dry-run pool do): no increment is lost to an interleaved read and write."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from reconciler.apply.kubeclient import RequestStats


@pytest.fixture
def eager_thread_switches() -> Iterator[None]:
    # Switch threads every microsecond, so that an unguarded read-modify-write is
    # interleaved within the test's few seconds rather than once in a long while.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_counts_from_many_threads_add_up_exactly(eager_thread_switches: None) -> None:
    stats = RequestStats()
    threads, each = 8, 20_000

    def work() -> None:
        for index in range(each):
            stats.count_request("GET" if index % 2 else "PATCH")
            stats.count_retry()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert stats.requests == stats.retries == threads * each
    assert stats.by_verb == {"GET": threads * each // 2, "PATCH": threads * each // 2}
