"""``SimulatedFleet`` behind the reconciler's MetricsSource and ClusterBackend interfaces."""

from __future__ import annotations

import inspect

import pytest

from reconciler.desired import DesiredState
from reconciler.observe.base import ClusterBackend, MetricsSource
from reconciler.placement.base import PlacementRequest
from reconciler.placement.greedy import GreedyPlacer
from reconciler.plan import GroupChange, Plan, diff_groups
from reconciler.sim.default import default_simulated_fleet
from reconciler.sim.engine import LoadProfile, synthetic_profile
from reconciler.sim.fleet import SimulatedFleet
from reconciler.state import METRIC_NAMES, ROLES, FleetState, Targets


def _fleet(state: DesiredState, service: str = "svc-b", rps: float = 10.0) -> SimulatedFleet:
    profile: LoadProfile = synthetic_profile(
        "b", hours=1.0, peak_rps=rps, seed=0, trough_ratio=1.0, bursts=()
    )
    return SimulatedFleet(state.clusters, {service: state.policies[service]}, {service: profile})


def _plan_for(
    state: DesiredState, fleet: SimulatedFleet, service: str, prefill: int, decode: int
) -> Plan:
    policy = state.policies[service]
    cluster = state.clusters[policy.cluster]
    current = fleet.observe(cluster, [policy]).fleet
    result = GreedyPlacer().place(
        PlacementRequest(
            cluster=cluster,
            policies={service: policy},
            current=current,
            targets={service: Targets(service, prefill, decode)},
        )
    )
    gpus = {(service, role): policy.role(role).gpus_per_instance for role in ROLES}
    return Plan(cluster.name, {}, result, diff_groups(current, result.groups, gpus), current)


def test_it_is_a_metrics_source_and_a_cluster_backend(state: DesiredState) -> None:
    """Same method names and parameters as the protocols (mypy checks the types)."""
    fleet = _fleet(state)
    source: MetricsSource = fleet
    backend: ClusterBackend = fleet
    for protocol, implementation, names in (
        (MetricsSource, source, ("fetch",)),
        (ClusterBackend, backend, ("observe", "diff", "apply")),
    ):
        for name in names:
            wanted = list(inspect.signature(getattr(protocol, name)).parameters)[1:]
            assert list(inspect.signature(getattr(implementation, name)).parameters) == wanted, name


def test_apply_creates_instances_that_serve_after_their_startup(state: DesiredState) -> None:
    fleet = _fleet(state)
    policy = state.policies["svc-b"]
    cluster = state.clusters["prod-east"]
    plan = _plan_for(state, fleet, "svc-b", 4, 6)
    assert fleet.diff(plan) == [str(c) for c in plan.changes]
    assert fleet.apply(plan) == [str(c) for c in plan.changes]
    view = fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b")
    assert (view.prefill.starting, view.decode.starting, view.prefill.ready) == (4, 6, 0)
    fleet.advance_to(policy.prefill.startup_s - 1)
    assert fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b").prefill.starting == 4
    fleet.advance_to(policy.prefill.startup_s + 1)
    view = fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b")
    assert (view.prefill.ready, view.decode.ready, view.prefill.starting) == (4, 6, 0)
    # Nothing was served while the instances were loading, and their GPUs were held.
    counts = fleet.instance_counts("svc-b")
    assert counts["prefill_gpus"][10] == 4 and counts["decode_gpus"][10] == 6
    assert (
        fleet.sims["svc-b"].series.col("prefill_tokens")[: int(policy.prefill.startup_s) - 1].sum()
        == 0
    )
    # The observed groups are the placement's, node for node.
    observed = {
        (g.group_id, g.prefill.nodes, g.decode.nodes)
        for g in fleet.observe(cluster, [policy]).fleet.groups
    }
    assert observed == {(g.group_id, g.prefill.nodes, g.decode.nodes) for g in plan.groups}


def test_applying_the_same_plan_twice_changes_nothing(state: DesiredState) -> None:
    fleet = _fleet(state)
    plan = _plan_for(state, fleet, "svc-b", 2, 3)
    fleet.apply(plan)
    before = fleet.fleet_state("prod-east")
    fleet.apply(plan)
    assert fleet.fleet_state("prod-east") == before


def test_scale_in_cancels_starting_instances_and_drains_ready_ones(state: DesiredState) -> None:
    fleet = _fleet(state)
    cluster = state.clusters["prod-east"]
    policy = state.policies["svc-b"]
    fleet.bootstrap(_plan_for(state, fleet, "svc-b", 4, 8).groups)
    fleet.advance_to(300)
    # Scale up decode (starting), then down below the ready count.
    fleet.apply(_plan_for(state, fleet, "svc-b", 4, 10))
    assert fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b").decode.starting == 2
    fleet.apply(_plan_for(state, fleet, "svc-b", 4, 5))
    view = fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b")
    assert (view.decode.ready, view.decode.starting, view.decode.draining) == (5, 0, 3)
    # Draining instances keep their GPUs until their sequences have finished ...
    fleet.advance_to(302)
    assert fleet.instance_counts("svc-b")["decode_gpus"][-1] == 8
    # ... and are gone after the longest usual decode.
    fleet.advance_to(900)
    view = fleet.observe(cluster, [policy]).fleet.service_fleet("svc-b")
    assert view.decode.draining == 0 and view.decode.ready == 5
    assert fleet.instance_counts("svc-b")["decode_gpus"][-1] == 5


def test_fetch_returns_every_signal_from_the_last_scrape(state: DesiredState) -> None:
    fleet = _fleet(state)
    fleet.bootstrap(_plan_for(state, fleet, "svc-b", 6, 10).groups)
    metrics = fleet.fetch([state.policies["svc-b"], state.policies["chat"]], 240.0)
    assert fleet.now_s == 240.0
    svc = metrics["svc-b"]
    for name in METRIC_NAMES:
        sample = svc.get(name)
        # Stamped with the scrape they come from: 7 s past a multiple of 15 s.
        assert sample is not None and sample.at_s == 232.0, name
    assert metrics["chat"].decode_tps is None  # not simulated: missing, never invented


def test_wall_clock_time_is_anchored_at_the_first_call(state: DesiredState) -> None:
    profile = synthetic_profile("b", hours=0.5, peak_rps=5, seed=0)
    fleet = SimulatedFleet(
        state.clusters, {"svc-b": state.policies["svc-b"]}, {"svc-b": profile}, time_origin_s=None
    )
    fleet.fetch([state.policies["svc-b"]], 1_800_000_000.0)
    assert fleet.now_s == 0.0
    fleet.fetch([state.policies["svc-b"]], 1_800_000_030.0)
    assert fleet.now_s == 30.0


def test_plans_for_unknown_services_are_refused(state: DesiredState) -> None:
    fleet = _fleet(state)
    change = GroupChange("create", "nope", "g-1", "prefill", "h800", "pod-a", 0, 1, 1)
    plan = Plan(
        "prod-east",
        {},
        _plan_for(state, fleet, "svc-b", 1, 1).placement,
        (change,),
        FleetState("prod-east"),
    )
    with pytest.raises(KeyError, match="nope"):
        fleet.apply(plan)


def test_default_fleet_serves_every_service_warm(state: DesiredState) -> None:
    fleet = default_simulated_fleet(state, seed=0)
    assert set(fleet.sims) == set(state.policies)
    policies = list(state.policies.values())
    metrics = fleet.fetch(policies, 1_000_000.0)  # anchors at time 0
    metrics = fleet.fetch(policies, 1_000_600.0)
    for policy in policies:
        m = metrics[policy.name]
        assert m.decode_tps is not None and m.decode_tps.value > 0, policy.name
        assert m.ttft is not None and m.ttft.value < 10 * policy.slo.ttft_ms, policy.name
        view = fleet.observe(state.clusters[policy.cluster], policies).fleet.service_fleet(
            policy.name
        )
        assert view.prefill.ready >= policy.prefill.min_instances
        assert view.decode.ready >= policy.decode.min_instances
