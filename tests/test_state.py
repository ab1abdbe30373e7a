"""The observed state's own checks (``reconciler.state``)."""

from __future__ import annotations

import math

from reconciler.state import MAX_LENGTH_BUCKETS, LengthBuckets, usable_length_histogram


def _buckets(bounds: int) -> LengthBuckets:
    le = (*(float(2 * k) for k in range(1, bounds)), math.inf)
    return LengthBuckets(le, tuple(float(k) for k in range(1, bounds + 1)), 0.0)


def test_a_length_histogram_has_at_most_as_many_buckets_as_any_engine_exports() -> None:
    # Live readings and remembered mixes alike: the planner's work grows with them.
    assert _buckets(MAX_LENGTH_BUCKETS).is_usable(0.0, 60.0)
    assert not _buckets(MAX_LENGTH_BUCKETS + 1).is_usable(0.0, 60.0)
    many = _buckets(MAX_LENGTH_BUCKETS + 1)
    assert not usable_length_histogram(many.le, many.cumulative[-1])
