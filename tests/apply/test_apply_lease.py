"""Leader-election decisions (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.apply.lease import LeaseRecord, format_micro_time, lease_decision, parse_lease


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
