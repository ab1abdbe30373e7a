"""`heteroscale validate --trace`: the share of a trace's requests each service cannot
serve within its TTFT SLO even on an idle instance, warned about above 1 %."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from repo_edits import edit
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import load_desired_state
from reconciler.policy.capacity import idle_ttft_s, transfer_s_per_token
from reconciler.policy.planner import perf_context

runner = CliRunner()

# Prompt lengths around the repository's services' idle-TTFT thresholds (chat: TTFT
# 1500 ms on a TP4 H800, ~17,700 tokens; svc-a: 1000 ms on a TP2 H800, ~13,800 tokens).
SHORT_TOKENS = 1_000  # attainable for every service
MIDDLE_TOKENS = 16_000  # attainable for chat, not for svc-a
LONG_TOKENS = 100_000  # attainable for none


def write_trace(path: Path, prompts: list[int]) -> Path:
    rows = [f"{i * 0.5:.1f},{prompt},200" for i, prompt in enumerate(prompts)]
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    return path


def warnings(stderr: str, about: str = "cannot meet TTFT") -> dict[str, str]:
    """The warnings per service that say ``about`` (a long prompt also moves the P/D
    ratio a service needs: ``test_validate_ratio.py``)."""
    found = {}
    for line in stderr.splitlines():
        match = re.match(r"warning: service (\S+): ", line)
        if match and about in line:
            found[match.group(1)] = line
    return found


def test_a_service_losing_more_than_one_percent_is_warned_with_its_share(
    repo_root: Path, tmp_path: Path
) -> None:
    prompts = [SHORT_TOKENS] * 92 + [MIDDLE_TOKENS] * 5 + [LONG_TOKENS] * 3
    trace = write_trace(tmp_path / "mixed.csv", prompts)
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("valid: ")
    warned = warnings(result.stderr)
    # chat meets its SLO for the 16,000-token prompts, svc-a does not.
    assert (
        "3.0% of the requests in mixed.csv cannot meet TTFT 1500 ms even on an idle h800 "
        "instance (prompts above " in warned["chat"]
    )
    assert (
        "8.0% of the requests in mixed.csv cannot meet TTFT 1000 ms even on an idle h800 "
        "instance (prompts above " in warned["svc-a"]
    )
    # The threshold quoted is where the idle TTFT crosses the SLO.
    state = load_desired_state(repo_root)
    for service in ("chat", "svc-a"):
        match = re.search(r"prompts above ([\d,]+) tokens", warned[service])
        assert match is not None
        above = float(match[1].replace(",", ""))
        policy = state.policies[service]
        perf = perf_context(policy, state.clusters[policy.cluster])
        assert perf is not None
        per_token_s = transfer_s_per_token(perf.prefill.kv_bytes_per_token, perf.link_gbps)
        first_step_s = perf.decode.decode_step_scalar_s(1.0, 1.0, 1.0)
        slo_s = policy.slo.ttft_ms / 1000.0
        assert idle_ttft_s(perf.prefill, above * 0.99, per_token_s, first_step_s) < slo_s
        assert idle_ttft_s(perf.prefill, above * 1.01, per_token_s, first_step_s) > slo_s


def test_one_percent_or_less_is_not_warned(repo_root: Path, tmp_path: Path) -> None:
    # Exactly 1 %: "more than 1 %" is not reached.
    trace = write_trace(tmp_path / "rare.csv", [SHORT_TOKENS] * 99 + [LONG_TOKENS])
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("valid: ")
    assert warnings(result.stderr) == {}
    # Two in a hundred are.
    trace = write_trace(tmp_path / "two.csv", [SHORT_TOKENS] * 98 + [LONG_TOKENS] * 2)
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    assert set(warnings(result.stderr)) == {"chat", "summarize", "svc-a", "svc-b"}
    assert all(" 2.0% of the requests" in line for line in warnings(result.stderr).values())


def test_a_trace_that_cannot_be_read_is_an_error_naming_it(repo_root: Path, tmp_path: Path) -> None:
    absent = tmp_path / "absent.csv"
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(absent)])
    assert result.exit_code == 1
    assert f"{absent}: no such file" in result.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,12,x\n")
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(broken)])
    assert result.exit_code == 1
    assert str(broken) in result.stderr and "warning" not in result.stderr
    result = runner.invoke(
        app, ["validate", str(repo_root), "--trace", str(broken), "--rate-scale", "0"]
    )
    assert result.exit_code == 2


def test_a_ratio_bound_that_excludes_the_traces_mix_is_warned(
    repo_root: Path, tmp_path: Path
) -> None:
    """Long-context conversation needs more prefill per decode than svc-a's 2:1
    maximum; the warning says by how much the bound holds decode above its need
    (``reconciler.policy.trace_needs``). Chat-shaped requests stay within it."""
    rng = np.random.default_rng(7)
    count = 3_000
    path = tmp_path / "long.csv"
    prompts = rng.lognormal(np.log(9_000), 0.5, count).round()
    outputs = rng.lognormal(np.log(330), 0.4, count).round().clip(1)
    rows = [
        f"{i / 30.0:.3f},{p:.0f},{o:.0f}"
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(path)])
    assert result.exit_code == 0, result.output
    ratio = warnings(result.stderr, about="pd_ratio")
    assert "pd_ratio max 2:1 holds decode at" in ratio["svc-a"]
    assert "the mix in long.csv" in ratio["svc-a"]
    short = write_trace(tmp_path / "short.csv", [SHORT_TOKENS] * 100)
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(short)])
    assert result.exit_code == 0, result.output
    assert "svc-a" not in warnings(result.stderr, about="pd_ratio")


def test_a_busiest_minute_beyond_max_instances_is_warned(repo_root: Path, tmp_path: Path) -> None:
    """One minute at 1,000 requests/s of chat-shaped traffic needs more prefill than
    chat's 64 instances; the warning names the minute's rate and the bound."""
    burst = [f"{1_800 + i / 1_000:.4f},1000,200" for i in range(60_000)]
    quiet = [f"{i * 0.5:.1f},1000,200" for i in range(7_200)]
    rows = sorted(quiet + burst, key=lambda row: float(row.split(",")[0]))
    path = tmp_path / "burst.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(path)])
    assert result.exit_code == 0, result.output
    peak = warnings(result.stderr, about="busiest minute")
    assert (
        # The burst and the quiet hour's two requests a second within it.
        "the busiest minute of burst.csv (1,002.0 requests/s) needs prefill about" in peak["chat"]
    )
    assert "max_instances 64" in peak["chat"]
    calm = write_trace(tmp_path / "calm.csv", [SHORT_TOKENS] * 100)
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(calm)])
    assert warnings(result.stderr, about="busiest minute") == {}


def test_a_role_no_instance_can_serve_for_the_trace_is_named(
    example_repo: Path, tmp_path: Path
) -> None:
    """A TBT below one sequence's step: the warning names the role and why, and no
    P/D-ratio or busiest-minute warning sizes that role at a capacity of 0."""
    edit(example_repo / "policies/chat.yaml", "tbt_ms: 50", "tbt_ms: 2")
    trace = write_trace(tmp_path / "chat.csv", [SHORT_TOKENS] * 100)
    result = runner.invoke(app, ["validate", str(example_repo), "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    chat = [line for line in result.stderr.splitlines() if "service chat:" in line]
    assert chat == [
        "warning: service chat: decode SLO out of reach for the mix in chat.csv: no batch "
        "meets the 2 ms TBT at the mix's context, not even one sequence; the planner holds "
        "decode where it runs"
    ]


def test_a_prefill_no_rate_of_which_meets_the_ttft_is_named_and_said_to_keep_up(
    repo_root: Path, tmp_path: Path
) -> None:
    # Prompts no instance prefills within chat's TTFT even alone: prefill's capacity is
    # then the rate that keeps up with the work, still an SLO out of reach.
    trace = write_trace(tmp_path / "long.csv", [LONG_TOKENS] * 100)
    result = runner.invoke(app, ["validate", str(repo_root), "--trace", str(trace)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert (
        "service chat: prefill SLO out of reach for the mix in long.csv: no prompt of the mix "
        "meets the 1500 ms TTFT even on an idle instance; the planner holds prefill where it "
        "runs, grown to keep up with the work"
    ) in text


def test_a_rate_scale_beyond_the_requests_a_load_holds_is_an_error(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # x1000 of a 100,000-request trace drew 100 million requests (3.3 GB, then numpy's
    # MemoryError as a traceback): the bound is lowered here to test it on a small trace.
    from reconciler.sim import workload

    monkeypatch.setattr(workload, "MAX_REQUEST_ARRAYS", 150)
    trace = write_trace(tmp_path / "t.csv", [SHORT_TOKENS] * 50)
    fits = runner.invoke(
        app, ["validate", str(repo_root), "--trace", str(trace), "--rate-scale", "3"]
    )
    assert fits.exit_code == 0, fits.stderr
    result = runner.invoke(
        app, ["validate", str(repo_root), "--trace", str(trace), "--rate-scale", "3.5"]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error t.csv: rate scale x3.5 of its 50 requests is ~175 requests, more than the "
        "150 a load holds as arrays"
    )
