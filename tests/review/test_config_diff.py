"""The config half of a review: each change in words, with the line it is on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from repo_edits import edit, line_of

from reconciler.desired import ClusterSpec, DesiredState, load_desired_state
from reconciler.review.config_diff import (
    MAX_AGGREGATE_LINES,
    MAX_DIFF_INPUT_LINES,
    MAX_DIFF_LINE_CHARS,
    MAX_DIFF_LINES,
    config_diff,
)


def test_no_change_reads_as_nothing(repo_root: Path, example_repo: Path) -> None:
    assert config_diff(load_desired_state(repo_root), load_desired_state(example_repo)) == []


def test_policy_fields_read_in_words_with_their_line(repo_root: Path, example_repo: Path) -> None:
    chat = example_repo / "policies/chat.yaml"
    # an override of the derived decode capacity, added
    edit(chat, "  metric: decode_tps", "  metric: decode_tps\n  target_per_instance: 1400")
    edit(chat, 'min: "1:3"', 'min: "1:4"')
    edit(chat, "tbt_ms: 50", "tbt_ms: 45")
    edit(chat, "{h20: 1.0, h800: 0.4}", "{h20: 1.0}")
    lines = [
        str(c) for c in config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    ]
    assert lines == [
        f"service chat: P/D ratio bounds: 1:3..4:1 -> 1:4..4:1 (policies/chat.yaml:{line_of(chat, 'min: ')})",
        f"service chat: decode GPU type h800 preference: 0.4 -> not allowed (policies/chat.yaml:{line_of(chat, '{h20: 1.0}')})",
        f"service chat: decode target TPS per instance: derived from the model -> 1400 (policies/chat.yaml:{line_of(chat, 'target_per_instance')})",
        f"service chat: TBT SLO (ms): 50 -> 45 (policies/chat.yaml:{line_of(chat, 'tbt_ms')})",
    ]


def diff_lines(base: Path, head: Path) -> list[str]:
    return [str(c) for c in config_diff(load_desired_state(base), load_desired_state(head))]


def test_hardware_changes_read_as_gpus_per_type_and_pod(
    repo_root: Path, example_repo: Path
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    # A fifth leaf with five more nodes: the first twenty stay on the leaves they were on.
    edit(
        cluster,
        '{name: "leaf-a3-[1-4]", nodes: "h800-a-[041-060]"}',
        '{name: "leaf-a3-[1-5]", nodes: "h800-a-[041-065]"}',
    )
    [change] = config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    assert (change.label, change.before, change.after) == ("h800 GPUs under pod-a", "480", "520")


def test_nodes_a_leaf_range_splits_anew_read_as_moves_between_leaves(
    repo_root: Path, example_repo: Path
) -> None:
    """Four leaves share 20 nodes five each, then 24 six each: nodes 046, 051-052 and
    056-058 change leaf (and the S0 label they carry) without a word of theirs changing."""
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, 'nodes: "h800-a-[041-060]"', 'nodes: "h800-a-[041-064]"')
    mp_a3 = line_of(cluster, "- name: mp-a3")
    assert diff_lines(repo_root, example_repo) == [
        f"cluster prod-east: h800 GPUs under pod-a: 480 -> 512 (clusters/prod-east.yaml:{line_of(cluster, 'name: pod-a')})",
        f"cluster prod-east: 3 nodes (24 GPUs) moved: S0 leaf-a3-4 -> S0 leaf-a3-3 (clusters/prod-east.yaml:{mp_a3 + 1})",
        f"cluster prod-east: 2 nodes (16 GPUs) moved: S0 leaf-a3-3 -> S0 leaf-a3-2 (clusters/prod-east.yaml:{mp_a3 + 1})",
        f"cluster prod-east: 1 node (8 GPUs) moved: S0 leaf-a3-2 -> S0 leaf-a3-1 (clusters/prod-east.yaml:{mp_a3 + 1})",
    ]


def test_nodes_moved_to_another_mini_pod_read_as_one_count_per_pair_of_switches(
    repo_root: Path, example_repo: Path
) -> None:
    """S1 membership is the placement domain a node is in: 18 nodes moving from mp-a1
    to mp-a2 is one line, at the switch they move to, whatever the GPU totals say."""
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(
        cluster,
        's0: [{name: "leaf-a1-[1-4]", nodes: "h800-a-[001-020]"}]',
        's0: [{name: "leaf-a1-1", nodes: "h800-a-[001-002]"}]',
    )
    edit(
        cluster,
        's0: [{name: "leaf-a2-[1-4]", nodes: "h800-a-[021-040]"}]',
        's0: [{name: "leaf-a2-[1-4]", nodes: "h800-a-[021-040]"},'
        ' {name: "leaf-a2-[5-6]", nodes: "h800-a-[003-020]"}]',
    )
    assert diff_lines(repo_root, example_repo) == [
        "cluster prod-east: 18 nodes (144 GPUs) moved: S1 mp-a1 -> S1 mp-a2 "
        f"(clusters/prod-east.yaml:{line_of(cluster, '- name: mp-a2')})"
    ]


def test_node_labels_read_as_one_count_per_label_located_where_set(
    repo_root: Path, example_repo: Path
) -> None:
    """Labels a switch's defaults give its nodes are counted over those nodes; labels
    the cluster's defaults gain are not also an empty mapping going "none -> unset"."""
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(
        cluster,
        "    defaults: {gpu_type: h20}",
        "    defaults: {gpu_type: h20, labels: {team: infra}}",
    )
    edit(cluster, "  gpus_per_node: 8", "  gpus_per_node: 8\n  labels: {zone: east-1}")
    assert diff_lines(repo_root, example_repo) == [
        f"cluster prod-east: node label zone on 256 nodes: unset -> east-1 (clusters/prod-east.yaml:{line_of(cluster, 'zone: east-1')})",
        f"cluster prod-east: node label team on 60 nodes: unset -> infra (clusters/prod-east.yaml:{line_of(cluster, 'team: infra')})",
    ]
    # And back: the labels go, located at the first node that loses each.
    base_file = repo_root / "clusters/prod-east.yaml"
    assert diff_lines(example_repo, repo_root) == [
        f"cluster prod-east: node label zone on 256 nodes: east-1 -> unset (clusters/prod-east.yaml:{line_of(base_file, 'h800-a-[001-020]')})",
        f"cluster prod-east: node label team on 60 nodes: infra -> unset (clusters/prod-east.yaml:{line_of(base_file, 'h20-b-[001-020]')})",
    ]


def test_nodes_swapped_for_others_with_the_same_gpus_are_counted(
    repo_root: Path, example_repo: Path
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, 'nodes: "h800-a-[001-020]"', 'nodes: "h800-z-[001-020]"')
    [change] = diff_lines(repo_root, example_repo)
    assert change.startswith(
        "cluster prod-east: 20 nodes added, 20 removed, 0 retyped or resized, with the GPUs "
        "per type and pod unchanged (e.g. h800-z-001, "
    )


def test_rewriting_ranges_for_the_same_machines_is_no_change(
    repo_root: Path, example_repo: Path
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(
        cluster,
        's0: [{name: "leaf-a1-[1-4]", nodes: "h800-a-[001-020]"}]',
        's0: [{name: "leaf-a1-[1-2]", nodes: "h800-a-[001-010]"}, {name: "leaf-a1-[3-4]", nodes: "h800-a-[011-020]"}]',
    )
    assert config_diff(load_desired_state(repo_root), load_desired_state(example_repo)) == []


def test_added_and_removed_services_are_named(repo_root: Path, example_repo: Path) -> None:
    (example_repo / "policies/summarize.yaml").rename(example_repo / "policies/summarise.yaml")
    edit(example_repo / "policies/summarise.yaml", "name: summarize", "name: summarise")
    lines = [
        str(c) for c in config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    ]
    assert lines == [
        "service summarise: added (policies/summarise.yaml:5)",
        "service summarize: removed (was policies/summarize.yaml:5)",
    ]


def _ring_cluster(switches: int, shift: int) -> ClusterSpec:
    """One pod of ``switches`` mini-pods, two nodes each; node pair i sits under
    mini-pod (i + shift) mod ``switches`` and carries the label ``slot: i + shift``."""
    s1 = [
        {
            "name": f"mp-{(i + shift) % switches}",
            "s0": [
                {
                    "name": f"leaf-{(i + shift) % switches}",
                    "nodes": [{"name": f"n-{i}-[1-2]", "labels": {"slot": str(i + shift)}}],
                }
            ],
        }
        for i in range(switches)
    ]
    return ClusterSpec.model_validate(
        {
            "name": "ring",
            "gpu_types": {
                "h20": {"memory_gib": 96, "bf16_tflops": 148, "memory_bandwidth_gbps": 4000}
            },
            "defaults": {"gpu_type": "h20", "gpus_per_node": 8},
            "s2": [{"name": "pod", "s1": s1}],
        }
    )


def test_node_moves_and_label_changes_stay_bounded_however_many_there_are() -> None:
    """Every node pair moves to the next mini-pod and changes its label value: one line
    per (from, to) pair and per (label, old, new) up to a limit, then one that counts
    the rest."""
    switches = MAX_AGGREGATE_LINES * 5

    def state(shift: int) -> DesiredState:
        return DesiredState(
            policies={},
            clusters={"ring": _ring_cluster(switches, shift)},
            cluster_files={"ring": "clusters/ring.yaml"},
        )

    lines = [str(c) for c in config_diff(state(0), state(1))]
    moves = [line for line in lines if " moved: S1 " in line]
    labels = [line for line in lines if ": node label slot on " in line]
    assert len(moves) == len(labels) == MAX_AGGREGATE_LINES
    assert (
        moves[0] == "cluster ring: 2 nodes (16 GPUs) moved: S1 mp-0 -> S1 mp-1 (clusters/ring.yaml)"
    )
    assert labels[0] == "cluster ring: node label slot on 2 nodes: 0 -> 1 (clusters/ring.yaml)"
    rest = switches - MAX_AGGREGATE_LINES
    assert lines[MAX_AGGREGATE_LINES] == (
        f"cluster ring: {2 * rest} nodes moved between {rest} more pairs of switches "
        "(not listed) (clusters/ring.yaml)"
    )
    assert lines[-1] == (
        f"cluster ring: {rest} more node label change(s) on {2 * rest} nodes (not listed) "
        "(clusters/ring.yaml)"
    )
    assert len(lines) == 2 * MAX_AGGREGATE_LINES + 2


# ---------------------------------------------------------------- pod templates


def test_a_template_change_names_the_template_its_users_and_a_diff(
    repo_root: Path, example_repo: Path
) -> None:
    template = example_repo / "templates/vllm-decode.yaml"
    edit(template, "image: vllm/vllm-openai:v0.11.0", "image: evil.example.com/miner:latest")
    edit(template, '"--port", "8000",', '"--port", "8000", "--trust-remote-code",')
    [change] = config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    assert str(change) == (
        "template templates/vllm-decode.yaml: content changed, used by chat (decode), "
        f"svc-a (decode), svc-b (decode) (templates/vllm-decode.yaml:{line_of(template, 'image:')})"
    )
    assert (change.kind, change.change) == ("template", "modified")
    assert change.before != change.after and change.before.startswith("sha256:")
    changed = [line for line in change.details if line[:1] in "+-"]
    assert changed == [
        '+          "--trust-remote-code",',
        '-        "image": "vllm/vllm-openai:v0.11.0",',
        '+        "image": "evil.example.com/miner:latest",',
    ]
    assert change.details[0].startswith("@@ -")


def test_a_template_reordered_or_recommented_is_no_change(
    repo_root: Path, example_repo: Path
) -> None:
    """The renderer reads the content: key order and comments change nothing it makes."""
    template = example_repo / "templates/vllm-decode.yaml"
    edit(template, "# Pod template", "# A pod template")
    edit(
        template,
        '    prometheus.io/scrape: "true"\n    prometheus.io/port: "8000"',
        '    prometheus.io/port: "8000"\n    prometheus.io/scrape: "true"',
    )
    assert config_diff(load_desired_state(repo_root), load_desired_state(example_repo)) == []


def test_a_template_a_service_switches_to_reads_as_added_with_its_content(
    repo_root: Path, example_repo: Path
) -> None:
    policy = example_repo / "policies/chat.yaml"
    edit(policy, "template: templates/vllm-decode.yaml", "template: templates/chat-decode.yaml")
    (example_repo / "templates/chat-decode.yaml").write_text(
        (example_repo / "templates/vllm-decode.yaml").read_text()
    )
    changes = config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    [added] = [c for c in changes if c.kind == "template"]
    assert str(added) == (
        "template templates/chat-decode.yaml: added, used by chat (decode) (templates/chat-decode.yaml)"
    )
    assert added.details[1:3] == ("+{", '+  "metadata": {')
    # The old template stays in use by the other services: not removed.
    assert [c.field for c in changes if c.kind == "service"] == ["decode.template"]


def test_a_template_no_service_uses_any_more_reads_as_removed(
    repo_root: Path, example_repo: Path
) -> None:
    policy = example_repo / "policies/summarize.yaml"
    edit(
        policy, "template: templates/sglang-decode.yaml", "template: templates/sglang-prefill.yaml"
    )
    [removed] = [
        c
        for c in config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
        if c.kind == "template"
    ]
    assert str(removed) == (
        "template templates/sglang-decode.yaml: removed, was used by summarize (decode) "
        "(was templates/sglang-decode.yaml)"
    )


def test_a_huge_template_change_is_shown_bounded(repo_root: Path, example_repo: Path) -> None:
    template = example_repo / "templates/vllm-decode.yaml"
    many = "".join(
        f"\n        - {{name: V{i}, value: '{'x' * 1000}'}}" for i in range(MAX_DIFF_INPUT_LINES)
    )
    edit(template, "      ports:", f"      env:{many}\n      ports:")
    [change] = config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    assert len(change.details) == MAX_DIFF_LINES
    assert all(len(line) <= MAX_DIFF_LINE_CHARS for line in change.details)
    assert change.details[-1].endswith("more line(s) of this diff not shown")


def test_the_label_changes_not_listed_count_nodes_not_node_label_pairs(repo_root: Path) -> None:
    """Thirty labels added to every node: twenty lines, then one counting the other ten
    changes on the cluster's nodes (it counted each node once per label: 51,920 "nodes"
    where 236 nodes changed, a hostile prober)."""
    base = load_desired_state(repo_root)
    east = base.clusters["prod-east"]
    added = {f"example.com/extra-{i:02d}": "yes" for i in range(30)}
    spec = east.model_dump(mode="python", by_alias=True)
    spec["defaults"]["labels"] = {**spec["defaults"]["labels"], **added}
    head = replace(base, clusters={**base.clusters, "prod-east": ClusterSpec.model_validate(spec)})
    lines = [str(c) for c in config_diff(base, head)]
    nodes = len(east.nodes)
    assert f"10 more node label change(s) on {nodes} nodes (not listed)" in lines[-1], lines[-1]
