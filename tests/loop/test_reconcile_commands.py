"""`heteroscale plan`, `apply` and `run` on the embedded default (the simulated fleet
built from the repository's own policies/ and clusters/): `plan` falls back to it when
no kubeconfig is found, `apply` and `run` only with --simulate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from loopback import unreachable_kubeconfig
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands.reconcile import build_loop, cycle_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config


def test_plan_on_the_embedded_default_prints_a_readable_report() -> None:
    result = CliRunner().invoke(app, ["plan", "--repo", str(REPO)])
    assert result.exit_code in (0, 3), result.output
    text = result.output
    assert "simulated fleet (no kubeconfig found; the embedded default)" in text
    assert "cluster prod-east" in text and "decisions:" in text
    for service in ("chat", "summarize", "svc-a", "svc-b"):
        assert f"    {service}" in text
    assert ("Plan: changes" in text) == (result.exit_code == 3)


def test_plan_json_has_decisions_and_group_changes() -> None:
    result = CliRunner().invoke(app, ["plan", "--repo", str(REPO), "--format", "json"])
    report = json.loads(result.stdout)
    (cluster,) = report["clusters"]
    assert set(cluster["decisions"]) == {"chat", "summarize", "svc-a", "svc-b"}
    assert report["has_changes"] == (result.exit_code == 3) == bool(cluster["group_changes"])


def test_apply_runs_one_cycle_and_bad_input_is_an_error(tmp_path: Path) -> None:
    runner = CliRunner()
    applied = runner.invoke(
        app, ["apply", "--repo", str(REPO), "--simulate", "--format", "markdown"]
    )
    assert applied.exit_code == 0, applied.output
    (tmp_path / "policies").mkdir()
    (tmp_path / "clusters").mkdir()
    (tmp_path / "policies" / "x.yaml").write_text("name: [broken\n")
    broken = runner.invoke(app, ["plan", "--repo", str(tmp_path)])
    assert broken.exit_code == 1
    assert runner.invoke(app, ["plan", "--repo", str(REPO), "--format", "yaml"]).exit_code == 2


def test_run_reconciles_until_told_to_stop() -> None:
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--repo",
            str(REPO),
            "--simulate",
            "--cycles",
            "2",
            "--interval",
            "0.1",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "command",
    [
        ["apply"],
        ["run", "--cycles", "1", "--listen", ":0"],
        ["run", "--dry-run", "--cycles", "1", "--listen", ":0"],
    ],
)
def test_apply_and_run_without_a_kubeconfig_or_simulate_are_refused(command: list[str]) -> None:
    """Missing credentials are a usage error, not a cycle on the simulated fleet that
    reports "Applied" (or a /healthz of 200) while managing nothing."""
    result = CliRunner().invoke(app, [*command, "--repo", str(REPO)], terminal_width=200)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "no kubeconfig found" in text and "--kubeconfig" in text and "--simulate" in text
    assert "Applied" not in text and "reconciling every" not in text


def test_run_reconciles_real_clusters_at_once_and_the_simulated_fleet_in_turn(
    tmp_path: Path,
) -> None:
    settings = cycle_settings(repo=REPO, simulate=True, placer="greedy", drain_window=0.0)
    # The simulated fleet is one object for every cluster: its clusters run in turn.
    simulated, wiring = build_loop(settings, dry_run=True, cluster_workers=8)
    assert wiring.simulated and simulated.runs is None
    config = unreachable_kubeconfig(tmp_path / "kubeconfig")
    real = replace(settings, simulate=False, kubeconfig=str(config))
    loop, wiring = build_loop(real, dry_run=True, interval_s=45.0, cluster_workers=8)
    assert not wiring.simulated and loop.runs is not None and loop.runs.workers == 8
    assert loop.cluster_deadline_s == 45.0  # the interval's
    # plan, apply and status: one cycle, the clusters in turn.
    one_shot, _ = build_loop(real, dry_run=True)
    assert one_shot.runs is None


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_run_stops_through_its_own_exit_on_sigterm_and_sighup(
    signal_name: str, tmp_path: Path
) -> None:
    """A stop signal ends `run` through its own exit (exit 0, "stopped" logged, the
    Lease released where there is one): SIGHUP killed the process (exit 129), and so
    did a SIGTERM during start-up, before the handler was installed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("KUBECONFIG", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from reconciler.cli import main; main()",
            "run",
            "--repo",
            str(REPO),
            "--simulate",
            "--interval",
            "10",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        lines: list[str] = []
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if '"event": "start"' in line:
                break
        process.send_signal(getattr(signal, signal_name))
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, "".join(lines) + out
    assert '"event": "stop"' in out
