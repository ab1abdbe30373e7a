"""Which GPU type each role runs on: what each allowed type delivers per dollar, from
the performance model, and the ranking that follows.

A policy's ``gpu_types`` keys are a constraint (only those types may run the role);
its weights are a person's preference. For a request mix, each allowed type's capacity
per instance at the SLO is the planner's own derivation (``perf_context.capacities_for``),
its price is ``gpus_per_instance x cost_per_hour``, and so it serves so many tokens per
dollar. Prefill is compute-bound and decode memory-bandwidth-bound until its batch runs
out of compute, so the cheapest type per token differs by role, model and mix: for the
example ``chat`` service (a 70 B dense model at a 50 ms TBT) an H20 decode instance is
compute-bound at ~55 sequences and an H800 one serves more tokens per dollar, while
the other example services' decode is cheaper on the H20
(``benchmarks/bench_findings.py``).

``choose_gpu_types`` ranks a role's allowed types (``RolePolicy.gpu_choice``):

- ``cost`` (the default): the type with the most tokens per dollar for the policy's
  declared ``request_shape`` comes first; the weights break ties within
  ``COSTLIER_TOLERANCE`` (the model's own fit error and a day's drift of the mix could
  reverse a closer order). The declared shape, not the live mix, so the ranking moves
  only with a reviewed change (policy, prices, model), never with the traffic: a
  ranking that followed the mix would migrate a fleet back and forth.
- ``preference``, an unpriced cluster, or no ``request_shape``: the weights' order.

Every consumer reads that one ranking: the planner sizes with the first type's model
(``perf_context``), placement puts new instances on the first type and spills to the
next ones only where its inventory runs out, and removes the last-ranked first
(``ranked_weights``), and the simulator's oracle-min and static peak size the same type.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.perfmodel.instance import InstancePerf
from reconciler.policy.capacity import LatencyCorrection, RequestMix
from reconciler.policy.perf_context import (
    PerfContext,
    capacities_for,
    declared_mix,
    fitting_perfs,
)
from reconciler.state import Role

# Types whose tokens per dollar are within this of the best are equally cheap: the
# weights order them. Below it, the model's own fit error (3-4 %) and the mix's drift
# within a day could reverse the order. A preferred type costlier than this is reported.
COSTLIER_TOLERANCE = 0.10

# The prefill pool size the ranking prices at (pooling lets a larger pool run busier):
# a mid-sized pool; the order it gives does not move with it for the example services.
RANKING_PREFILL_INSTANCES = 8


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
    the policy's preference order (the weights'), and how the policy ranks them."""

    role: Role
    types: tuple[TypeEconomics, ...]
    gpu_choice: str = "preference"  # the policy's ``gpu_choice`` for this role

    @property
    def preferred(self) -> TypeEconomics | None:
        return self.types[0] if self.types else None

    @property
    def cheapest(self) -> TypeEconomics | None:
        """The type with the most tokens per dollar (None when none is priced)."""
        priced = [t for t in self.types if t.mtok_per_usd is not None]
        return max(priced, key=lambda t: t.mtok_per_usd or 0.0) if priced else None

    def cost_ratio(self, economics: TypeEconomics) -> float | None:
        """How many times more a token costs on ``economics`` than on the cheapest type
        (1.0 for the cheapest; None when unpriced)."""
        cheapest = self.cheapest
        rate = economics.mtok_per_usd
        if cheapest is None or rate is None or cheapest.mtok_per_usd is None:
            return None
        return cheapest.mtok_per_usd / rate

    def ranked(self) -> tuple[TypeEconomics, ...]:
        """The types in the policy's ranking (module docstring)."""
        if self.gpu_choice != "cost" or len(self.types) < 2:
            return self.types
        ratios = [self.cost_ratio(t) for t in self.types]
        if any(r is None for r in ratios):
            return self.types  # unpriced: cost unknown, the weights decide
        # The first: the most preferred of the equally cheap; then by price per token.
        first = next(
            t
            for t, r in zip(self.types, ratios, strict=True)
            if r is not None and r <= 1.0 + COSTLIER_TOLERANCE
        )
        rest = sorted(
            (t for t in self.types if t is not first),
            key=lambda t: -(t.mtok_per_usd or 0.0),  # stable: the weights break exact ties
        )
        return (first, *rest)

    def costlier_preference(self) -> float | None:
        """How many times more a token costs on the preferred type than on the
        cheapest, when that exceeds ``1 + COSTLIER_TOLERANCE`` and the policy keeps its
        preference order; else None."""
        preferred = self.preferred
        if self.gpu_choice == "cost" or preferred is None:
            return None
        ratio = self.cost_ratio(preferred)
        return ratio if ratio is not None and ratio > 1.0 + COSTLIER_TOLERANCE else None

    def line(self, currency: str) -> str:
        unit = "prompt" if self.role == "prefill" else "output"
        ranked = self.ranked()
        parts = []
        for t in ranked:
            rate = t.mtok_per_usd
            price = "unpriced" if rate is None else f"{rate:.2f} M per {currency}"
            parts.append(f"{t.gpu_type} {t.tps_per_instance:,.0f} {unit} tokens/s ({price})")
        order = "cheapest first" if ranked != self.types else "preferred first"
        return f"{self.role} by allowed GPU type, {order}: " + "; ".join(parts)

    def ranking_drift(self, declared_first: str | None, currency: str) -> str | None:
        """Ranked by cost, the policy prices its types at its declared
        ``request_shape`` (``declared_first`` comes first there); when this mix puts
        another type first by more than ``COSTLIER_TOLERANCE``, the line that says so
        (the declared shape no longer describes the traffic); else None."""
        ranked = self.ranked()
        if self.gpu_choice != "cost" or not ranked or declared_first is None:
            return None
        best = ranked[0]
        declared = next((t for t in self.types if t.gpu_type == declared_first), None)
        if best.gpu_type == declared_first or declared is None:
            return None
        ratio = self.cost_ratio(declared)
        if ratio is None or ratio <= 1.0 + COSTLIER_TOLERANCE:
            return None
        return (
            f"{self.role} is ranked by cost at the declared request_shape ({declared_first} "
            f"first), but at this mix a {self.role} token costs {ratio:.2f}x as much there "
            f"as on {best.gpu_type} ({currency}): update request_shape to the traffic"
        )

    def warning(self, currency: str) -> str | None:
        ratio = self.costlier_preference()
        if ratio is None:
            return None
        assert self.preferred is not None and self.cheapest is not None
        return (
            f"{self.role} prefers {self.preferred.gpu_type}, but a {self.role} token costs "
            f"{ratio:.2f}x as much there as on {self.cheapest.gpu_type} (allowed) at this "
            f"mix and the cluster's prices ({currency}): set gpu_choice: cost, or reorder "
            "the policy's gpu_types if the inventory allows"
        )


def _instance_usd_per_hour(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role, gpu_type: str
) -> float | None:
    price = cluster.gpu_types[gpu_type].cost_per_hour
    return None if price is None else price * policy.role(role).gpus_per_instance


def role_economics(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    mix: RequestMix,
    prefill_instances: int = RANKING_PREFILL_INSTANCES,
    running: PerfContext | None = None,
) -> tuple[RoleEconomics, RoleEconomics]:
    """Both roles' ``RoleEconomics`` for ``mix``. Each type's capacity is the planner's
    own (``capacities_for``), with the other role on the type of ``running`` (the
    planner's ``perf_context``; default: its most preferred type), since decode's step
    is the last part of a TTFT; ``prefill_instances`` is the pool size prefill is
    sized at (pooling lets a larger pool run busier)."""
    prefill = fitting_perfs(policy, cluster, "prefill")
    decode = fitting_perfs(policy, cluster, "decode")
    if not prefill or not decode:
        return RoleEconomics("prefill", ()), RoleEconomics("decode", ())
    other_prefill = running.prefill if running is not None else prefill[0]
    other_decode = running.decode if running is not None else decode[0]

    def economics(role: Role, candidates: list[InstancePerf]) -> RoleEconomics:
        """Each candidate in ``role``, the other role as it runs."""
        types = []
        for perf in candidates:
            pair = (perf, other_decode) if role == "prefill" else (other_prefill, perf)
            context = PerfContext(*pair, cluster.network.rdma_gbps)
            caps = capacities_for(policy, context, mix, prefill_instances, LatencyCorrection())
            # A type on which no rate meets the SLO has no capacity at the SLO, however
            # much work it keeps up with: ranked by that, it would look the cheapest.
            tps = 0.0 if caps.keeps_up_only(role) else caps.tps_per_instance(role)
            price = _instance_usd_per_hour(policy, cluster, role, perf.gpu_type)
            types.append(TypeEconomics(perf.gpu_type, tps, price))
        return RoleEconomics(role, tuple(types), policy.role(role).gpu_choice)

    return economics("prefill", prefill), economics("decode", decode)


# --------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class GpuChoice:
    """One role's ranked GPU types and why the first is first."""

    role: Role
    order: tuple[str, ...]  # allowed and on some node of the cluster; new instances on the first
    by_cost: bool  # the cost ranking put first another type than the weights do
    reason: str  # one line, empty when the weights' order stands unopposed
    # The policy's weights moved onto ``order`` (``ranked_weights``): placement's
    # preference costs. Read-only: every placement of the cycle shares it.
    weights: Mapping[str, float] = field(default_factory=dict)

    @property
    def first(self) -> str | None:
        return self.order[0] if self.order else None


def _choose(policy: ServicePolicy, cluster: ClusterSpec) -> tuple[GpuChoice, GpuChoice]:
    # Only types some node has: new instances go on the first, and the planner sizes
    # with its model (a type without nodes would be sized for, then never placed).
    present = [
        [t for t in policy.role(role).preferred_gpu_types() if t in cluster.gpu_types_with_nodes]
        for role in ("prefill", "decode")
    ]
    if policy.request_shape is None:
        economics: tuple[RoleEconomics, ...] = (
            RoleEconomics("prefill", ()),
            RoleEconomics("decode", ()),
        )
    else:
        economics = role_economics(policy, cluster, declared_mix(policy.request_shape))
    currency = cluster.currency
    choices = []
    for role_economics_, preference in zip(economics, present, strict=True):
        role = role_economics_.role
        ranked_economics = role_economics_.ranked()
        ranked = [t.gpu_type for t in ranked_economics]
        # Types that do not fit the model keep their place after those that do.
        order = tuple(ranked + [t for t in preference if t not in ranked])
        by_cost = bool(order) and bool(preference) and order[0] != preference[0]
        reason = ""
        if by_cost:
            first, preferred = ranked_economics[0], role_economics_.types[0]
            reason = (
                f"{role} on {first.gpu_type} by cost: {first.mtok_per_usd:.2f} M tokens per "
                f"{currency} against {preferred.mtok_per_usd:.2f} on the preferred "
                f"{preferred.gpu_type} at the declared request shape"
            )
        weights = MappingProxyType(ranked_weights(policy.role(role).gpu_types, order))
        choices.append(GpuChoice(role, order, by_cost, reason, weights))
    return choices[0], choices[1]


_choice_cache: dict[
    tuple[int, int], tuple[ServicePolicy, ClusterSpec, tuple[GpuChoice, GpuChoice]]
] = {}


def choose_gpu_types(policy: ServicePolicy, cluster: ClusterSpec) -> tuple[GpuChoice, GpuChoice]:
    """(prefill, decode) ranking for ``policy`` in ``cluster`` (module docstring).
    Cached per (policy, cluster) object: it prices every allowed type."""
    key = (id(policy), id(cluster))
    hit = _choice_cache.get(key)
    if hit is not None and hit[0] is policy and hit[1] is cluster:
        return hit[2]
    choice = _choose(policy, cluster)
    if len(_choice_cache) > 4096:
        _choice_cache.clear()
    _choice_cache[key] = (policy, cluster, choice)
    return choice


def role_choice(policy: ServicePolicy, cluster: ClusterSpec, role: Role) -> GpuChoice:
    """``role``'s part of ``choose_gpu_types`` (cached with it)."""
    prefill, decode = choose_gpu_types(policy, cluster)
    return prefill if role == "prefill" else decode


def ranked_gpu_types(policy: ServicePolicy, cluster: ClusterSpec, role: Role) -> tuple[str, ...]:
    """``role``'s allowed types present in ``cluster``, best first."""
    return role_choice(policy, cluster, role).order


def ranked_weights(weights: Mapping[str, float], order: tuple[str, ...]) -> dict[str, float]:
    """The policy's weights moved onto the ranking: the largest weight to the first
    type, the next to the second and so on (types outside ``order`` keep theirs), so
    placement's preference cost keeps its scale and is unchanged where the ranking is
    the weights' own order."""
    values = sorted((weights[t] for t in order if t in weights), reverse=True)
    moved = dict(weights)
    moved.update(zip(order, values, strict=False))
    return moved


_perf_cache: dict[tuple[int, int], tuple[ServicePolicy, ClusterSpec, PerfContext | None]] = {}


def perf_context(policy: ServicePolicy, cluster: ClusterSpec) -> PerfContext | None:
    """Each role's first-ranked GPU type that fits the model, as the planner sizes
    with; None when a role has none. Cached per (policy, cluster) object: hashing a
    whole cluster model every cycle would cost more than the decision."""
    key = (id(policy), id(cluster))
    hit = _perf_cache.get(key)
    if hit is not None and hit[0] is policy and hit[1] is cluster:
        return hit[2]
    prefill_choice, decode_choice = choose_gpu_types(policy, cluster)
    prefill = fitting_perfs(policy, cluster, "prefill", prefill_choice.order)
    decode = fitting_perfs(policy, cluster, "decode", decode_choice.order)
    context = (
        PerfContext(prefill[0], decode[0], cluster.network.rdma_gbps)
        if prefill and decode
        else None
    )
    if len(_perf_cache) > 4096:
        _perf_cache.clear()
    _perf_cache[key] = (policy, cluster, context)
    return context


_variant_cache: dict[
    tuple[int, int, str, str], tuple[ServicePolicy, ClusterSpec, PerfContext | None]
] = {}


def perf_variant(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role, gpu_type: str
) -> PerfContext | None:
    """``perf_context`` with ``role`` on ``gpu_type`` instead (None: the type is not
    allowed, not in the cluster, or does not fit the model): the model of instances
    that run on another type than the first-ranked one. Cached like ``perf_context``,
    so the capacity cache (keyed by the context's identity) serves it across cycles."""
    key = (id(policy), id(cluster), role, gpu_type)
    hit = _variant_cache.get(key)
    if hit is not None and hit[0] is policy and hit[1] is cluster:
        return hit[2]
    base = perf_context(policy, cluster)
    fitting = fitting_perfs(policy, cluster, role, (gpu_type,))
    variant = None
    if base is not None and base.role(role).gpu_type == gpu_type:
        variant = base  # the first-ranked type itself: one context, one capacity cache entry
    elif base is not None and fitting:
        variant = (
            replace(base, prefill=fitting[0])
            if role == "prefill"
            else replace(base, decode=fitting[0])
        )
    if len(_variant_cache) > 4096:
        _variant_cache.clear()
    _variant_cache[key] = (policy, cluster, variant)
    return variant


def clear_choice_caches() -> None:
    """Forget every cached ranking and performance context."""
    _choice_cache.clear()
    _perf_cache.clear()
    _variant_cache.clear()


__all__ = [
    "COSTLIER_TOLERANCE",
    "GpuChoice",
    "RoleEconomics",
    "TypeEconomics",
    "choose_gpu_types",
    "clear_choice_caches",
    "perf_context",
    "perf_variant",
    "ranked_gpu_types",
    "ranked_weights",
    "role_choice",
    "role_economics",
]
