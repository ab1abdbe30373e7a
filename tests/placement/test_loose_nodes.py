"""The greedy placer's loose-affinity node order is built once per topology and is the
order a fresh per-node computation gives (the placer used to rebuild it per call)."""

from __future__ import annotations

import numpy as np
import pytest
from placement_fixtures import three_class_cluster

from reconciler.desired import load_desired_state
from reconciler.desired.models import ClusterSpec
from reconciler.placement.greedy import loose_nodes
from reconciler.topology import Topology, topology_for


def fresh_order(topo: Topology) -> dict[str, np.ndarray]:
    """The order as the placer computed it before the cache: node by node."""
    class_of_node = np.array(
        [topo.subgroups[topo.subgroup_of_node(i)].class_rank for i in range(len(topo.nodes))],
        dtype=np.int64,
    )
    out: dict[str, np.ndarray] = {}
    for code, gpu_type in enumerate(topo.gpu_types):
        nodes = np.nonzero(topo.node_type == code)[0]
        out[gpu_type] = nodes[np.lexsort((nodes, class_of_node[nodes]))].astype(np.int64)
    return out


@pytest.fixture(scope="module")
def clusters(repo_root) -> list[ClusterSpec]:
    return [load_desired_state(repo_root).clusters["prod-east"], three_class_cluster()]


def test_the_cached_order_equals_a_fresh_one(clusters: list[ClusterSpec]) -> None:
    for spec in clusters:
        topo = topology_for(spec)
        cached = loose_nodes(topo)
        expected = fresh_order(topo)
        assert list(cached) == list(expected)
        for gpu_type, nodes in expected.items():
            assert cached[gpu_type].dtype == np.int64
            np.testing.assert_array_equal(cached[gpu_type], nodes)


def test_it_is_built_once_per_topology_and_cannot_be_changed(
    clusters: list[ClusterSpec],
) -> None:
    spec = clusters[0]
    first = loose_nodes(topology_for(spec))
    assert loose_nodes(topology_for(spec)) is first
    # Another spec object is another topology (a new revision): its own entry.
    other = loose_nodes(topology_for(spec.model_copy()))
    assert other is not first
    for nodes in first.values():
        with pytest.raises(ValueError, match="read-only"):
            nodes[0] = -1
