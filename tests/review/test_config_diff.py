"""The config half of a review: each change in words, with the line it is on."""

from __future__ import annotations

from pathlib import Path

from repo_edits import edit, line_of

from reconciler.desired import load_desired_state
from reconciler.review.config_diff import config_diff


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


def test_hardware_changes_read_as_gpus_per_type_and_pod(
    repo_root: Path, example_repo: Path
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, 'nodes: "h800-a-[041-060]"', 'nodes: "h800-a-[041-064]"')
    [change] = config_diff(load_desired_state(repo_root), load_desired_state(example_repo))
    assert (change.label, change.before, change.after) == ("h800 GPUs under pod-a", "480", "512")


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
