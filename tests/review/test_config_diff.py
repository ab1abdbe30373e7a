"""The config half of a review: each change in words, with the line it is on."""

from __future__ import annotations

from pathlib import Path

from repo_edits import edit, line_of

from reconciler.desired import load_desired_state
from reconciler.review.config_diff import (
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
