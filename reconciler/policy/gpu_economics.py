"""What each GPU type a role allows delivers per dollar, from the performance model.

A policy's ``gpu_types`` weights are a person's preference; this module says what the
model makes of them: for a request mix, each allowed type's capacity per instance at
the SLO (the planner's own derivation, ``planner.capacities_for``), the instance's
price (``gpus_per_instance x cost_per_hour``) and so the tokens it serves per dollar.
Prefill is compute-bound and decode memory-bandwidth-bound until its batch runs out of
compute, so the cheapest type per token differs by role, model and mix: for the
example ``chat`` service (a 70 B dense model at a 50 ms TBT) an H20 decode instance is
compute-bound at ~55 sequences and an H800 one serves more tokens per dollar, while
the other example services' decode is cheaper on the H20
(``benchmarks/bench_findings.py``).

Nothing here changes a decision: ``tune`` reports it, so that a preference that costs
more per token than another allowed type is seen (issue #15, item 2 builds on it).
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.perfmodel.instance import InstancePerf
from reconciler.policy.capacity import LatencyCorrection, RequestMix
from reconciler.policy.planner import PerfContext, capacities_for, fitting_perfs
from reconciler.state import Role

# A preferred type that serves this much fewer tokens per dollar than the best allowed
# one is reported: below it, the model's own fit error (3-4 %) and the mix's drift
# within a day could reverse the order.
COSTLIER_TOLERANCE = 0.10


@dataclass(frozen=True)
class TypeEconomics:
    """One GPU type for one role: capacity per instance and what a token costs."""

    gpu_type: str
    tps_per_instance: float  # prompt (prefill) or output (decode) tokens/s at the SLO
    usd_per_hour: float | None  # one instance; None when the type has no price

    @property
    def mtok_per_usd(self) -> float | None:
        """Million tokens served per unit of the cluster's currency at capacity (None:
        unpriced or no capacity); named for USD, the examples' currency, as ``cost_usd``."""
        if self.usd_per_hour is None or self.usd_per_hour <= 0 or self.tps_per_instance <= 0:
            return None
        return self.tps_per_instance * 3600.0 / self.usd_per_hour / 1e6


@dataclass(frozen=True)
class RoleEconomics:
    """Every allowed type of one role that exists in the cluster and fits the model, in
    the policy's preference order (the first is what runs today)."""

    role: Role
    types: tuple[TypeEconomics, ...]

    @property
    def preferred(self) -> TypeEconomics | None:
        return self.types[0] if self.types else None

    @property
    def cheapest(self) -> TypeEconomics | None:
        """The type with the most tokens per dollar (None when none is priced)."""
        priced = [t for t in self.types if t.mtok_per_usd is not None]
        return max(priced, key=lambda t: t.mtok_per_usd or 0.0) if priced else None

    def costlier_preference(self) -> float | None:
        """How many times more a token costs on the preferred type than on the
        cheapest, when that exceeds ``1 + COSTLIER_TOLERANCE``; else None."""
        preferred, cheapest = self.preferred, self.cheapest
        if preferred is None or cheapest is None or preferred is cheapest:
            return None
        preferred_rate = preferred.mtok_per_usd
        best_rate = cheapest.mtok_per_usd
        if preferred_rate is None or best_rate is None:
            return None
        ratio = best_rate / preferred_rate if preferred_rate > 0 else float("inf")
        return ratio if ratio > 1.0 + COSTLIER_TOLERANCE else None

    def line(self, currency: str) -> str:
        unit = "prompt" if self.role == "prefill" else "output"
        parts = []
        for t in self.types:
            rate = t.mtok_per_usd
            price = "unpriced" if rate is None else f"{rate:.2f} M per {currency}"
            parts.append(f"{t.gpu_type} {t.tps_per_instance:,.0f} {unit} tokens/s ({price})")
        return f"{self.role} by allowed GPU type, preferred first: " + "; ".join(parts)

    def warning(self, currency: str) -> str | None:
        ratio = self.costlier_preference()
        if ratio is None:
            return None
        assert self.preferred is not None and self.cheapest is not None
        return (
            f"{self.role} prefers {self.preferred.gpu_type}, but a {self.role} token costs "
            f"{ratio:.2f}x as much there as on {self.cheapest.gpu_type} (allowed) at this "
            f"mix and the cluster's prices ({currency}): reorder the policy's gpu_types if "
            "the inventory allows"
        )


def _instance_usd_per_hour(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role, gpu_type: str
) -> float | None:
    price = cluster.gpu_types[gpu_type].cost_per_hour
    return None if price is None else price * policy.role(role).gpus_per_instance


def role_economics(
    policy: ServicePolicy, cluster: ClusterSpec, mix: RequestMix, prefill_instances: int = 8
) -> tuple[RoleEconomics, RoleEconomics]:
    """Both roles' ``RoleEconomics`` for ``mix``. Each type's capacity is the planner's
    own (``planner.capacities_for``), with the other role on its preferred type
    (decode's step is the last part of a TTFT); ``prefill_instances`` is the pool size
    prefill is sized at (pooling lets a larger pool run busier)."""
    prefill = fitting_perfs(policy, cluster, "prefill")
    decode = fitting_perfs(policy, cluster, "decode")
    if not prefill or not decode:
        return RoleEconomics("prefill", ()), RoleEconomics("decode", ())

    def economics(role: Role, candidates: list[InstancePerf]) -> RoleEconomics:
        """Each candidate in ``role``, the other role on its preferred type."""
        types = []
        for perf in candidates:
            pair = (perf, decode[0]) if role == "prefill" else (prefill[0], perf)
            context = PerfContext(*pair, cluster.network.rdma_gbps)
            caps = capacities_for(policy, context, mix, prefill_instances, LatencyCorrection())
            tps = (
                caps.prefill_tps_per_instance if role == "prefill" else caps.decode_tps_per_instance
            )
            price = _instance_usd_per_hour(policy, cluster, role, perf.gpu_type)
            types.append(TypeEconomics(perf.gpu_type, tps, price))
        return RoleEconomics(role, tuple(types))

    return economics("prefill", prefill), economics("decode", decode)


__all__ = ["COSTLIER_TOLERANCE", "RoleEconomics", "TypeEconomics", "role_economics"]
