"""`heteroscale plan --base --head`: the review a pull request gets, end to end on a
real Git repository with a policy change and a cluster change.

The expected reports are golden files; regenerate them after an intended change with
`HETEROSCALE_UPDATE_GOLDEN=1 python -m pytest tests/review/test_review.py` and review
the diff like any other change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from repo_edits import edit

from reconciler.cost import money
from reconciler.desired import load_desired_state
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.review.command import plan_review, render
from reconciler.review.files import NOT_READ, READ_SAME
from reconciler.review.review import Review, ReviewOptions
from reconciler.sim.engine import SimConfig
from reconciler.sim.evaluate import evaluate
from reconciler.sim.load import load_with_requests

GOLDEN = Path(__file__).parent / "golden"
OPTIONS = ReviewOptions(diurnal_hours=1.0, seed=3)
FIXED_DATE = "2026-01-01T00:00:00+00:00"


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_DATE": FIXED_DATE, "GIT_COMMITTER_DATE": FIXED_DATE}
    subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "-c",
            "user.email=review@example.com",
            "-c",
            "user.name=review",
            *args,
        ],
        check=True,
        capture_output=True,
        env=env,
    )


@pytest.fixture(scope="module")
def pr_repo(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> Path:
    """base: the example desired state; then a policy change; then a cluster change;
    then a comment-only change."""
    repo = tmp_path_factory.mktemp("pr")
    for sub in ("policies", "clusters", "templates"):
        shutil.copytree(repo_root / sub, repo / sub)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    # Tighten chat's TTFT SLO by 300 ms, whatever the example says today.
    chat = repo / "policies/chat.yaml"
    current = load_desired_state(repo).policies["chat"].slo.ttft_ms
    edit(chat, f"  ttft_ms: {current:g}", f"  ttft_ms: {current - 300:g}")
    git(repo, "commit", "-qam", "chat: a tighter TTFT SLO")
    edit(repo / "clusters/prod-east.yaml", 'nodes: "h800-a-[041-060]"', 'nodes: "h800-a-[041-064]"')
    git(repo, "commit", "-qam", "prod-east: four more H800 nodes in pod-a")
    edit(
        repo / "policies/chat.yaml",
        "# An open-domain dialogue service",
        "# An open-domain chat service",
    )
    git(repo, "commit", "-qam", "comment only")
    return repo


@pytest.fixture(scope="module")
def reviewed(pr_repo: Path) -> Review:
    review, _text, _plots = plan_review(
        pr_repo, "HEAD~3", "HEAD~1", fmt="text", placer=CpSatPlacer(), options=OPTIONS
    )
    return review


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HETEROSCALE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with HETEROSCALE_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize(
    ("fmt", "golden"), [("text", "plan.txt"), ("markdown", "plan.md"), ("json", "plan.json")]
)
def test_the_report_matches_the_golden_file(reviewed: Review, fmt: str, golden: str) -> None:
    check_golden(golden, render(reviewed, fmt))


def test_changes_exit_3_with_config_fleet_and_what_if(reviewed: Review) -> None:
    assert reviewed.exit_code == 3
    fields = [(c.kind, c.name, c.field) for c in reviewed.config_changes]
    assert ("service", "chat", "slo.ttft_ms") in fields
    assert ("cluster", "prod-east", "s2.pod-a") in fields
    assert [w.service for w in reviewed.what_if] == ["chat", "summarize", "svc-a", "svc-b"]


def test_the_cost_per_hour_of_both_plans_is_reported_at_heads_prices(reviewed: Review) -> None:
    assert reviewed.fleet is not None
    [(cluster, change)] = reviewed.fleet.cost_per_hour().items()
    assert cluster == "prod-east" and change.planned.currency == "USD"
    assert change.current.amount is not None and change.planned.amount is not None
    # No price changes in this pull request: the base plan at head's prices is what
    # the base plan itself reports.
    own = reviewed.fleet.base_plans["prod-east"].cost_per_hour()
    assert own is not None and change.current.amount == pytest.approx(own.planned.amount)
    text = render(reviewed, "text")
    assert f"cost per hour, cluster prod-east: base plan {money(change.current.amount)} -> " in text
    assert "cost_per_hour" in json.loads(render(reviewed, "json"))["fleet"]


def test_the_what_if_equals_simulate_on_the_same_inputs(reviewed: Review, pr_repo: Path) -> None:
    head = load_desired_state(pr_repo, rev="HEAD~1")
    config = SimConfig()
    load = load_with_requests(
        head, "chat", None, None, OPTIONS.diurnal_hours, OPTIONS.seed, config
    ).profile
    simulated = evaluate(head, "chat", load, ["heteroscale"], OPTIONS.seed, config=config)
    [chat] = [w for w in reviewed.what_if if w.service == "chat"]
    assert chat.head is not None
    assert chat.head.to_json() == simulated.policies["heteroscale"].to_json()


def test_an_invalid_head_blocks_the_review_with_located_errors(
    pr_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "broken"
    shutil.copytree(pr_repo, repo)
    edit(repo / "policies/svc-b.yaml", "tbt_ms: 20", "tbt_ms: -5")
    git(repo, "commit", "-qam", "break svc-b")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=CpSatPlacer(), options=OPTIONS
    )
    assert review.exit_code == 1
    assert review.fleet is None and not review.what_if
    assert "policies/svc-b.yaml:" in text and "slo.tbt_ms: must be greater than 0 (got -5)" in text


def test_a_comment_only_change_reports_no_change_and_exits_0(pr_repo: Path) -> None:
    review, text, _ = plan_review(
        pr_repo, "HEAD~1", "HEAD", fmt="json", placer=CpSatPlacer(), options=OPTIONS
    )
    data = json.loads(text)
    assert data["config_changes"] == [] and data["what_if"] == []
    assert not any(service["changed"] for service in data["fleet"]["services"])
    assert review.exit_code == data["exit_code"] == 0
    # The reconciler has changes to make after merge all the same (base plans them
    # too): the headline says so rather than that the fleet would stay as it is.
    assert review.fleet is not None and review.fleet.apply_changes > 0
    headline = render(review, "text").splitlines()[1]
    assert headline == (
        "no change from this pull request: base and head plan the same; the "
        f'{review.fleet.apply_changes} group change(s) under "apply after merge" are made '
        "with or without it; it changes 1 file(s), none of them the desired state (listed)"
    )
    assert "stay as it is" not in render(review, "markdown")
    # The file it changes is named all the same, with how it is read.
    assert data["files"]["listed"] == [
        {"path": "policies/chat.yaml", "change": "modified", "reading": READ_SAME}
    ]


def test_every_file_a_pull_request_changes_is_named_even_where_it_changes_nothing(
    pr_repo: Path, tmp_path: Path
) -> None:
    """A pull request that changes nothing heteroscale reads is still merged whole: a
    YAML file in a subdirectory of policies/ (not read), a template no service names,
    a README holding HTML, a comment asking to merge unreviewed. Each is named, its
    name escaped, in every format; it read "no change" with none of them named (a
    hostile prober)."""
    repo = tmp_path / "hidden"
    shutil.copytree(pr_repo, repo)
    edit(
        repo / "policies/chat.yaml",
        "# An open-domain chat service",
        "# An open-domain chat service. Merge without review.",
    )
    (repo / "policies/nested").mkdir()
    (repo / "policies/nested/evil.yaml").write_text("name: evil\n")
    (repo / "templates/unused.yaml").write_text("image: evil/miner\n")
    (repo / "clusters/README.md").write_text("<script>alert(1)</script>\n")
    (repo / "templates/\x1b[31mred.yaml").write_text("x: 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "nothing heteroscale reads")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="json", placer=CpSatPlacer(), options=OPTIONS
    )
    assert review.exit_code == 0 and not review.has_changes
    listed = {f["path"]: f["reading"] for f in json.loads(text)["files"]["listed"]}
    assert listed == {
        "clusters/README.md": NOT_READ,
        "policies/chat.yaml": READ_SAME,
        "policies/nested/evil.yaml": NOT_READ,
        "templates/\x1b[31mred.yaml": NOT_READ,
        "templates/unused.yaml": NOT_READ,
    }
    plain = render(review, "text")
    markdown = render(review, "markdown")
    for path in ("clusters/README.md", "policies/nested/evil.yaml", "templates/unused.yaml"):
        assert path in plain and path in markdown
    assert "files changed (5):" in plain
    assert "\x1b" not in plain and "\x1b" not in markdown  # the escape is shown, not sent
    assert "<script>" not in markdown
    assert "Files changed that do not change the desired state (5 of 5)" in markdown


def test_removing_a_policy_keeps_the_cost_of_the_groups_it_leaves_running(
    pr_repo: Path, tmp_path: Path
) -> None:
    """Without prune the removed service's groups keep running at base's size: the head
    plan's cost is known (it was "unknown" without a word of why)."""
    repo = tmp_path / "removed"
    shutil.copytree(pr_repo, repo)
    git(repo, "rm", "-q", "policies/summarize.yaml")
    git(repo, "commit", "-qm", "remove summarize")
    review, text, _ = plan_review(
        repo, "HEAD~1", "HEAD", fmt="text", placer=CpSatPlacer(), options=OPTIONS
    )
    assert review.fleet is not None
    [change] = review.fleet.cost_per_hour().values()
    assert change.planned.amount is not None
    assert change.planned.amount == pytest.approx(change.current.amount)
    assert "head plan unknown" not in text


def test_an_unknown_cost_says_why() -> None:
    from types import SimpleNamespace

    from reconciler.cost import Cost, CostChange
    from reconciler.review.report import _cost_lines

    change = CostChange(
        current=Cost(10.0, "USD"),
        planned=Cost(None, "USD", unpriced_types=("l20",), unsized=("old/decode",)),
    )
    fleet = SimpleNamespace(cost_per_hour=lambda: {"prod-east": change})
    [line] = _cost_lines(fleet)  # type: ignore[arg-type]
    assert line.endswith("; unknown: no price for l20; GPUs per instance unknown for old/decode"), (
        line
    )


def test_the_plot_has_a_row_per_revision(reviewed: Review, tmp_path: Path) -> None:
    from reconciler.review.command import write_plots

    written = write_plots(reviewed, tmp_path / "plan.png")
    assert [p.name for p in written] == [
        "plan-chat.png",
        "plan-summarize.png",
        "plan-svc-a.png",
        "plan-svc-b.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_the_command_line_exit_codes_follow_terraform(pr_repo: Path) -> None:
    from typer.testing import CliRunner

    from reconciler.cli import app

    runner = CliRunner()
    common = ["plan", "--repo", str(pr_repo), "--no-what-if", "--format", "json"]
    changed = runner.invoke(app, [*common, "--base", "HEAD~3", "--head", "HEAD~1"])
    assert changed.exit_code == 3, changed.output
    assert json.loads(changed.stdout)["config_changes"]
    unchanged = runner.invoke(app, [*common, "--base", "HEAD~1", "--head", "HEAD"])
    assert unchanged.exit_code == 0, unchanged.output
    assert runner.invoke(app, [*common, "--base", "no-such-rev"]).exit_code == 1
    assert runner.invoke(app, [*common, "--base", "HEAD~1", "--format", "yaml"]).exit_code == 2


def test_a_what_if_on_a_bad_trace_is_an_error_naming_its_line(
    pr_repo: Path, tmp_path: Path
) -> None:
    """The replay runs in a worker process; a TraceError did not survive the trip back
    (its constructor takes more than the message) and the parent died in a traceback.
    The error is in the report itself (in CI the report is all a reviewer sees)."""
    from typer.testing import CliRunner

    from reconciler.cli import app

    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,-5\n")
    args = ["plan", "--repo", str(pr_repo), "--base", "HEAD~3", "--head", "HEAD~2"]
    result = CliRunner().invoke(app, [*args, "--trace", str(bad)])
    assert result.exit_code == 1, result.output
    assert f"error: what-if replay: {bad}:2: negative output tokens" in result.stdout
    assert "Traceback" not in result.output
    markdown = CliRunner().invoke(app, [*args, "--trace", str(bad), "--format", "markdown"])
    assert markdown.exit_code == 1, markdown.output
    assert "> **Error:** what-if replay: " in markdown.stdout
    assert "config changes" in markdown.stdout.lower()  # the rest of the review is there too


def test_the_what_if_can_judge_after_a_warm_up(pr_repo: Path) -> None:
    options = ReviewOptions(diurnal_hours=0.3, warm_up_hours=0.1, seed=0)
    review, text, _ = plan_review(
        pr_repo, "HEAD~3", "HEAD~2", fmt="text", placer=CpSatPlacer(), options=options
    )
    assert "chat on synthetic diurnal load, 0.3 h, judged after a 0.1 h warm-up:" in text
    chat = next(w for w in review.what_if if w.service == "chat")
    assert chat.base is not None and len(chat.base.timeline["t_min"]) == 12  # the judged 0.2 h
    from typer.testing import CliRunner

    from reconciler.cli import app

    args = ["plan", "--repo", str(pr_repo), "--base", "HEAD~3", "--head", "HEAD~2"]
    nothing_left = CliRunner().invoke(
        app, [*args, "--diurnal-hours", "0.3", "--warm-up-hours", "1"]
    )
    assert nothing_left.exit_code == 1, nothing_left.output
    assert "leaves nothing of this 1080 s load to judge" in nothing_left.output


def test_files_that_cannot_be_listed_make_the_review_incomplete() -> None:
    """Git failing to list the changed files is said, and the review exits 1: they may
    be the ones a reviewer must see."""
    from reconciler.review.files import ChangedFiles

    review = Review("base", "head", files=ChangedFiles(error="git diff-tree failed: bad object"))
    assert review.incomplete and review.exit_code == 1
    text = render(review, "text")
    assert "incomplete: the files the change touches could not be listed" in text
    assert "files changed: not listed: git diff-tree failed: bad object" in text
    assert json.loads(render(review, "json"))["files"]["error"].startswith("git diff-tree failed")
    assert "Files changed not listed" in render(review, "markdown")
