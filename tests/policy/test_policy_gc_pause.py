"""The collector pause of a batch of decisions (``base.gc_paused``) when several
clusters' cycles decide at once, each on its own thread (``reconciler.loop``)."""

from __future__ import annotations

import gc
import threading

from reconciler.policy.base import gc_paused


def test_overlapping_batches_keep_the_collector_paused_until_the_last_ends() -> None:
    assert gc.isenabled()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def second() -> None:
        first_in.wait(5)
        with gc_paused():
            second_in.set()
            first_out.wait(5)
            seen["after the first batch ended"] = gc.isenabled()

    thread = threading.Thread(target=second)
    thread.start()
    with gc_paused():
        first_in.set()
        second_in.wait(5)
    first_out.set()
    thread.join(5)
    # Before: the first batch to end started the collector under the second one.
    assert seen == {"after the first batch ended": False}
    assert gc.isenabled(), "running again once every batch ended"


def test_a_batch_leaves_a_collector_it_found_paused_as_it_was() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    with gc_paused(), gc_paused():  # nested in one thread
        assert not gc.isenabled()
    assert gc.isenabled()
