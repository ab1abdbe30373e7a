"""What the review says when head's decision differs in kind from base's (sized under
one, held unsized under the other: counts held where they run look unchanged), and
when the what-if replay cannot run: both in the report itself, markdown and text, not
only on stderr, and the exit code 1 for the error.

Validate refuses a model that no GPU type of a role holds, so these revisions are
built in code: the review must stay truthful about a head the planner cannot size
whatever let it through."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import reconciler.review.review as review_module
from reconciler.desired import DesiredState, load_desired_state
from reconciler.placement.greedy import GreedyPlacer
from reconciler.policy import make_autoscaler
from reconciler.review.fleet_diff import FleetReview, ServiceFleetDiff
from reconciler.review.report import MAX_LINE_CHARS, format_json, format_markdown, format_text
from reconciler.review.review import Review, ReviewOptions, run_review

NOTHING_FITS = "oracle-min: no allowed prefill GPU type of service 'chat' fits the model"


def with_chat_at(state: DesiredState, params_b: float, label: str) -> DesiredState:
    chat = state.policies["chat"]
    model = chat.model.model_copy(update={"params_b": params_b})
    policies = {**state.policies, "chat": chat.model_copy(update={"model": model})}
    return replace(state, policies=policies, source_label=label)


@pytest.fixture(scope="module")
def too_big_review(repo_root: Path) -> Review:
    """base: the example state; head: chat's model at 200 B, which no GPU type chat
    allows can hold; the review of the two as `plan --base --head` runs it."""
    base = replace(load_desired_state(repo_root), source_label="base")
    head = with_chat_at(base, 200.0, "head")
    revisions = {"base": base, "head": head}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(review_module, "load_desired_state", lambda _repo, rev: revisions[rev])
        return run_review(
            repo_root,
            "base",
            "head",
            autoscaler_factory=lambda: make_autoscaler("heteroscale"),
            placer=GreedyPlacer(),
            options=ReviewOptions(diurnal_hours=0.2),
        )


def test_a_service_head_holds_unsized_is_named_with_heads_reason(too_big_review: Review) -> None:
    assert too_big_review.fleet is not None
    [chat] = [s for s in too_big_review.fleet.services if s.decision_kind_changed]
    assert chat.service == "chat" and chat.head_reason == "metrics_missing"
    assert chat.base_reason != "metrics_missing"
    assert "no GPU type of a role fits" in chat.head_message
    text = format_text(too_big_review)
    assert "1 service(s) held unsized under one revision only" in text.splitlines()[1]
    assert f"  chat: decision {chat.base_reason} -> metrics_missing; head: no GPU type" in text
    assert "every service sized and placed the same" not in text
    markdown = format_markdown(too_big_review)
    assert "| service | decision base → head | head's reason |" in markdown
    assert "| chat | " in markdown and "metrics\\_missing | no GPU type of a role fits" in markdown
    [data] = [
        s
        for s in json.loads(format_json(too_big_review))["fleet"]["services"]
        if s["decision_kind_changed"]
    ]
    assert (data["service"], data["head_reason"]) == ("chat", "metrics_missing")


def test_a_what_if_that_cannot_run_is_in_the_report_and_exits_1(too_big_review: Review) -> None:
    assert too_big_review.what_if_error == f"what-if replay: {NOTHING_FITS}"
    assert too_big_review.exit_code == 1
    assert f"error: what-if replay: {NOTHING_FITS}" in format_text(too_big_review)
    assert f"> **Error:** what-if replay: {NOTHING_FITS}" in format_markdown(too_big_review)
    assert json.loads(format_json(too_big_review))["what_if_error"] == (
        f"what-if replay: {NOTHING_FITS}"
    )


def hostile_review(message: str) -> Review:
    row = ServiceFleetDiff(
        service="chat",
        cluster="prod-east",
        base_targets=(2, 3),
        head_targets=(2, 3),
        base_gpus={"h800": 20},
        head_gpus={"h800": 20},
        base_domains={"pod-a": 20},
        head_domains={"pod-a": 20},
        head_reason="metrics_missing",
        head_message=message,
        base_reason="scale_out",
    )
    fleet = FleetReview("simulated fleet", {}, {}, (row,))
    return Review("base", "head", fleet=fleet, what_if_error=f"what-if replay: {message}")


def test_heads_message_and_the_what_if_error_are_escaped_and_bounded() -> None:
    message = "<img src=x> | @team [link](https://e.com) `code`\n# heading " + "x" * 2000
    markdown = format_markdown(hostile_review(message))
    for raw in ("<img", "| @team", "[link](", "`code`", "\n# heading", "https://"):
        assert raw not in markdown
    longest = max(len(line) for line in markdown.splitlines())
    assert longest < 2 * MAX_LINE_CHARS  # cut, with room for the escapes
    text = format_text(hostile_review(message))
    assert "\n# heading" not in text
    assert all(len(line) <= MAX_LINE_CHARS for line in text.splitlines())


def test_a_service_sized_under_both_revisions_shows_no_decision_row() -> None:
    review = hostile_review("held")
    assert review.fleet is not None
    sized = replace(review.fleet.services[0], head_reason="scale_in", head_message="fewer")
    unchanged = replace(review, fleet=replace(review.fleet, services=(sized,)), what_if_error="")
    assert not sized.decision_kind_changed and not unchanged.has_changes
    assert "decision" not in format_text(unchanged)
    assert "every service sized and placed the same" in format_text(unchanged)
