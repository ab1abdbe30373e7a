"""reconciler.topology: the switch graph, subgroups and their classes, domains, regions."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from placement_fixtures import cluster, group, s1, three_class_cluster

from reconciler.desired import load_desired_state
from reconciler.state import FleetState
from reconciler.topology import build_topology, fleet_used_gpus, topology_for


@pytest.fixture(scope="module")
def prod_east(repo_root):
    return load_desired_state(repo_root).clusters["prod-east"]


def test_graph_is_a_tree_from_cluster_to_nodes(prod_east):
    topo = build_topology(prod_east)
    g = topo.graph
    assert nx.is_arborescence(g)
    kinds = nx.get_node_attributes(g, "kind")
    assert sum(1 for k in kinds.values() if k == "s2") == 4
    assert sum(1 for k in kinds.values() if k == "s1") == 13
    assert sum(1 for k in kinds.values() if k == "node") == 256
    # Every node hangs off S0 -> S1 -> S2 as declared.
    path = nx.shortest_path(g, "cluster:prod-east", "node:h20-d-001")
    assert path == ["cluster:prod-east", "s2:pod-d", "s1:mp-d1", "s0:leaf-d1-3", "node:h20-d-001"]
    assert g.nodes["node:h20-d-001"]["gpu_type"] == "h20"
    assert g.nodes["node:h20-d-001"]["gpus"] == 8


def test_gpu_slots_are_optional_vertices(prod_east):
    topo = build_topology(prod_east, gpu_slots=True)
    slots = [n for n, k in topo.graph.nodes(data="kind") if k == "gpu"]
    assert len(slots) == 256 * 8
    assert topo.graph.nodes["gpu:h800-a-001/7"]["gpu_type"] == "h800"


def test_subgroup_classes_match_the_example_fleet(prod_east):
    topo = topology_for(prod_east)
    assert {n: sg.subgroup_class for n, sg in topo.subgroups.items()} == {
        "rg-a": "low",
        "rg-b": "low",
        "rg-c": "medium",
        "rg-d": "high",
    }
    assert topo.subgroups["rg-c"].gpu_types == frozenset({"h800", "h20", "l20"})


def test_topology_is_cached_per_spec_object(prod_east):
    assert topology_for(prod_east) is topology_for(prod_east)
    assert topology_for(prod_east.model_copy()) is not topology_for(prod_east)


def test_domains_per_affinity(prod_east):
    topo = topology_for(prod_east)
    assert len(topo.domains("s1")) == 13
    assert [d.domain for d in topo.domains("s2")] == ["pod-a", "pod-b", "pod-c", "pod-d"]
    loose = topo.domains("cluster")
    assert {d.subgroup for d in loose} == {"rg-a", "rg-b", "rg-c", "rg-d"}
    assert all(d.domain == "prod-east" for d in loose)
    pod_c = next(d for d in topo.domains("s2") if d.domain == "pod-c")
    assert pod_c.subgroup_class == "medium"
    assert len(pod_c.node_indices) == 64
    assert len(topo.domain_nodes(pod_c, "l20")) == 16


def test_undeclared_switches_form_an_implicit_subgroup_per_s2():
    spec = cluster(
        {
            "p1": [s1("x1", ("l1", "n1-[1-2]", "h800")), s1("x2", ("l2", "n2-[1-2]", "h20"))],
            "p2": [s1("y1", ("l3", "n3-[1-2]", "h20"))],
        },
        subgroups={"rg-x1": ["x1"]},
    )
    topo = build_topology(spec)
    assert topo.subgroups["rg-x1"].s1_switches == ("x1",)
    assert topo.subgroups["p1"].s1_switches == ("x2",) and not topo.subgroups["p1"].declared
    assert topo.subgroups["p2"].subgroup_class == "low"
    # An S2 split over two subgroups gives one s2 domain per part.
    assert sorted(d.key for d in topo.domains("s2")) == ["s2/p1/p1", "s2/p1/rg-x1", "s2/p2/p2"]


def test_regions_are_laminar_and_nest_domains():
    topo = topology_for(three_class_cluster())
    sets = [r.s1_switches for r in topo.regions]
    for a in sets:
        for b in sets:
            assert a <= b or b <= a or not (a & b), "regions must nest or be disjoint"
    for affinity in ("s1", "s2", "cluster"):
        for domain in topo.domains(affinity):
            assert topo.regions[domain.region].s1_switches == frozenset(domain.s1_switches)
    s1_domain = next(d for d in topo.domains("s1") if d.domain == "c1")
    s2_domain = next(d for d in topo.domains("s2") if d.domain == "pod-c")
    assert s2_domain.region in topo.region_ancestors(s1_domain.region)


def test_free_gpus_per_domain_and_subgroup_from_a_fleet_state():
    spec = three_class_cluster()
    topo = topology_for(spec)
    from placement_fixtures import policy

    pol = policy("svc", prefill=(2, {"h800": 1.0}), decode=(1, {"h20": 1.0}))
    running = group(
        "svc", "g1", "pod-c", "rg-pod-c", ("h800", {"c1n-1": 3}), ("h20", {"c2n-1": 5, "c2n-2": 1})
    )
    used = fleet_used_gpus(topo, FleetState("tiny", groups=(running,)), {"svc": pol})
    assert used[topo.node_index["c1n-1"]] == 6
    assert used.sum() == 12
    by_domain = topo.free_by_domain(used, "s2")
    assert by_domain[("s2/pod-c/rg-pod-c", "h800")] == 16 - 6
    assert by_domain[("s2/pod-c/rg-pod-c", "h20")] == 16 - 6
    assert topo.free_by_subgroup(used)[("rg-pod-a", "h800")] == 32
    assert np.all(topo.free_gpus(used) >= 0)


def test_unknown_service_instances_count_as_whole_nodes():
    topo = topology_for(three_class_cluster())
    running = group(
        "gone", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 1}), ("h800", {"a1n-2": 1})
    )
    used = fleet_used_gpus(topo, FleetState("tiny", groups=(running,)), {})
    assert used[topo.node_index["a1n-1"]] == 8 and used[topo.node_index["a1n-2"]] == 8


def test_domain_of_group_resolves_known_domains_only():
    topo = topology_for(three_class_cluster())
    assert (
        topo.domain_of_group(group("s", "g", "pod-c", "rg-pod-c", ("h800", {}), ("h20", {}))).key
        == "s2/pod-c/rg-pod-c"
    )
    # A subgroup left out is inferred when the switch determines it.
    assert (
        topo.domain_of_group(group("s", "g", "c1", None, ("h800", {}), ("h20", {}))).key
        == "s1/c1/rg-pod-c"
    )
    assert (
        topo.domain_of_group(group("s", "g", "tiny", None, ("h800", {}), ("h20", {})))
        is topo.cluster_domain
    )
    assert (
        topo.domain_of_group(group("s", "g", "gone-switch", None, ("h800", {}), ("h20", {})))
        is None
    )


def test_observed_instance_size_wins_over_the_policy():
    from dataclasses import replace

    from placement_fixtures import policy

    topo = topology_for(three_class_cluster())
    running = group(
        "svc", "g1", "pod-a", "rg-pod-a", ("h800", {"a1n-1": 1}), ("h800", {"a1n-1": 1})
    )
    running = replace(running, prefill=replace(running.prefill, gpus_per_instance=4))
    pol = policy("svc", prefill=(2, {"h800": 1.0}), decode=(2, {"h800": 1.0}))
    used = fleet_used_gpus(topo, FleetState("tiny", groups=(running,)), {"svc": pol})
    assert used[topo.node_index["a1n-1"]] == 4 + 2
