"""The performance model of a service's instances, and their capacity at its SLO.

The pieces the planner sizes with and the GPU-type choice prices with
(``gpu_economics``): one derivation, so the capacity that ranks the types is the one
the planner sizes the chosen type with. Pure; the caches keep a decision cheap at
1,000 services (``clear_caches`` forgets them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from reconciler.desired.models import ClusterSpec, GpuType, ModelSpec, RequestShape, ServicePolicy
from reconciler.perfmodel.instance import InstancePerf, instance_perf
from reconciler.perfmodel.memory import role_memories
from reconciler.policy.capacity import (
    ENGINE_LENGTH_BOUNDS,
    LatencyCorrection,
    RequestMix,
    RoleCapacities,
    cached_on,
    clear_layouts,
    role_capacities,
)
from reconciler.state import Role

# Mixes whose bucket shares differ by less than this share one cached capacity.
_MIX_SHARE_STEP = 0.005
# The correction's factors are used in steps of this: since the busy fraction and the
# mean gap are read exactly, a factor moves a little with every reading, and computed
# at every value it missed the cache nearly every cycle (decide 2.8x slower for 1,000
# services). A step moves a capacity by at most ~1 %, half of it on average, below the
# model's 3-4 % fit error; the capacity is computed at the rounded factor, so it
# depends on it alone.
_FACTOR_STEP = 0.01
# The TTFT offset likewise, in seconds: a step moves the TTFT budget by at most half a
# millisecond, well inside any TTFT histogram's bucket.
_OFFSET_STEP_S = 0.001
_CACHE_SIZE = 8192


@dataclass(frozen=True)
class PerfContext:
    """The performance model of one service's instances in its cluster."""

    prefill: InstancePerf
    decode: InstancePerf
    link_gbps: float  # KV transfer inside one RDMA subgroup (a group's link)

    def role(self, role: Role) -> InstancePerf:
        return self.prefill if role == "prefill" else self.decode


def fitting_perfs(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role, order: Sequence[str] | None = None
) -> list[InstancePerf]:
    """The performance model of each GPU type ``role`` allows that exists in the
    cluster and fits the model, in ``order`` (default: the policy's preference order).
    Empty: no GPU type of the role fits, and the planner holds the service; validate
    refuses such a policy on the same judgement (``memory.role_memories``)."""
    return [
        shared_instance_perf(
            policy.model, memory.gpu_type, cluster.gpu_types[memory.gpu_type], memory.gpus
        )
        for memory in role_memories(policy, cluster, role, order)
        if memory.fits
    ]


@lru_cache(maxsize=1024)
def shared_instance_perf(
    model: ModelSpec, gpu_type: str, gpu: GpuType, gpus_per_instance: int
) -> InstancePerf:
    """``instance_perf``, one object per (model, GPU type, instance size): capacities
    are cached per performance model object, so every service of one model on one type
    shares them (a fleet's first cycle derived them again for each service)."""
    return instance_perf(model, gpu_type, gpu, gpus_per_instance)


@lru_cache(maxsize=256)
def declared_mix(shape: RequestShape) -> RequestMix:
    """A policy's declared typical request as a mix (every request at the declared
    means, binned as the engines bin lengths): the planner's last fallback."""
    return RequestMix.from_samples(
        [float(shape.prompt_tokens)], [float(shape.output_tokens)], ENGINE_LENGTH_BOUNDS
    )


def _mix_key(mix: RequestMix) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mix as bucket shares rounded to ``_MIX_SHARE_STEP``: mixes that differ by
    less share one cached capacity (far below what moves an instance count)."""

    def shares(counts: tuple[float, ...]) -> tuple[float, ...]:
        total = sum(counts) or 1.0
        # An empty bucket's share is 0.0 as computed (``round(+-0.0) * step``), without
        # the two divisions and the rounding (half the engines' buckets are empty).
        return tuple(
            [round(c / total / _MIX_SHARE_STEP) * _MIX_SHARE_STEP if c else 0.0 for c in counts]
        )

    return (
        mix.prompt.bounds + shares(mix.prompt.counts),
        mix.output.bounds + shares(mix.output.counts),
    )


# Each entry holds its PerfContext: while it does, the context's id in the key cannot
# be reused by another context (``gpu_economics.perf_context``'s cache may drop contexts).
_capacity_cache: OrderedDict[tuple[object, ...], tuple[PerfContext, RoleCapacities]] = OrderedDict()


def capacities_for(
    policy: ServicePolicy,
    perf: PerfContext,
    mix: RequestMix,
    instances_hint: int,
    correction: LatencyCorrection,
) -> RoleCapacities:
    """``capacity.role_capacities`` for the policy's SLO, cached per quantised mix,
    instance count and correction (a decision must stay cheap at 1,000 services)."""
    key = (
        policy.slo.ttft_ms,
        policy.slo.tbt_ms,
        policy.slo.quantile,
        policy.slo.attainment_goal,
        id(perf),
        cached_on(mix, "capacity key", lambda: _mix_key(mix)),
        instances_hint,
        prefill_steps := round(correction.prefill / _FACTOR_STEP),
        decode_steps := round(correction.decode / _FACTOR_STEP),
        offset_steps := round(correction.prefill_ttft_offset_s / _OFFSET_STEP_S),
    )
    cached = _capacity_cache.get(key)
    if cached is not None:
        _capacity_cache.move_to_end(key)
        return cached[1]
    stepped = LatencyCorrection(
        prefill=prefill_steps * _FACTOR_STEP,
        decode=decode_steps * _FACTOR_STEP,
        prefill_ttft_offset_s=offset_steps * _OFFSET_STEP_S,
    )

    def derive() -> tuple[InstancePerf, InstancePerf, RoleCapacities]:
        return (
            perf.prefill,
            perf.decode,
            role_capacities(
                perf.prefill,
                perf.decode,
                mix,
                ttft_slo_s=policy.slo.ttft_ms / 1000.0,
                tbt_slo_s=policy.slo.tbt_ms / 1000.0,
                quantile=policy.slo.quantile,
                link_gbps=perf.link_gbps,
                prefill_instances_hint=max(1, instances_hint),
                correction=stepped,
                # Each request is judged on its own TTFT, and the goal is the share that
                # meets it: prefill sizes for that share, not for the SLO quantile the
                # TTFT histogram reports (which the latency correction compares against).
                ttft_share=policy.slo.attainment_goal,
            ),
        )

    # The derivation is a pure function of these inputs, kept with the mix (the
    # instance models ride along, so their ids stay their own): a context made afresh
    # for the same instances misses the cache above, whose key holds the context's
    # identity, and the GPU-type ranking makes one per service and type (priced at the
    # policy's declared mix, one object per request shape): 3,000 derivations, two
    # thirds of a cold cycle for 1,000 services, where a dozen differ. The cache above
    # is filled as before, entry for entry, so what it keeps and evicts is unchanged.
    inputs = (
        "role capacities",
        id(perf.prefill),
        id(perf.decode),
        perf.link_gbps,
        *key[:4],
        max(1, instances_hint),
        prefill_steps,
        decode_steps,
        offset_steps,
    )
    result = cached_on(mix, inputs, derive)[2]
    _capacity_cache[key] = (perf, result)
    if len(_capacity_cache) > _CACHE_SIZE:
        _capacity_cache.popitem(last=False)
    return result


def clear_capacity_caches() -> None:
    """Forget every cached capacity, performance model and mix layout."""
    _capacity_cache.clear()
    shared_instance_perf.cache_clear()
    clear_layouts()


__all__ = [
    "PerfContext",
    "capacities_for",
    "clear_capacity_caches",
    "declared_mix",
    "fitting_perfs",
]
