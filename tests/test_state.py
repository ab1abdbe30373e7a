"""The observed state's own checks (``reconciler.state``)."""

from __future__ import annotations

import math

from reconciler.state import (
    MAX_LENGTH_BUCKETS,
    LengthBuckets,
    Sample,
    is_fresh,
    usable_length_histogram,
)


def _buckets(bounds: int) -> LengthBuckets:
    le = (*(float(2 * k) for k in range(1, bounds)), math.inf)
    return LengthBuckets(le, tuple(float(k) for k in range(1, bounds + 1)), 0.0)


def test_a_length_histogram_has_at_most_as_many_buckets_as_any_engine_exports() -> None:
    # Live readings and remembered mixes alike: the planner's work grows with them.
    assert _buckets(MAX_LENGTH_BUCKETS).is_usable(0.0, 60.0)
    assert not _buckets(MAX_LENGTH_BUCKETS + 1).is_usable(0.0, 60.0)
    many = _buckets(MAX_LENGTH_BUCKETS + 1)
    assert not usable_length_histogram(many.le, many.cumulative[-1])


def test_a_histogram_whose_counts_fall_from_one_bound_to_the_next_is_not_usable() -> None:
    le = (100.0, 1000.0, 10000.0, math.inf)
    assert LengthBuckets(le, (10.0, 50.0, 90.0, 100.0), 0.0).is_usable(0.0, 60.0)
    # Reversed (a broken query): read as it stands it put every request in the first
    # bucket and made the prefill capacity 55% larger.
    assert not LengthBuckets(le, (100.0, 90.0, 50.0, 10.0), 0.0).is_usable(0.0, 60.0)
    assert not LengthBuckets(le, (10.0, 50.0, 49.0, 100.0), 0.0).is_usable(0.0, 60.0)
    # A fall by float rounding alone (rates of the bounds computed alike) is no fall.
    rounded = (10.0, 50.0, 50.0 - 1e-12, 100.0)
    assert LengthBuckets(le, rounded, 0.0).is_usable(0.0, 60.0)


def test_a_reading_from_the_future_is_no_fresher_than_one_from_the_past() -> None:
    for reading in (Sample(5.0, 1_000.0), LengthBuckets((10.0, math.inf), (1.0, 2.0), 1_000.0)):
        assert reading.is_usable(1_000.0, 60.0)
        assert reading.is_usable(1_030.0, 60.0) and reading.is_usable(970.0, 60.0)
        assert not reading.is_usable(1_061.0, 60.0)  # too old
        assert not reading.is_usable(939.0, 60.0)  # stamped beyond the age into the future
        assert not reading.is_usable(1_000.0 - 1e6, 60.0)
    assert not is_fresh(math.nan, 0.0, 60.0)
