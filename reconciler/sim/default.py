"""The embedded default fleet: every service of ``policies/`` on its cluster from
``clusters/``, driven by a synthetic diurnal load, with no cluster and no Prometheus.

Each service gets a 24-hour synthetic day (``reconciler.sim.workload.synthetic_workload``
with the length shape its name suggests: ``svc-a`` -> the paper's service A,
``svc-b`` -> B, ``summarize``, else conversation), repeated forever. Its peak is sized
to the fleet: ``peak_share`` (default 40 %) of what the service's ``max_instances`` of
its binding role could serve at the SLO capacity of its preferred GPU type, so the
day exercises scale-out and scale-in well inside every limit. The fleet starts warm
(the counts the first minutes need, placed by the greedy placer and serving at once).
"""

from __future__ import annotations

import math

from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ServicePolicy
from reconciler.placement.base import PlacementRequest, Placer
from reconciler.sim.engine import LoadProfile, SimConfig, synthetic_profile
from reconciler.sim.evaluate import default_placer, role_capacity
from reconciler.sim.fleet import SimulatedFleet
from reconciler.sim.workload import shape_for_service
from reconciler.state import FleetState, Targets

DAY_HOURS = 24.0


def synthetic_load_for(
    state: DesiredState,
    policy: ServicePolicy,
    *,
    hours: float,
    seed: int = 0,
    peak_share: float = 0.4,
    config: SimConfig | None = None,
    cyclic: bool = False,
    sample_until_s: float | None = None,
) -> LoadProfile:
    """A synthetic diurnal day for one service, its peak sized to the fleet (module
    docstring); ``sample_until_s`` as for ``synthetic_profile``."""
    config = config or SimConfig()
    shape = shape_for_service(policy.name)
    # Capacity depends on the lengths: size from a short probe with the same shape.
    probe = synthetic_profile(
        shape, hours=0.1, peak_rps=50.0, seed=seed, trough_ratio=1.0, bursts=()
    )
    capacity = role_capacity(state, policy, probe)
    rps_prefill = policy.prefill.max_instances * capacity.prefill_tps / probe.prompt_mean
    rps_decode = policy.decode.max_instances * capacity.decode_tps / probe.output_mean
    peak_rps = max(0.1, peak_share * min(rps_prefill, rps_decode))
    return synthetic_profile(
        shape,
        hours=hours,
        peak_rps=round(peak_rps, 1),
        seed=seed,
        length_classes=config.length_classes,
        cyclic=cyclic,
        sample_until_s=sample_until_s,
    )


def default_simulated_fleet(
    state: DesiredState,
    seed: int = 0,
    *,
    peak_share: float = 0.4,
    hours: float = DAY_HOURS,
    config: SimConfig | None = None,
    placer: Placer | None = None,
    time_origin_s: float | None = None,
    sample_until_s: float | None = None,
) -> SimulatedFleet:
    """A warm simulated fleet serving every service of ``state`` (module docstring).

    ``time_origin_s=None`` anchors simulation time at the first ``fetch``, so the
    reconcile loop can pass wall-clock seconds. ``sample_until_s``: per-request
    outcomes (latency, length histograms) only before it, for a caller that simulates
    no further (``synthetic_profile``)."""
    config = config or SimConfig()
    placer = placer or default_placer()
    loads: dict[str, LoadProfile] = {}
    for index, (name, policy) in enumerate(sorted(state.policies.items())):
        if policy.cluster not in state.clusters:
            continue
        loads[name] = synthetic_load_for(
            state,
            policy,
            hours=hours,
            seed=seed + index,
            peak_share=peak_share,
            config=config,
            cyclic=True,
            sample_until_s=sample_until_s,
        )
    fleet = SimulatedFleet(
        state.clusters, dict(state.policies), loads, config, time_origin_s=time_origin_s
    )
    for cluster_name, cluster in state.clusters.items():
        policies = {p.name: p for p in state.policies_for(cluster_name) if p.name in loads}
        if not policies:
            continue
        targets = {}
        for name, policy in policies.items():
            profile = loads[name]
            capacity = role_capacity(state, policy, profile)
            _t, prefill_tps, decode_tps = profile.demand_series(60)
            counts = []
            for role, demand, per_instance in (
                ("prefill", prefill_tps, capacity.prefill_tps),
                ("decode", decode_tps, capacity.decode_tps),
            ):
                bounds = policy.role(role)
                need = math.ceil(float(demand[:5].max()) / per_instance)
                counts.append(min(max(need, bounds.min_instances, 1), bounds.max_instances))
            targets[name] = Targets(name, counts[0], counts[1])
        result = placer.place(
            PlacementRequest(
                cluster=cluster,
                policies=policies,
                current=FleetState(cluster_name),
                targets=targets,
            )
        )
        fleet.bootstrap(result.groups)
        for shortfall in result.shortfalls:
            fleet.notes.append(
                f"initial placement: {shortfall.service}/{shortfall.role} short by {shortfall.instances} "
                f"({shortfall.constraint}: {shortfall.detail})"
            )
    return fleet
