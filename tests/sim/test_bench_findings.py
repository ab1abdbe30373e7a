"""``benchmarks/bench_findings.py`` on a short, light chat day: both findings come out
with the keys the issue names, positive, and consistent with the models they come from
(the homogeneous fleet is priced at its own GPU type, the link figures at the cluster's
link speeds, the topology-unaware placer places every instance on a node with room)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchkit import load_benchmark

from reconciler.desired import DesiredState
from reconciler.sim.engine import LoadProfile, SimConfig, synthetic_profile
from reconciler.state import FleetState, Targets
from reconciler.topology import topology_for


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("bench_findings")


@pytest.fixture(scope="module")
def small_day() -> LoadProfile:
    """Fifteen minutes of chat at a rate a handful of instances serve."""
    return synthetic_profile(
        "chat", hours=0.25, peak_rps=30.0, seed=3, trough_ratio=0.5, bursts=(), sample_limit=20_000
    )


@pytest.fixture(scope="module")
def document(bench: ModuleType, state: DesiredState, small_day: LoadProfile) -> dict[str, Any]:
    return bench.findings(
        state, small_day, seed=3, config=SimConfig(), static_placer="greedy", static_hours=0.25
    )


def _priced(figures: dict[str, Any], prices: dict[str, float]) -> float:
    return sum(hours * prices[t] for t, hours in figures["gpu_hours_by_type"].items())


def test_heterogeneity_is_priced_from_each_fleets_own_types(
    document: dict[str, Any], state: DesiredState
) -> None:
    h = document["heterogeneity"]
    het, hom = h["heterogeneous_usd_per_mtok"], h["homogeneous_usd_per_mtok"]
    assert het > 0 and hom > 0
    assert h["homogeneous_over_heterogeneous"] == pytest.approx(hom / het)
    cluster = state.clusters[state.policies["chat"].cluster]
    prices = {
        name: gpu.cost_per_hour
        for name, gpu in cluster.gpu_types.items()
        if gpu.cost_per_hour is not None
    }
    assert set(prices) == set(cluster.gpu_types)  # the example fleet prices every type
    prefill_type = state.policies["chat"].prefill.preferred_gpu_types()[0]
    for name, usd_per_mtok in (("heterogeneous", het), ("homogeneous", hom)):
        figures = h[name]
        assert figures["gpu_hours"] > 0
        assert 0 < figures["slo_attainment"] <= 1
        assert figures["cost_usd"] == pytest.approx(_priced(figures, prices), rel=1e-9)
        assert usd_per_mtok == pytest.approx(
            figures["cost_usd"] / figures["output_tokens_within_slo"] * 1e6, rel=1e-9
        )
    # The homogeneous fleet runs on the prefill type alone, the other on both types.
    assert set(h["homogeneous"]["gpu_hours_by_type"]) == {prefill_type}
    assert h["gpu_types"]["homogeneous"] == {"prefill": prefill_type, "decode": prefill_type}
    assert len(h["heterogeneous"]["gpu_hours_by_type"]) == 2
    # Capacity per dollar is tokens/s over the instance's price.
    decode = h["capacity_per_usd"]["chat"]["decode"]
    for gpu_type, cell in decode.items():
        usd = prices[gpu_type] * state.policies["chat"].decode.gpus_per_instance
        assert cell["mtok_per_usd"] == pytest.approx(
            cell["tokens_per_s_per_instance"] * 3.6e-3 / usd
        )
    even = h["decode_break_even_usd_per_gpu_hour"]
    h20, h800 = decode[even["gpu_type"]], decode[prefill_type]
    assert even["break_even"] == pytest.approx(
        prices[prefill_type] * h20["tokens_per_s_per_instance"] / h800["tokens_per_s_per_instance"]
    )


def test_topology_unaware_placement_loses_kv_bandwidth(
    document: dict[str, Any], state: DesiredState
) -> None:
    k = document["kv_topology"]
    network = state.clusters["prod-east"].network
    aware, unaware = k["topology_aware_kv_gbps"], k["topology_unaware_kv_gbps"]
    assert 0 < unaware < aware <= network.rdma_gbps
    assert k["bandwidth_loss"] == pytest.approx(1 - unaware / aware)
    runs = list(k["runs"].values())
    # s2 affinity keeps every pair of the aware placement inside one RDMA subgroup.
    assert runs[0]["rdma_share"] == pytest.approx(1.0)
    assert runs[0]["kv_gbps_unloaded"] == pytest.approx(network.rdma_gbps)
    assert runs[1]["rdma_share"] < 1.0
    for run in runs:
        # Link load only slows a transfer down, and the unloaded mix is a harmonic mean.
        assert run["kv_gbps"] <= run["kv_gbps_unloaded"] + 1e-9
        share = run["rdma_share"]
        bare = 1 / (share / network.rdma_gbps + (1 - share) / network.cross_subgroup_gbps)
        assert run["kv_gbps_unloaded"] == pytest.approx(bare, rel=1e-6)
        assert run["ttft_p90_ms"] > 0
    assert k["idle_ttft_ms_mean_prompt_difference"] > 0
    static = list(k["static_placement"].values())
    assert static[0]["services"]["chat"]["rdma_pair_share"] == pytest.approx(1.0)
    assert static[1]["services"]["chat"]["rdma_pair_share"] < 1.0


def test_report_plots_and_json(bench: ModuleType, document: dict[str, Any], tmp_path: Path) -> None:
    text = bench.report(document)
    h, k = document["heterogeneity"], document["kv_topology"]
    assert f"{h['heterogeneous_usd_per_mtok']:.3f}" in text
    assert f"{h['homogeneous_usd_per_mtok']:.3f}" in text
    assert f"{k['topology_aware_kv_gbps']:.1f}" in text
    assert f"{k['topology_unaware_kv_gbps']:.1f}" in text
    paths = bench.plot(document, tmp_path)
    assert [p.name for p in paths] == list(bench.PLOTS)
    assert all(p.stat().st_size > 10_000 for p in paths)
    parsed = json.loads(json.dumps(bench._jsonable(document)))
    assert parsed["heterogeneity"]["homogeneous_usd_per_mtok"] > 0


def test_unaware_placer_fills_nodes_of_allowed_types_and_scales_in(
    bench: ModuleType, state: DesiredState
) -> None:
    cluster = state.clusters["prod-east"]
    topology = topology_for(cluster)
    policies = {p.name: p for p in state.policies_for("prod-east")}
    targets = {"chat": Targets("chat", 20, 30), "svc-a": Targets("svc-a", 40, 60)}
    placer = bench.TopologyUnawarePlacer(seed=1)
    request = bench.PlacementRequest(
        cluster=cluster,
        policies={n: policies[n] for n in targets},
        current=FleetState("prod-east"),
        targets=targets,
    )
    result = placer.place(request)
    assert not result.shortfalls
    used = {node.name: 0 for node in cluster.nodes}
    subgroups = set()
    for service, target in targets.items():
        assert result.placed(service, "prefill") == target.prefill
        assert result.placed(service, "decode") == target.decode
    for group in result.groups:
        policy = policies[group.service]
        for role in ("prefill", "decode"):
            part = group.role(role)
            assert part.gpu_type in policy.role(role).gpu_types
            for placed in part.nodes:
                node = cluster.node_by_name[placed.node]
                assert node.gpu_type == part.gpu_type
                used[placed.node] += placed.instances * policy.role(role).gpus_per_instance
                subgroups.add(topology.subgroup_of_node(topology.node_index[placed.node]))
    assert all(used[node.name] <= node.gpus for node in cluster.nodes)
    assert len(subgroups) > 1  # spread over the switch tree, not held in one domain
    current = FleetState("prod-east", groups=result.groups)
    smaller = {"chat": Targets("chat", 10, 30), "svc-a": Targets("svc-a", 40, 60)}
    shrunk = placer.place(
        bench.PlacementRequest(
            cluster=cluster, policies=request.policies, current=current, targets=smaller
        )
    )
    assert shrunk.placed("chat", "prefill") == 10
    before = {(g.group_id, n.node) for g in result.groups for n in g.decode.nodes}
    after = {(g.group_id, n.node) for g in shrunk.groups for n in g.decode.nodes}
    assert after == before  # running instances never move


def test_homogeneous_cluster_has_one_type(bench: ModuleType, state: DesiredState) -> None:
    homogeneous = bench.homogeneous_state(state)
    cluster = homogeneous.clusters["prod-east"]
    assert {node.gpu_type for node in cluster.nodes} == {"h800"}
    assert len(cluster.nodes) == len(state.clusters["prod-east"].nodes)
    assert {s.subgroup_class for s in topology_for(cluster).subgroups.values()} == {"low"}
    assert homogeneous.policies["chat"].decode.gpu_types == {"h800": 1.0}
    # The repository's state is untouched.
    assert "h20" in state.policies["chat"].decode.gpu_types
