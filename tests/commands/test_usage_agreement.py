"""Small agreements between commands: an unknown service is the same usage error in
simulate and tune; plan refuses what only a review's replay reads rather than ignore
it; a plan whose cluster failed never says "No changes"."""

from __future__ import annotations

from pathlib import Path

import pytest
from loopback import unreachable_kubeconfig
from typer.testing import CliRunner

from reconciler.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args", [["simulate", "--service", "nosuch"], ["tune", "nosuch"]], ids=["simulate", "tune"]
)
def test_an_unknown_service_is_a_usage_error_naming_the_known_ones(args: list[str]) -> None:
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "error: unknown service 'nosuch'" in result.output
    assert "(known: chat, summarize, svc-a, svc-b)" in result.output


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--trace", "trace.csv"], "--trace"),
        (["--rate-scale", "2"], "--rate-scale"),
        (["--warm-up-hours", "1"], "--warm-up-hours"),
        (["--diurnal-hours", "4"], "--diurnal-hours"),
        (["--plot", "day.png"], "--plot"),
    ],
)
def test_plan_without_base_refuses_what_only_the_review_replays(
    args: list[str], option: str
) -> None:
    result = runner.invoke(app, ["plan", "--simulate", *args], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert option in result.output and "add --base REV" in result.output


def test_a_review_refuses_out_rather_than_write_no_plan(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["plan", "--base", "HEAD", "--out", str(tmp_path / "plan.json")],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "a review writes no saved plan" in result.output
    assert not (tmp_path / "plan.json").exists()


def test_a_plan_whose_cluster_failed_says_so_and_not_no_changes(tmp_path: Path) -> None:
    config = unreachable_kubeconfig(tmp_path / "kubeconfig", context="prod-east")
    result = runner.invoke(app, ["plan", "--kubeconfig", str(config)], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "1 cluster(s) failed: prod-east." in result.output
    assert "No changes" not in result.output


def test_the_summary_of_clusters_that_answered_beside_a_failed_one() -> None:
    from reconciler.apply.cyclereport import summary_line
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.loop.cluster_cycle import ClusterOutcome
    from reconciler.loop.schedule import CycleResult

    def cluster(name: str, outcome: str, refused: bool = False) -> ClusterOutcome:
        objects = (ObjectDiff(f"ns/{name}-d", "svc", "g", "decode", "error", 2, 3),)
        diff = ClusterDiff(name, "server-dry-run", objects if refused else ())
        return ClusterOutcome(name, diff=diff, outcome=outcome)

    result = CycleResult([cluster("east", "error"), cluster("west", "ok")])
    assert summary_line(result) == (
        "1 cluster(s) failed: east. The 1 other cluster(s) match the desired state."
    )
    result = CycleResult([cluster("west", "ok")])
    assert summary_line(result) == "No changes: the clusters match the desired state."
    # A write refused (before or by the API server) is not "matching" either.
    result = CycleResult([cluster("east", "ok", refused=True), cluster("west", "ok")])
    assert summary_line(result) == (
        "1 object(s) refused (! error above): not as desired. "
        "The 1 other cluster(s) match the desired state."
    )
    assert result.has_errors


def test_a_cycle_whose_only_work_is_keeping_what_a_move_left_behind_does_not_say_it_matches() -> (
    None
):
    """During a make-before-break hold that is all there is, the old Deployments run
    though the desired state has them go: no change is made, but the cluster does not
    match the desired state yet."""
    from reconciler.apply.cyclereport import summary_line
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.loop.cluster_cycle import ClusterOutcome
    from reconciler.loop.schedule import CycleResult

    kept = (ObjectDiff("old/svc-d", "svc", "g", "decode", "keep", 2, 2),)
    result = CycleResult([ClusterOutcome("east", diff=ClusterDiff("east", "server-dry-run", kept))])
    assert summary_line(result) == (
        "No changes to make this cycle; 1 object(s) kept as they run until what replaces "
        "them serves (= keep above): not yet as desired."
    )
    assert not result.has_errors


def test_a_cycle_that_holds_objects_changed_outside_git_does_not_say_it_matches() -> None:
    """Someone edited a managed Deployment (a sidecar, a pause): the cycle writes
    nothing for it (drift is held, not overwritten), but the cluster is not as the
    desired state has it, and the summary says so, as ``status`` does."""
    from reconciler.apply.cyclereport import summary_line
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.loop.cluster_cycle import ClusterOutcome
    from reconciler.loop.schedule import CycleResult
    from reconciler.observe.base import Drift

    objects = (ObjectDiff("ns/svc-d", "svc", "g", "decode", "unchanged", 2, 2),)
    edited = Drift("object_modified", "ns/svc-d", "managed by kubectl-edit")
    node = Drift("node_label", "node-1", "label s2 changed")
    diff = ClusterDiff("east", "server-dry-run", objects, drift=(edited, node))
    result = CycleResult([ClusterOutcome("east", diff=diff)])
    assert summary_line(result) == (
        "No changes to make this cycle; 1 object(s) changed outside Git (drift above): "
        "not yet as desired."
    )
    # Drift of a Node alone is the cluster file's business, not an object held.
    diff = ClusterDiff("east", "server-dry-run", objects, drift=(node,))
    result = CycleResult([ClusterOutcome("east", diff=diff)])
    assert summary_line(result) == "No changes: the clusters match the desired state."
