"""The benchmark fleet generator writes valid fleets at every size (issue #15: at
2,500 GPUs pod-7 was all H800 while its subgroup was declared ``high``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.fleetgen import MIN_NODES, large_desired_state
from reconciler.desired.checks import derive_subgroup_class


@pytest.mark.parametrize("nodes", [MIN_NODES, MIN_NODES + 1, 100, 312, 500, 1250])
def test_generated_fleet_loads_and_keeps_its_subgroup_classes(nodes: int) -> None:
    # The loader rejects a declared class the GPUs below do not give.
    state = large_desired_state(nodes=nodes, services=3)
    spec = state.clusters["large"]
    assert len(spec.nodes) == nodes
    types_per_s1: dict[str, dict[str, set[str]]] = {}
    for node in spec.nodes:
        types_per_s1.setdefault(node.s2, {}).setdefault(node.s1, set()).add(node.gpu_type)
    classes = {pod: derive_subgroup_class(s1s) for pod, s1s in types_per_s1.items()}
    assert classes == {
        **{f"pod-{i}": "low" for i in range(6)},
        "pod-6": "medium",
        "pod-7": "high",
    }
    # "high": both types under every S1 of pod-7, not only under one.
    assert all(len(types) == 2 for types in types_per_s1["pod-7"].values())


def test_too_small_a_fleet_is_refused() -> None:
    with pytest.raises(ValueError, match="at least"):
        large_desired_state(nodes=MIN_NODES - 1, services=1)
