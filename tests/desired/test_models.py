"""ServicePolicy / ClusterSpec: what a valid file means once loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.desired import load_desired_state
from reconciler.desired.checks import derive_subgroup_class
from reconciler.desired.names import expand_range
from reconciler.desired.ratio import format_ratio, parse_ratio


def test_the_example_desired_state_is_valid_and_complete(repo_root: Path) -> None:
    state = load_desired_state(repo_root)
    assert set(state.policies) >= {"svc-a", "svc-b", "chat"}
    cluster = state.clusters["prod-east"]
    assert len(cluster.nodes) == 256
    assert {n.gpu_type for n in cluster.nodes} == {"h800", "h20", "l20"}
    assert sum(n.gpus for n in cluster.nodes) == 2048


def test_the_example_fleet_has_subgroups_of_all_three_classes(repo_root: Path) -> None:
    cluster = load_desired_state(repo_root).clusters["prod-east"]
    assert {sg.declared_class for sg in cluster.rdma_subgroups} == {"low", "medium", "high"}


def test_paper_services_carry_the_papers_slos(repo_root: Path) -> None:
    policies = load_desired_state(repo_root).policies
    assert (policies["svc-a"].slo.ttft_ms, policies["svc-a"].slo.tbt_ms) == (1000, 40)
    assert (policies["svc-b"].slo.ttft_ms, policies["svc-b"].slo.tbt_ms) == (1000, 20)


def test_nodes_inherit_the_closest_switch_default(repo_root: Path) -> None:
    cluster = load_desired_state(repo_root).clusters["prod-east"]
    node = cluster.node_by_name["h20-d-001"]
    assert (node.s2, node.s1, node.gpu_type, node.gpus) == ("pod-d", "mp-d1", "h20", 8)


def test_a_node_range_is_split_in_equal_blocks_over_an_s0_range(repo_root: Path) -> None:
    cluster = load_desired_state(repo_root).clusters["prod-east"]
    leaves = [cluster.node_by_name[f"h800-a-{i:03d}"].s0 for i in (1, 5, 6, 20)]
    assert leaves == ["leaf-a1-1", "leaf-a1-1", "leaf-a1-2", "leaf-a1-4"]


@pytest.mark.parametrize(
    ("written", "prefill_per_decode"),
    [("1:3", 1 / 3), ("3:1", 3.0), ("2:5", 0.4), (0.5, 0.5), ("0.25", 0.25), (" 1 : 4 ", 0.25)],
)
def test_pd_ratios_read_the_way_people_write_them(
    written: object, prefill_per_decode: float
) -> None:
    assert parse_ratio(written) == pytest.approx(prefill_per_decode)


@pytest.mark.parametrize("bad", ["1:0", "0:3", "-1", "one to three", True, None, float("inf")])
def test_nonsense_ratios_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_ratio(bad)


@given(st.integers(1, 20), st.integers(1, 20))
def test_ratio_formatting_round_trips(prefill: int, decode: int) -> None:
    assert parse_ratio(format_ratio(prefill / decode)) == pytest.approx(prefill / decode, rel=1e-3)


def test_name_ranges_keep_zero_padding_and_lists() -> None:
    assert expand_range("h20-[0001-0003]") == ("h20-0001", "h20-0002", "h20-0003")
    assert expand_range("leaf-[1-2,7]x") == ("leaf-1x", "leaf-2x", "leaf-7x")
    assert expand_range("plain") == ("plain",)


@pytest.mark.parametrize("bad", ["n-[3-1]", "n-[a-b]", "n-[1-2", "n-[1-2]-[3-4]"])
def test_malformed_ranges_are_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_range(bad)


@pytest.mark.parametrize(
    ("types_per_s1", "expected"),
    [
        ({"a": {"h20"}, "b": {"h20"}}, "low"),
        ({"a": {"h800"}, "b": {"h20"}}, "medium"),
        ({"a": {"h800", "h20"}, "b": {"h20"}}, "high"),
    ],
)
def test_subgroup_class_follows_the_gpu_types_below(
    types_per_s1: dict[str, set[str]], expected: str
) -> None:
    assert derive_subgroup_class(types_per_s1) == expected
