"""``heteroscale tune``: the P/D split stress test, its recommendation and the
comment-preserving write-back (reconciler.review.tune, reconciler.commands.tune)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from reconciler.cli import app
from reconciler.desired.loader import DesiredState, load_desired_state
from reconciler.desired.ratio import format_ratio, parse_ratio
from reconciler.review.tune import (
    CAPACITY_CHECK_TOLERANCE,
    QUICK_SETTINGS,
    CapacityCheck,
    Probe,
    Sweep,
    ValueChange,
    apply_changes,
    check_capacity,
    flat_workload,
    length_pool,
    recommend,
    refresh_comments,
    round_target,
    split_candidates,
    sweep_splits,
)
from reconciler.sim.hand_targets import HAND_TARGETS, with_hand_targets

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_FILES = sorted((REPO_ROOT / "policies").glob("*.yaml"))
METRIC_LINE = "  metric: decode_tps\n"


def with_hand_target_lines(text: str, service: str, *, prefill: bool = True) -> str:
    """A policy file's text with the paper policy's hand-set targets
    (``reconciler.sim.hand_targets``) as lines after ``metric:``, each with an
    end-of-line comment (the example files set none: the planner derives capacity)."""
    decode_tps, prefill_tps = HAND_TARGETS[service]
    lines = f"  target_per_instance: {decode_tps:g}   # decode, by hand\n"
    if prefill:
        lines += f"  prefill_target_per_instance: {prefill_tps:g}   # prefill floor, by hand\n"
    assert text.count(METRIC_LINE) == 1
    return text.replace(METRIC_LINE, METRIC_LINE + lines)


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO_ROOT)


@pytest.fixture(scope="module")
def chat_sweep(state: DesiredState) -> Sweep:
    """The --quick sweep of the example chat service (the same the CLI runs)."""
    pool = length_pool(state.policies["chat"], None, seed=0)
    return sweep_splits(state, "chat", pool, QUICK_SETTINGS)


# --------------------------------------------------------------------------- the sweep


def test_throughput_under_slo_is_a_bell_over_the_pd_ratio(chat_sweep: Sweep) -> None:
    assert chat_sweep.has_interior_peak
    best = chat_sweep.best_index
    peak = chat_sweep.best.throughput_tps
    assert chat_sweep.splits[0].throughput_tps < 0.75 * peak
    assert chat_sweep.splits[-1].throughput_tps < 0.75 * peak
    # Left of the peak prefill is short (TTFT breaks first), right of it decode (TBT).
    goal = chat_sweep.attainment_goal
    assert all("TTFT" in s.limited_by(goal) for s in chat_sweep.splits[:best])
    assert all("TBT" in s.limited_by(goal) for s in chat_sweep.splits[best + 1 :])


def test_every_split_spends_the_budget_and_meets_the_slo_at_its_max_rate(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    policy = state.policies["chat"]
    goal = chat_sweep.attainment_goal
    assert chat_sweep.budget_gpus == 64  # 16 TP4 instances
    ratios = [s.ratio for s in chat_sweep.splits]
    assert ratios == sorted(ratios)
    for split in chat_sweep.splits:
        assert split.gpus == split.prefill * 4 + split.decode * 4 == 64
        assert split.best is not None and split.first_failing is not None
        assert split.best.meets(goal)
        assert not split.first_failing.meets(goal)
        assert split.first_failing.rate_rps > split.best.rate_rps
        # Bisected to the tolerance.
        assert split.first_failing.rate_rps <= split.best.rate_rps * (
            1 + QUICK_SETTINGS.rate_tolerance
        )
        # Served output matches the offered output at the SLO-limited rate (few %).
        offered = split.max_rate_rps * policy_output_mean(state)
        assert split.throughput_tps == pytest.approx(offered, rel=0.08)
    assert policy.slo.attainment_goal == goal


def policy_output_mean(state: DesiredState) -> float:
    return float(length_pool(state.policies["chat"], None, seed=0).output_tokens.mean())


@settings(max_examples=60, deadline=None)
@given(
    gp=st.sampled_from([1, 2, 4, 8]),
    gd=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(min_value=2, max_value=256),
)
def test_split_candidates_use_whole_instances_inside_the_ratio_range(
    state: DesiredState, gp: int, gd: int, budget: int
) -> None:
    base = state.policies["chat"]
    policy = base.model_copy(
        update={
            "prefill": base.prefill.model_copy(update={"gpus_per_instance": gp}),
            "decode": base.decode.model_copy(update={"gpus_per_instance": gd}),
        }
    )
    candidates = split_candidates(policy, budget, 1 / 6, 6.0)
    assert [p for p, _ in candidates] == sorted({p for p, _ in candidates})
    for prefill, decode in candidates:
        used = prefill * gp + decode * gd
        assert used <= budget
        assert budget - used < gd
        assert 1 / 6 - 1e-9 <= prefill / decode <= 6 + 1e-9
        assert base.prefill.min_instances <= prefill <= base.prefill.max_instances
        assert base.decode.min_instances <= decode <= base.decode.max_instances


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(min_value=0.5, max_value=80.0), factor=st.floats(min_value=1.1, max_value=4))
def test_flat_load_replays_the_same_stream_at_every_rate(
    state: DesiredState, rate: float, factor: float
) -> None:
    pool = length_pool(state.policies["chat"], None, seed=0)
    low = flat_workload(pool, rate, 300, seed=3)
    high = flat_workload(pool, rate * factor, 300, seed=3)
    n = low.requests
    assert high.requests >= n
    # Same unit-rate arrivals (times x rate) and the same lengths in the same order.
    np.testing.assert_allclose(low.arrival_s * rate, high.arrival_s[:n] * rate * factor)
    np.testing.assert_array_equal(low.prompt_tokens, high.prompt_tokens[:n])
    np.testing.assert_array_equal(low.output_tokens, high.output_tokens[:n])
    assert low.arrival_s.max() < 300
    assert abs(n - rate * 300) < 6 * np.sqrt(rate * 300) + 2


# --------------------------------------------------------------------------- recommend


def test_recommendation_lies_inside_the_bounds(chat_sweep: Sweep, state: DesiredState) -> None:
    policy = with_hand_targets(state.policies["chat"])
    rec = recommend(policy, chat_sweep, headroom=0.1, hand_targets=True)
    assert policy.pd_ratio.min <= rec.pd_ratio_target <= policy.pd_ratio.max
    assert rec.pd_ratio_target == pytest.approx(chat_sweep.best.ratio)
    assert not rec.warnings
    assert rec.capacity_per_instance is not None
    assert rec.capacity_per_instance == pytest.approx(chat_sweep.best.decode_tps_per_instance)
    assert rec.target_per_instance is not None and rec.target_per_instance % 50 == 0
    # Below the SLO limit by the headroom and the policy's tolerance band.
    expected = rec.capacity_per_instance * 0.9 / (1 + policy.scaling.tolerance)
    assert abs(rec.target_per_instance - expected) <= 25
    # Only values that differ become changes.
    keys = {c.key for c in rec.changes}
    assert ("pd_ratio.target" in keys) == (
        format_ratio(policy.pd_ratio.target) != format_ratio(rec.pd_ratio_target)
    )
    assert ("scaling.target_per_instance" in keys) == (
        policy.scaling.target_per_instance != rec.target_per_instance
    )
    assert "pd_ratio.min" not in keys and "pd_ratio.max" not in keys


def test_under_the_planner_no_target_is_recommended(chat_sweep: Sweep, state: DesiredState) -> None:
    # The default planner derives capacity itself; a target would override it.
    rec = recommend(state.policies["chat"], chat_sweep)
    assert rec.target_per_instance is None and rec.prefill_target_per_instance is None
    assert {c.key for c in rec.changes} <= {"pd_ratio.target", "pd_ratio.min", "pd_ratio.max"}
    assert rec.capacity_per_instance == pytest.approx(chat_sweep.best.decode_tps_per_instance)


def test_the_planners_derived_capacity_matches_the_sweep_where_it_limits(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    pool = length_pool(state.policies["chat"], None, seed=0)
    checks = {c.role: c for c in check_capacity(state, "chat", chat_sweep, pool)}
    assert set(checks) == {"prefill", "decode"}
    limiting = [c for c in checks.values() if c.limiting]
    assert limiting, chat_sweep.best.limited_by(chat_sweep.attainment_goal)
    for check in limiting:
        # The model and the simulator share the performance model: within the
        # check's own tolerance, so tune reports no warning for the example service.
        assert abs(check.derived_vs_measured - 1) <= CAPACITY_CHECK_TOLERANCE, check.line()
        assert not check.warnings()
    assert checks["decode"].gpu_type == "h20" and checks["prefill"].gpu_type == "h800"
    assert all(c.override_tps is None for c in checks.values())


def test_a_capacity_check_warns_about_a_model_off_or_an_override_above_the_limit() -> None:
    off = CapacityCheck("decode", "h20", 1500.0, 1000.0, True, None)
    assert "overestimates decode capacity by 50%" in off.warnings()[0]
    low = CapacityCheck("prefill", "h800", 8000.0, 10000.0, True, None)
    assert "underestimates prefill capacity by 20%" in low.warnings()[0]
    # A role that did not limit the best split was measured below its capacity.
    assert not CapacityCheck("decode", "h20", 1500.0, 1000.0, False, None).warnings()
    over = CapacityCheck("decode", "h20", 1000.0, 1000.0, True, 1300.0)
    [warning] = over.warnings()
    assert "override 1,300" in warning and "remove it" in warning
    assert "the policy overrides it with 1,300" in over.line()


def test_requests_no_instance_can_serve_in_time_do_not_fail_a_probe() -> None:
    # 0.8% of prompts miss TTFT even on an idle instance: a TTFT attainment of 98.8%
    # is 99.6% of the attainable requests, which meets a 99.5% goal.
    probe = Probe(10.0, 0.988, 1.0, 1000.0, 10000.0, 0, unattainable_share=0.008)
    assert probe.meets(0.995)
    assert not replace(probe, ttft_attainment=0.985).meets(0.995)
    assert not replace(probe, unattainable_share=0.0).meets(0.995)


def test_prefill_floor_target_comes_from_the_best_split_with_the_same_headroom(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    policy = with_hand_targets(state.policies["chat"])
    rec = recommend(policy, chat_sweep, headroom=0.1, hand_targets=True)
    best = chat_sweep.best
    # Prompt tokens/s per prefill instance at the best split's SLO-limited rate.
    assert rec.prefill_capacity_per_instance == pytest.approx(best.prefill_tps_per_instance)
    assert best.best is not None
    assert rec.prefill_capacity_per_instance == pytest.approx(best.best.prompt_tps / best.prefill)
    assert rec.prefill_target_per_instance is not None
    assert rec.prefill_target_per_instance % 50 == 0
    expected = rec.prefill_capacity_per_instance * 0.9 / (1 + policy.scaling.tolerance)
    assert abs(rec.prefill_target_per_instance - expected) <= 25
    keys = {c.key for c in rec.changes}
    assert ("scaling.prefill_target_per_instance" in keys) == (
        policy.scaling.prefill_target_per_instance != rec.prefill_target_per_instance
    )
    # A larger headroom gives a lower floor target.
    cautious = recommend(policy, chat_sweep, headroom=0.3, hand_targets=True)
    assert cautious.prefill_target_per_instance is not None
    assert cautious.prefill_target_per_instance < rec.prefill_target_per_instance


def test_an_unset_prefill_floor_target_is_recommended_as_a_new_value(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    base = with_hand_targets(state.policies["chat"])
    unset = base.model_copy(
        update={"scaling": base.scaling.model_copy(update={"prefill_target_per_instance": None})}
    )
    rec = recommend(unset, chat_sweep, hand_targets=True)
    change = next(c for c in rec.changes if c.key == "scaling.prefill_target_per_instance")
    assert change.old_text == "unset"
    assert change.value == rec.prefill_target_per_instance


@pytest.mark.parametrize("metric", ["prefill_tps", "prefill_gpu_util"])
def test_a_prefill_driven_metric_gets_no_prefill_floor_target(
    chat_sweep: Sweep, state: DesiredState, metric: str
) -> None:
    # The policy ignores the floor when its metric drives prefill, so tune leaves it.
    base = with_hand_targets(state.policies["chat"])
    prefill_driven = base.model_copy(
        update={
            "scaling": base.scaling.model_copy(
                update={"metric": metric, "target_per_instance": 0.7}
            )
        }
    )
    rec = recommend(prefill_driven, chat_sweep, hand_targets=True)
    assert rec.prefill_target_per_instance is None
    assert rec.prefill_capacity_per_instance is None
    assert all(c.key != "scaling.prefill_target_per_instance" for c in rec.changes)


def test_an_optimum_outside_the_bounds_is_clamped_with_a_warning_or_widened(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    base = state.policies["chat"]
    best = chat_sweep.best.ratio
    narrow = base.model_copy(
        update={
            "pd_ratio": base.pd_ratio.model_copy(
                update={"min": best * 1.5, "target": best * 2, "max": best * 3}
            )
        }
    )
    clamped = recommend(narrow, chat_sweep)
    assert clamped.pd_ratio_target == pytest.approx(best * 1.5)
    assert clamped.warnings and "outside" in clamped.warnings[0]
    assert "--widen-bounds" in clamped.warnings[0]
    widened = recommend(narrow, chat_sweep, widen_bounds=True)
    assert widened.pd_ratio_target == pytest.approx(best)
    assert widened.pd_ratio_min == pytest.approx(best)
    assert {c.key for c in widened.changes} >= {"pd_ratio.target", "pd_ratio.min"}


def test_a_non_tps_metric_gets_no_target_recommendation(
    chat_sweep: Sweep, state: DesiredState
) -> None:
    base = state.policies["chat"]
    util = base.model_copy(
        update={
            "scaling": base.scaling.model_copy(
                update={"metric": "decode_gpu_util", "target_per_instance": 0.7}
            )
        }
    )
    rec = recommend(util, chat_sweep, hand_targets=True)
    assert rec.target_per_instance is None
    assert all(c.key != "scaling.target_per_instance" for c in rec.changes)
    assert any("decode_gpu_util" in w for w in rec.warnings)


@pytest.mark.parametrize(("tps", "rounded"), [(1473.6, 1450), (1476, 1500), (10, 50), (0, 50)])
def test_targets_round_to_50_tokens_per_second(tps: float, rounded: int) -> None:
    assert round_target(tps) == rounded


# --------------------------------------------------------------------------- write back


@settings(max_examples=15, deadline=None)
@given(
    file_index=st.integers(min_value=0, max_value=len(SERVICE_FILES) - 1),
    prefill=st.integers(min_value=1, max_value=12),
    decode=st.integers(min_value=1, max_value=12),
    target=st.integers(min_value=1, max_value=60).map(lambda k: k * 50),
    prefill_target=st.integers(min_value=1, max_value=600).map(lambda k: k * 50),
)
def test_apply_changes_rewrites_only_the_changed_lines(
    file_index: int, prefill: int, decode: int, target: int, prefill_target: int
) -> None:
    path = SERVICE_FILES[file_index]
    before = with_hand_target_lines(path.read_text(), path.stem)
    ratio = format_ratio(prefill / decode)
    changes = [
        ValueChange(("pd_ratio", "target"), "", ratio, ratio),
        ValueChange(("scaling", "target_per_instance"), "", str(target), target),
        ValueChange(
            ("scaling", "prefill_target_per_instance"), "", str(prefill_target), prefill_target
        ),
    ]
    after = apply_changes(before, changes, path=path.name)
    old_lines, new_lines = before.splitlines(), after.splitlines()
    assert len(old_lines) == len(new_lines)
    expected = {"target_per_instance": target, "prefill_target_per_instance": prefill_target}
    for old, new in zip(old_lines, new_lines, strict=True):
        if old == new:
            continue
        key = old.split(":", 1)[0].strip()
        assert key in {"target", *expected}, (old, new)
        assert new.startswith(old.split(":", 1)[0] + ":")  # same key, same indentation
        if key == "target":
            assert new.strip() == f'target: "{ratio}"'  # quoted as before
        else:
            assert new.split(":", 1)[1].split("#")[0].strip() == str(expected[key])
            assert ("#" in old) == ("#" in new)  # an end-of-line comment survives


PREFILL_TARGET_LINE = re.compile(r"^  prefill_target_per_instance: \d+\n", re.MULTILINE)


@pytest.mark.parametrize("path", SERVICE_FILES, ids=lambda p: p.stem)
def test_apply_changes_inserts_a_missing_prefill_target_as_one_new_line(path: Path) -> None:
    # An older file without the key: the write-back adds exactly one line, right
    # after target_per_instance, and leaves every other line (comments too) alone.
    before = with_hand_target_lines(path.read_text(), path.stem, prefill=False)
    assert not PREFILL_TARGET_LINE.search(before)
    change = ValueChange(("scaling", "prefill_target_per_instance"), "unset", "7350", 7350)
    after = apply_changes(before, [change], path=path.name)
    old_lines, new_lines = before.splitlines(), after.splitlines()
    assert len(new_lines) == len(old_lines) + 1
    index = next(i for i, line in enumerate(old_lines) if line.startswith("  target_per_instance:"))
    assert new_lines[index + 1] == "  prefill_target_per_instance: 7350"
    assert new_lines[: index + 1] + new_lines[index + 2 :] == old_lines


def test_apply_changes_keeps_comment_lines_with_the_key_they_introduce() -> None:
    before = (
        "scaling:\n"
        "  target_per_instance: 1300   # decode\n"
        "\n"
        "  # about the tolerance\n"
        "  tolerance: 0.1\n"
    )
    change = ValueChange(("scaling", "prefill_target_per_instance"), "unset", "9000", 9000)
    assert apply_changes(before, [change], path="chat.yaml") == (
        "scaling:\n"
        "  target_per_instance: 1300   # decode\n"
        "  prefill_target_per_instance: 9000\n"
        "\n"
        "  # about the tolerance\n"
        "  tolerance: 0.1\n"
    )


# --------------------------------------------------------------------------- command line


def _diff_lines(before: str, after: str) -> list[tuple[str, str]]:
    old_lines, new_lines = before.splitlines(), after.splitlines()
    assert len(old_lines) == len(new_lines)
    return [(o, n) for o, n in zip(old_lines, new_lines, strict=True) if o != n]


# A small, fast sweep for the command-line tests (5 splits of 32 GPUs, 180 s probes).
FAST = ["--quick", "--gpus", "32", "--duration", "180"]
TARGET_RE = re.compile(r"^  target_per_instance: \d+", re.MULTILINE)
RATIO_RE = re.compile(r'^  target: "[\d:]+"', re.MULTILINE)


PREFILL_TARGET_RE = re.compile(r"^  prefill_target_per_instance: \d+", re.MULTILINE)


LOW_TARGET_NOTE = "  # 900 was set by hand, long ago"


def _with_low_target(chat: Path) -> str:
    """chat.yaml with deliberately low decode and prefill targets for the paper policy,
    so all values change, and a comment line that explains the old decode target. The
    P/D ratio's upper bound is the 3:2 the paper policy's hand targets were tuned with
    (its ratio follows decode, and the planner's wider bound lets it starve decode)."""
    text = with_hand_target_lines(chat.read_text(), "chat")
    assert text.count('  max: "4:1"\n') == 1
    text = text.replace('  max: "4:1"\n', '  max: "3:2"\n')
    text = TARGET_RE.sub(f"{LOW_TARGET_NOTE}\n  target_per_instance: 900", text, count=1)
    text = PREFILL_TARGET_RE.sub("  prefill_target_per_instance: 1000", text, count=1)
    chat.write_text(text)
    return text


PAPER = ["--autoscaler", "heteroscale-paper"]


def _tune_chat_for_the_paper_policy(repo: Path, *extra: str) -> Result:
    """``heteroscale tune chat`` (fast sweep, half-hour verification) for
    ``heteroscale-paper``."""
    return CliRunner().invoke(
        app, ["tune", "chat", "--repo", str(repo), *FAST, *PAPER, "--diurnal-hours", "0.5", *extra]
    )


RECOMMENDED_RE = re.compile(
    r"recommended: pd_ratio.target (\d+:\d+) \(current [\d:]+\), "
    r"scaling.target_per_instance (\d+) \(current \d+\)"
)
# The command prints the file's diff; the prefill floor target is read from it.
PREFILL_DIFF_RE = re.compile(r"^\+  prefill_target_per_instance: (\d+)$", re.MULTILINE)


def _with_goal(chat: Path, goal: float) -> str:
    """chat.yaml asking ``goal`` of requests within both SLOs."""
    text = chat.read_text().replace(
        "  quantile: 0.9\n", f"  quantile: 0.9\n  attainment_goal: {goal}\n", 1
    )
    chat.write_text(text)
    return text


def test_write_puts_verified_values_in_place_of_the_old_ones_and_their_comments(
    example_repo: Path,
) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    _with_low_target(chat)
    start = _with_goal(chat, 0.5)  # a goal the verification day reaches
    ratio_match = RATIO_RE.search(start)
    assert ratio_match
    ratio_before = ratio_match.group(0)
    result = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert result.exit_code == 0, result.output
    match = RECOMMENDED_RE.search(result.stdout)
    assert match, result.stdout
    ratio, per_instance = match.group(1), int(match.group(2))
    prefill_match = PREFILL_DIFF_RE.search(result.stdout)
    assert prefill_match, result.stdout
    prefill_per_instance = int(prefill_match.group(1))
    after = chat.read_text()
    removed = [line for line in start.splitlines() if line not in after.splitlines()]
    added = [line for line in after.splitlines() if line not in start.splitlines()]
    values = {
        f"  target_per_instance: {per_instance}",
        f"  prefill_target_per_instance: {prefill_per_instance}",
    }
    if ratio_before != f'  target: "{ratio}"':
        values.add(f'  target: "{ratio}"')
    # Only the values and the comments that described the old ones changed...
    assert {line for line in added if not line.lstrip().startswith("#")} == values
    assert all(
        line.lstrip().startswith("#")
        or line.split(":")[0].strip()
        in {"target_per_instance", "prefill_target_per_instance", "target"}
        for line in removed
    )
    # ...the old explanation is gone, and each new value says what verified it.
    assert LOW_TARGET_NOTE not in after.splitlines()
    notes = [line for line in added if line.lstrip().startswith("# heteroscale tune: verified")]
    assert len(notes) == len(values)
    assert "wrote" in result.stdout
    tuned = load_desired_state(example_repo).policies["chat"]
    assert tuned.scaling.target_per_instance == per_instance
    assert tuned.scaling.prefill_target_per_instance == prefill_per_instance
    assert tuned.pd_ratio.target == pytest.approx(parse_ratio(ratio))
    assert tuned.pd_ratio.min <= tuned.pd_ratio.target <= tuned.pd_ratio.max


def test_write_keeps_crlf_and_a_bom_validates_and_writing_again_changes_nothing(
    example_repo: Path,
) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    _with_low_target(chat)
    start = _with_goal(chat, 0.5)  # a goal the verification day reaches
    chat.write_bytes(("\ufeff" + start).replace("\n", "\r\n").encode())
    result = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert result.exit_code == 0, result.output
    after = chat.read_bytes()
    assert after.startswith("\ufeff".encode())
    assert after.count(b"\n") == after.count(b"\r") == after.count(b"\r\n")
    assert after.count(b"# heteroscale tune: verified") == 3  # one per written value
    validated = CliRunner().invoke(app, ["validate", str(example_repo)])
    assert validated.exit_code == 0, validated.output
    again = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert again.exit_code == 0, again.output
    assert chat.read_bytes() == after


def test_write_refuses_a_value_an_alias_shares_naming_the_file_and_line(
    example_repo: Path,
) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    _with_low_target(chat)
    text = (
        _with_goal(chat, 0.5)
        .replace("  target_per_instance: 900", "  target_per_instance: &hand 900")
        .replace("  prefill_target_per_instance: 1000", "  prefill_target_per_instance: *hand")
    )
    chat.write_text(text)
    result = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), "an error, not a traceback"
    line = 1 + next(
        i for i, row in enumerate(text.splitlines()) if row.startswith("  target_per_instance: &")
    )
    assert f"policies/chat.yaml:{line}:" in result.stderr
    assert "&hand" in result.stderr and "wrote" not in result.stdout
    assert chat.read_text() == text


def test_write_refuses_values_that_miss_the_goal_and_exits_1(example_repo: Path) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    _with_low_target(chat)
    start = _with_goal(chat, 0.9999)  # no reactive policy keeps this on a bursty day
    result = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert result.exit_code == 1, result.output
    assert chat.read_text() == start
    assert "not written" in result.stderr and "below the" in result.stderr
    assert RECOMMENDED_RE.search(result.stdout)  # the best values found are still shown


@contextlib.contextmanager
def unwritable(*paths: Path) -> Iterator[None]:
    """``paths`` cannot be written, nor a file created in them, by this process: by
    their modes, or for root, who ignores modes, by ``chattr +i`` (skipped where the
    file system or the container does not allow it). As they were afterwards."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(modes[path] & ~0o222)
        try:
            yield
        finally:
            for path in paths:
                path.chmod(modes[path])
        return
    names = [str(path) for path in paths]
    if shutil.which("chattr") is None:
        pytest.skip("root ignores file modes, and there is no chattr to make a file immutable")
    if subprocess.run(["chattr", "+i", *names], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-i", *names], capture_output=True)
        pytest.skip("root ignores file modes, and chattr +i is not allowed here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *names], check=True)


def test_a_write_that_fails_is_an_error_naming_the_file_and_leaves_it_as_it_was(
    example_repo: Path,
) -> None:
    policies = example_repo / "policies"
    chat = policies / "chat.yaml"
    _with_low_target(chat)
    start = _with_goal(chat, 0.5)  # values the verification accepts: written, if it can
    with unwritable(chat, policies):
        result = _tune_chat_for_the_paper_policy(example_repo, "--write")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), "an error, not a traceback"
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: --write {chat}: cannot write: ")
    assert "Permission denied" in error or "Operation not permitted" in error
    assert chat.read_text() == start
    assert sorted(p.name for p in policies.iterdir()) == sorted(
        p.name for p in (REPO_ROOT / "policies").iterdir()
    ), "no temporary file left beside it"


def test_write_without_verification_is_a_usage_error(example_repo: Path) -> None:
    result = CliRunner().invoke(
        app, ["tune", "chat", "--repo", str(example_repo), *FAST, "--no-verify", "--write"]
    )
    assert result.exit_code == 2
    assert "--write writes only verified values" in result.stderr


def test_without_write_the_file_is_untouched_and_the_replay_is_shown(example_repo: Path) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    start = _with_low_target(chat)
    result = _tune_chat_for_the_paper_policy(example_repo)
    assert result.exit_code == 0, result.output
    assert chat.read_text() == start
    assert "◀ best" in result.stdout
    assert "current" in result.stdout and "recommended" in result.stdout  # replay table
    assert "GPU-hours" in result.stdout
    assert "-  target_per_instance: 900" in result.stdout
    assert "dry run" in result.stdout


def test_under_the_planner_tune_reports_each_allowed_types_cost_per_token(
    example_repo: Path,
) -> None:
    """chat's decode allows H20 (preferred) and H800; in the performance model the H800
    serves a decode token for less (``reconciler.policy.gpu_economics``), which tune
    says, as a warning, beside the derived capacity."""
    result = CliRunner().invoke(
        app, ["tune", "chat", "--repo", str(example_repo), *FAST, "--no-verify"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # unwrapped
    assert "decode by allowed GPU type, preferred first: h20" in output
    assert "M per USD" in output
    assert "decode prefers h20, but a decode token costs" in output
    assert "prefill by allowed GPU type" not in output  # one allowed type: no choice


def test_unknown_service_is_a_usage_error_naming_the_known_ones(example_repo: Path) -> None:
    result = CliRunner().invoke(app, ["tune", "chatt", "--repo", str(example_repo), "--quick"])
    assert result.exit_code == 2  # as simulate --service
    assert "unknown service 'chatt'" in result.stderr
    assert "chat, summarize, svc-a, svc-b" in result.stderr


def test_invalid_desired_state_exits_1_with_located_errors(example_repo: Path) -> None:
    chat = example_repo / "policies" / "chat.yaml"
    chat.write_text(chat.read_text().replace("tbt_ms: 50", "tbt_ms: -5"))
    result = CliRunner().invoke(app, ["tune", "chat", "--repo", str(example_repo), "--quick"])
    assert result.exit_code == 1
    assert "policies/chat.yaml:" in result.stderr and "problem" in result.stderr


def test_usage_errors_exit_2(example_repo: Path) -> None:
    runner = CliRunner()
    assert (
        runner.invoke(app, ["tune", "chat", "--repo", str(example_repo), "--placer", "x"]).exit_code
        == 2
    )
    assert runner.invoke(app, ["tune", "chat", "--headroom", "2"]).exit_code == 2


def test_refreshed_values_lose_the_comments_that_described_the_old_ones() -> None:
    text = (
        "# the file\n"
        "name: chat\n"
        "\n"
        "# why 3:4 (above the mapping)\n"
        "pd_ratio:\n"
        '  target: "3:4"   # old ratio\n'
        '  min: "1:3"\n'
        "scaling:\n"
        "  metric: decode_tps\n"
        "  # why 1300\n"
        "  # (two lines)\n"
        "  target_per_instance: 1300\n"
        "  # about the tolerance\n"
        "  tolerance: 0.1\n"
    )
    out = refresh_comments(
        text, [("pd_ratio", "target"), ("scaling", "target_per_instance")], "new", path="chat.yaml"
    )
    assert out == (
        "# the file\n"
        "name: chat\n"
        "\n"
        "pd_ratio:\n"
        "  # new\n"
        '  target: "3:4"\n'
        '  min: "1:3"\n'
        "scaling:\n"
        "  metric: decode_tps\n"
        "  # new\n"
        "  target_per_instance: 1300\n"
        "  # about the tolerance\n"
        "  tolerance: 0.1\n"
    )
