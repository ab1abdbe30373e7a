"""The integer arithmetic every autoscaler shares: rounding, min/max, max step, P/D
ratio bounds and deployment-group granularity.

One implementation, used by the coordinated policy and by every baseline, so a
comparison between them never hides a difference in rounding. Every function that
changes a number appends a :class:`~reconciler.policy.base.Clamp` naming itself and
its numbers to the caller's ``clamps`` list (a local accumulator: cheaper than
returning tuples from a function called a million times in a simulation).

Conventions:
- a ratio is ``prefill / decode`` as a float (``"1:3"`` -> 0.333...);
- rounding of a fractional instance count always goes *up* (the safe direction:
  half an instance of demand needs a whole instance), and a ratio violation is fixed
  by adding to the smaller role before anything is taken from the larger one;
- min/max per role are hard: every function returns counts inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.desired.ratio import format_ratio
from reconciler.policy.base import Clamp
from reconciler.state import Role

# Float slack for ceil/floor: 41600 / 1600 must be 26, not 27 after a rounding error.
_EPS = 1e-9


def ceil_count(x: float) -> int:
    """Instances needed for ``x`` instances' worth of demand (never negative)."""
    if x <= 0.0:
        return 0
    whole = int(x)  # floor, for x > 0
    return whole if x - whole <= _EPS * (x if x > 1.0 else 1.0) else whole + 1


def floor_count(x: float) -> int:
    """Whole instances that fit in ``x`` (never negative)."""
    if x <= 0.0:
        return 0
    whole = int(x)
    return whole + 1 if whole + 1 - x <= _EPS * (x if x > 1.0 else 1.0) else whole


@dataclass(frozen=True, slots=True)
class RoleBounds:
    """``min_instances`` and ``max_instances`` of one role."""

    role: str
    min_instances: int
    max_instances: int

    def clip(self, count: int) -> int:
        """Into [min, max]; max wins if a config ever had min > max (checks forbid it)."""
        return min(max(count, self.min_instances), self.max_instances)


def clamp_bounds(count: int, bounds: RoleBounds, clamps: list[Clamp]) -> int:
    """Clip ``count`` into the role's [min, max], recording which bound applied."""
    if count < bounds.min_instances:
        clamped = bounds.clip(count)
        clamps.append(
            Clamp("min_instances", bounds.role, count, clamped, f"min {bounds.min_instances}")
        )
        return clamped
    if count > bounds.max_instances:
        clamps.append(
            Clamp(
                "max_instances",
                bounds.role,
                count,
                bounds.max_instances,
                f"max {bounds.max_instances}",
            )
        )
        return bounds.max_instances
    return count


def step_allowance(current: int, max_step_instances: int, max_step_percent: float) -> int:
    """Largest change of one role in one cycle: ``max(max_step_instances,
    ceil(max_step_percent% of current))``, so a small role can always move a few
    instances and a large one a fraction of itself (the Kubernetes HPA's default
    scale-up policy is the same shape: 4 pods or 100%)."""
    return max(max_step_instances, ceil_count(current * max_step_percent / 100.0))


def clamp_step(
    desired: int,
    current: int,
    role: str,
    max_step_instances: int,
    max_step_percent: float,
    clamps: list[Clamp],
) -> int:
    """Limit ``desired`` to within the step allowance of ``current``."""
    if -max_step_instances <= desired - current <= max_step_instances:
        return desired  # fast path: within the always-allowed step
    allowance = step_allowance(current, max_step_instances, max_step_percent)
    if desired > current + allowance:
        limited = current + allowance
    elif desired < current - allowance:
        limited = max(current - allowance, 0)
    else:
        return desired
    clamps.append(
        Clamp(
            "max_step",
            role,
            desired,
            limited,
            f"max step {max_step_instances} instances or {max_step_percent:g}% of {current}",
        )
    )
    return limited


def follow_ratio(driven_role: str, driven_count: int, ratio: float) -> int:
    """The other role's count for ``driven_count`` of ``driven_role`` at ``ratio``
    (prefill/decode), rounded up so the follower never starves the driven role."""
    if driven_role == "decode":
        return ceil_count(driven_count * ratio)
    return ceil_count(driven_count / ratio)


def _ratio_ok(prefill: int, decode: int, ratio_min: float, ratio_max: float) -> bool:
    if decode == 0:
        return prefill == 0  # no decode: only the empty pair has a ratio to speak of
    ratio = prefill / decode
    return ratio_min * (1 - _EPS) <= ratio <= ratio_max * (1 + _EPS)


def enforce_ratio(
    prefill: int,
    decode: int,
    ratio_min: float,
    ratio_max: float,
    prefill_bounds: RoleBounds,
    decode_bounds: RoleBounds,
    clamps: list[Clamp],
) -> tuple[int, int]:
    """Bring ``prefill / decode`` inside [ratio_min, ratio_max] without leaving the
    roles' [min, max].

    Order of preference (the safe direction first):
    1. add instances to the role that is short (prefill if the ratio is too low,
       decode if too high);
    2. if that role is at its max, take instances from the other role down to what
       the capped role can feed: extra instances of one role without the other to
       pair with serve nothing, and this is how one role is kept from growing while
       the other cannot (coordinated scaling);
    3. if integer counts leave no pair at all near the request (very tight bounds and
       few instances), search outward from ``decode`` for the nearest feasible pair,
       preferring more instances to fewer;
    4. if min/max permit no pair inside the bounds, return the clipped counts and
       record ``ratio_unattainable``.
    Inputs are expected inside their [min, max] already.
    """
    if _ratio_ok(prefill, decode, ratio_min, ratio_max):
        return prefill, decode
    bounds_text = f"ratio bounds {format_ratio(ratio_min)}..{format_ratio(ratio_max)}"
    # The role short of the ratio, the count it needs and its maximum, and what the
    # other role comes to if it stops at that maximum: each side in its own float
    # arithmetic (x ratio_min, / ratio_max), which the golden decisions pin.
    short: Role | None = None
    if decode > 0 and prefill < decode * ratio_min:
        short, capped = "prefill", prefill_bounds.max_instances
        needed = ceil_count(decode * ratio_min)
        fed = max(floor_count(capped / ratio_min), decode_bounds.min_instances)
    elif prefill > decode * ratio_max:
        short, capped = "decode", decode_bounds.max_instances
        needed = ceil_count(prefill / ratio_max)
        fed = max(floor_count(capped * ratio_max), prefill_bounds.min_instances)
    if short is not None:
        grown = _grow_short_role(
            short, needed, capped, fed, prefill, decode, ratio_min, ratio_max, clamps, bounds_text
        )
        if grown is not None:
            return grown
    # 3-4. Rare: scan decode counts outward (upward first) for one that admits an
    # integer prefill count inside the bounds: from ``decode``, or, where decode is the
    # short role, from the count prefill asks of it (at most its maximum). From
    # ``decode`` there, 3 prefill and 4 decode under a 1:5 ratio with decode at most 11
    # came to 1 and 5, where 2 prefill and 4 decode came to 2 and 10: more demand, fewer
    # instances (a planner property test).
    lowest, highest = decode_bounds.min_instances, decode_bounds.max_instances
    start = min(needed, highest) if short == "decode" else decode
    for distance in range(0, max(highest - lowest, 0) + 1):
        for candidate in (start + distance, start - distance):
            if not lowest <= candidate <= highest or candidate == 0:
                continue
            low = max(prefill_bounds.min_instances, ceil_count(candidate * ratio_min))
            high = min(prefill_bounds.max_instances, floor_count(candidate * ratio_max))
            if low <= high:
                chosen = min(max(prefill, low), high)
                if chosen != prefill:
                    clamps.append(Clamp("ratio_bound", "prefill", prefill, chosen, bounds_text))
                if candidate != decode:
                    clamps.append(Clamp("ratio_bound", "decode", decode, candidate, bounds_text))
                return chosen, candidate
    clamps.append(
        Clamp(
            "ratio_unattainable",
            "both",
            prefill,
            prefill,
            f"{bounds_text} cannot hold with prefill {prefill_bounds.min_instances}.."
            f"{prefill_bounds.max_instances} and decode {lowest}..{highest}",
        )
    )
    return prefill, decode


def _grow_short_role(
    short: Role,
    needed: int,
    capped: int,
    fed: int,
    prefill: int,
    decode: int,
    ratio_min: float,
    ratio_max: float,
    clamps: list[Clamp],
    bounds_text: str,
) -> tuple[int, int] | None:
    """Steps 1-2 of :func:`enforce_ratio` for the ``short`` role: grow it to the
    ``needed`` count, or, past its maximum (``capped``), shrink the other role to the
    ``fed`` count that maximum serves. None where neither lands inside the ratio."""
    name, other, verb = (
        ("ratio_min", "decode", "feeds")
        if short == "prefill"
        else ("ratio_max", "prefill", "takes")
    )
    count, other_count = (prefill, decode) if short == "prefill" else (decode, prefill)

    def pair(short_count: int, other_count: int) -> tuple[int, int]:
        """(prefill, decode) of a count of each."""
        return (short_count, other_count) if short == "prefill" else (other_count, short_count)

    if needed <= capped and _ratio_ok(*pair(needed, other_count), ratio_min, ratio_max):
        clamps.append(Clamp(name, short, count, needed, f"{bounds_text}, {other_count} {other}"))
        return pair(needed, other_count)
    if (
        needed > capped
        and fed < other_count
        and _ratio_ok(*pair(capped, fed), ratio_min, ratio_max)
    ):
        if capped != count:
            clamps.append(Clamp(name, short, count, capped, f"{bounds_text}, max"))
        detail = f"{bounds_text}: {short} at max {capped} {verb} at most {fed} {other}"
        clamps.append(Clamp(name, other, other_count, fed, detail))
        return pair(capped, fed)
    return None


def round_to_groups(
    prefill: int,
    decode: int,
    group_prefill: int,
    group_decode: int,
    prefill_bounds: RoleBounds,
    decode_bounds: RoleBounds,
    clamps: list[Clamp],
) -> tuple[int, int]:
    """Round up to whole deployment groups of the shape (``group_prefill`` prefill +
    ``group_decode`` decode): ``g = max(ceil(P / gp), ceil(D / gd))`` groups, kept
    inside the most groups the maxima allow and the fewest the minima need. Whole
    groups pin the ratio to the shape's. If the maxima are not multiples of the shape
    and conflict with the minima, the per-role [min, max] still wins (last clip)."""
    groups = max(ceil_count(prefill / group_prefill), ceil_count(decode / group_decode))
    most = min(
        prefill_bounds.max_instances // group_prefill, decode_bounds.max_instances // group_decode
    )
    fewest = max(
        ceil_count(prefill_bounds.min_instances / group_prefill),
        ceil_count(decode_bounds.min_instances / group_decode),
    )
    groups = max(min(groups, most), fewest)
    rounded_prefill = prefill_bounds.clip(groups * group_prefill)
    rounded_decode = decode_bounds.clip(groups * group_decode)
    if (rounded_prefill, rounded_decode) != (prefill, decode):
        detail = f"{groups} deployment groups of {group_prefill} prefill + {group_decode} decode"
        if rounded_prefill != prefill:
            clamps.append(Clamp("group", "prefill", prefill, rounded_prefill, detail))
        if rounded_decode != decode:
            clamps.append(Clamp("group", "decode", decode, rounded_decode, detail))
    return rounded_prefill, rounded_decode


__all__ = [
    "RoleBounds",
    "ceil_count",
    "clamp_bounds",
    "clamp_step",
    "enforce_ratio",
    "floor_count",
    "follow_ratio",
    "round_to_groups",
    "step_allowance",
]
