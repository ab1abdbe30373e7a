"""Leader-election decisions (pure)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.apply.kubeclient import Forbidden, NotFound
from reconciler.apply.lease import (
    LeaseElector,
    LeaseRecord,
    format_micro_time,
    lease_decision,
    live_holder,
    parse_lease,
    parse_micro_time,
)


def record(holder: str, duration_s: int = 15) -> LeaseRecord:
    return LeaseRecord(holder, duration_s, None, None, 0)


def test_renew_own_take_free_wait_for_live_holder_take_expired() -> None:
    assert lease_decision(record("me"), "me", 0, 100) == "renew"
    assert lease_decision(record(""), "me", 0, 0) == "acquire"
    assert lease_decision(record("other"), "me", observed_at_s=100, now_s=110) == "wait"
    assert lease_decision(record("other"), "me", observed_at_s=100, now_s=115) == "acquire"


@given(st.floats(0, 1e6), st.floats(0, 100), st.integers(1, 60))
@settings(max_examples=200, deadline=None)
def test_a_live_holder_is_never_displaced(
    observed_at_s: float, elapsed_s: float, duration_s: int
) -> None:
    decision = lease_decision(
        record("other", duration_s), "me", observed_at_s, observed_at_s + elapsed_s
    )
    assert (decision == "wait") == (elapsed_s < duration_s)


def test_a_one_shot_reader_sees_a_holder_live_until_its_renewal_plus_the_duration() -> None:
    """``live_holder`` (what ``apply`` asks before recording its plan)."""
    renewed = 1_700_000_000.25
    held = LeaseRecord("replica-1", 15, None, format_micro_time(renewed), 0)
    assert parse_micro_time(format_micro_time(renewed)) == renewed
    assert live_holder(held, renewed + 14.9) == "replica-1"
    assert live_holder(held, renewed + 15.1) is None  # expired
    assert live_holder(None, renewed) is None  # no Lease
    assert live_holder(LeaseRecord("", 15, None, None, 0), renewed) is None  # released
    # A holder without a readable renewal time is not presumed gone.
    assert live_holder(LeaseRecord("replica-1", 15, None, None, 0), renewed) == "replica-1"
    assert live_holder(LeaseRecord("replica-1", 15, None, "yesterday", 0), renewed) == "replica-1"


def test_lease_objects_round_trip() -> None:
    stamp = format_micro_time(0.5)
    assert stamp == "1970-01-01T00:00:00.500000Z"
    parsed = parse_lease(
        {
            "spec": {
                "holderIdentity": "a",
                "leaseDurationSeconds": 15,
                "renewTime": stamp,
                "leaseTransitions": 2,
            }
        }
    )
    assert parsed == LeaseRecord("a", 15, None, stamp, 2)
    assert parse_lease({}).holder == ""


# ----------------------------------------------------------------------------- failures


class _FailingClient:
    """A client whose every request raises ``error``, until ``error`` is None; then
    the Lease is free (404 on read, created on write)."""

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.calls = 0

    def get(self, path: str) -> dict:
        self.calls += 1
        if self.error is not None:
            raise self.error
        raise NotFound(404, "NotFound", "no lease")

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return body or {}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _elector(client: _FailingClient, clock: _Clock, **kwargs: object) -> LeaseElector:
    return LeaseElector(
        client,  # type: ignore[arg-type]
        "ns",
        "lease",
        "me",
        clock=clock,
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )


def test_any_error_is_recorded_not_raised_and_backs_off_up_to_a_jittered_cap() -> None:
    clock = _Clock()
    elector = _elector(_FailingClient(RuntimeError("a bug")), clock, max_backoff_s=8.0)
    assert elector.next_wait_s() == 2.0  # the retry period while rounds succeed
    waits = []
    for _ in range(8):
        assert elector.try_acquire_or_renew() is False
        waits.append(elector.next_wait_s())
    assert elector.error_counts() == {"RuntimeError": 8}
    bases = [2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    assert all(base / 2 <= wait <= base for wait, base in zip(waits, bases, strict=True))
    assert len(set(waits)) == len(waits), "jittered"


def test_health_fails_after_the_bound_without_a_decision_and_recovers() -> None:
    clock = _Clock()
    client = _FailingClient(Forbidden(403, "Forbidden", "leases is forbidden"))
    elector = _elector(client, clock)  # lease 15 s: unhealthy after 45 s
    elector.try_acquire_or_renew()
    clock.now = 45.0
    assert elector.health_problem() is None
    clock.now = 45.5
    elector.try_acquire_or_renew()
    problem = elector.health_problem()
    assert problem is not None and "Forbidden" in problem and "46 s" in problem
    client.error = None  # permission granted: the next round takes the free Lease
    assert elector.try_acquire_or_renew() is True
    assert elector.health_problem() is None and elector.consecutive_failures == 0
    assert elector.next_wait_s() == 2.0


def test_a_leader_that_fails_retries_at_its_retry_period_to_renew_in_time() -> None:
    clock = _Clock()
    client = _FailingClient(None)
    elector = _elector(client, clock)
    assert elector.try_acquire_or_renew() is True
    client.error = Forbidden(403, "Forbidden", "revoked")
    for _ in range(5):
        assert elector.try_acquire_or_renew() is True  # until the renew deadline
        assert elector.next_wait_s() <= elector.retry_period_s
    clock.now = 10.0
    assert elector.try_acquire_or_renew() is False
