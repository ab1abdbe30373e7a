"""What GPUs cost: the one place that turns GPU counts and GPU-hours into money.

Prices come from the cluster file: ``gpu_types.<type>.cost_per_hour`` is the price of
one GPU of that type for one hour, in the cluster's ``currency``. Every report (``plan``,
``simulate``) prices through these functions.

A GPU type without a price makes every figure that covers GPUs of that type unknown
(``Cost.amount`` is None), never 0: a fleet that reads "0 USD" looks free, not
unpriced. ``Cost.unpriced_types`` names the types that lack a price, so a report can
say which to add. GPUs whose size is unknown (an observed group without a GPU count
and no policy to take it from) make a figure unknown the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.desired.models import ClusterSpec
from reconciler.state import ROLES, DeploymentGroup, Role


@dataclass(frozen=True)
class GpuPrices:
    """Per-GPU-hour prices of one cluster's GPU types (priced types only)."""

    currency: str
    per_gpu_hour: Mapping[str, float]

    @classmethod
    def of_cluster(cls, spec: ClusterSpec) -> GpuPrices:
        return cls(
            currency=spec.currency,
            per_gpu_hour={
                name: gpu.cost_per_hour
                for name, gpu in sorted(spec.gpu_types.items())
                if gpu.cost_per_hour is not None
            },
        )


@dataclass(frozen=True)
class Cost:
    """An amount of money in ``currency``, or unknown (``amount`` None) because some of
    the GPUs it covers have no price (``unpriced_types``) or no known size
    (``unsized``: ``service/role`` names)."""

    amount: float | None
    currency: str
    unpriced_types: tuple[str, ...] = ()
    unsized: tuple[str, ...] = ()

    def __add__(self, other: Cost) -> Cost:
        if other.currency != self.currency:
            raise ValueError(f"cannot add {self.currency} and {other.currency}")
        amount = None
        if self.amount is not None and other.amount is not None:
            amount = self.amount + other.amount
        return Cost(
            amount=amount,
            currency=self.currency,
            unpriced_types=tuple(sorted({*self.unpriced_types, *other.unpriced_types})),
            unsized=tuple(sorted({*self.unsized, *other.unsized})),
        )

    @classmethod
    def zero(cls, currency: str) -> Cost:
        return cls(0.0, currency)

    def why_unknown(self) -> str:
        """Why ``amount`` is None ("" when known), e.g. "no price for l20"."""
        reasons = []
        if self.unpriced_types:
            reasons.append(f"no price for {', '.join(self.unpriced_types)}")
        if self.unsized:
            reasons.append(f"GPUs per instance unknown for {', '.join(self.unsized)}")
        return "; ".join(reasons)


@dataclass(frozen=True)
class CostChange:
    """A cost per hour before and after a change (what runs now, what is planned)."""

    current: Cost
    planned: Cost

    @property
    def delta(self) -> float | None:
        """planned - current; None when either is unknown."""
        if self.current.amount is None or self.planned.amount is None:
            return None
        return self.planned.amount - self.current.amount


def cost_of_gpu_hours(gpu_hours_by_type: Mapping[str, float], prices: GpuPrices) -> Cost:
    """What GPU-hours of each type cost: the sum of hours x the type's price. Unknown
    when a type with hours has no price (a type without hours needs none)."""
    amount = 0.0
    unpriced: list[str] = []
    for gpu_type, hours in sorted(gpu_hours_by_type.items()):
        if not hours:
            continue
        if not math.isfinite(hours) or hours < 0:
            raise ValueError(f"GPU-hours of {gpu_type} must be finite and >= 0, got {hours}")
        price = prices.per_gpu_hour.get(gpu_type)
        if price is None:
            unpriced.append(gpu_type)
        else:
            amount += hours * price
    return Cost(None if unpriced else amount, prices.currency, tuple(unpriced))


def gpus_by_type(
    instances: Mapping[tuple[str, Role], int], gpus_per_instance: Mapping[Role, int]
) -> dict[str, int]:
    """GPUs per GPU type from instances per ``(gpu_type, role)``."""
    gpus: dict[str, int] = {}
    for (gpu_type, role), count in instances.items():
        gpus[gpu_type] = gpus.get(gpu_type, 0) + count * gpus_per_instance[role]
    return gpus


def cost_per_hour(
    instances: Mapping[tuple[str, Role], int],
    gpus_per_instance: Mapping[Role, int],
    prices: GpuPrices,
) -> Cost:
    """What instances per ``(gpu_type, role)`` cost per hour (N GPUs running for an hour
    are N GPU-hours)."""
    return cost_of_gpu_hours(
        {t: float(n) for t, n in gpus_by_type(instances, gpus_per_instance).items()}, prices
    )


def groups_cost_per_hour(
    groups: Iterable[DeploymentGroup],
    gpus_per_instance: Mapping[tuple[str, Role], int],
    prices: GpuPrices,
) -> Cost:
    """What deployment groups cost per hour. A role's GPUs per instance are the
    policy's (``gpus_per_instance`` by ``(service, role)``, as the plan's GPU deltas
    count them), else the group's observed size; with neither the cost is unknown."""
    gpus: dict[str, float] = {}
    unsized: set[str] = set()
    for group in groups:
        for role in ROLES:
            part = group.role(role)
            if not part.instances:
                continue
            size = gpus_per_instance.get((group.service, role)) or part.gpus_per_instance
            if size is None:
                unsized.add(f"{group.service}/{role}")
            else:
                gpus[part.gpu_type] = gpus.get(part.gpu_type, 0.0) + part.instances * size
    cost = cost_of_gpu_hours(gpus, prices)
    if unsized:
        cost += Cost(None, prices.currency, unsized=tuple(sorted(unsized)))
    return cost


def per_million(amount: float | None, tokens: float) -> float | None:
    """``amount`` per million tokens; None when either is unknown or no token counts."""
    if amount is None or not math.isfinite(tokens) or tokens <= 0:
        return None
    return amount / tokens * 1e6


def money(amount: float | None, digits: int = 2, *, signed: bool = False) -> str:
    """``1,234.50`` (``+1,234.50`` when ``signed``), or ``unknown``."""
    if amount is None:
        return "unknown"
    return f"{amount:{'+' if signed else ''},.{digits}f}"


__all__ = [
    "Cost",
    "CostChange",
    "GpuPrices",
    "cost_of_gpu_hours",
    "cost_per_hour",
    "gpus_by_type",
    "groups_cost_per_hour",
    "money",
    "per_million",
]
