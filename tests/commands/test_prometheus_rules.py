"""``heteroscale prometheus-rules``: the recording rules of the large-fleet read mode,
for the repository's policies and the reconciler's own scrape interval and window."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands.reconcile import cycle_settings
from reconciler.observe.presets import recording_rules

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_the_rules_match_what_the_reconciler_reads() -> None:
    result = runner.invoke(app, ["prometheus-rules", "--repo", str(REPO)])
    assert result.exit_code == 0, result.output
    assert YAML(typ="safe").load(result.output) == recording_rules(60.0, offset_s=15.0)
    # A 30 s scrape: a 120 s window (four intervals), read one interval back.
    result = runner.invoke(
        app,
        [
            "prometheus-rules",
            "--repo",
            str(REPO),
            "--prometheus-scrape-interval",
            "30",
        ],
    )
    assert result.exit_code == 0, result.output
    assert YAML(typ="safe").load(result.output) == recording_rules(120.0, offset_s=30.0)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prometheus-rules", "--repo", str(REPO)])
    rules = tmp_path / "rules.yaml"
    rules.write_text(result.output)
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_policies_aggregating_by_other_labels_are_refused(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    shutil.copytree(REPO / "clusters", tmp_path / "clusters")
    shutil.copytree(REPO / "templates", tmp_path / "templates")
    chat = tmp_path / "policies" / "chat.yaml"
    chat.write_text(chat.read_text() + "metrics: {service_label: app}\n")
    result = runner.invoke(app, ["prometheus-rules", "--repo", str(tmp_path)], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "app/role, service/role" in result.output


def test_a_bad_window_is_a_usage_error() -> None:
    result = runner.invoke(
        app, ["prometheus-rules", "--repo", str(REPO), "--prometheus-rate-window", "10"]
    )
    assert result.exit_code == 2, result.output


def test_the_flag_turns_the_recorded_mode_on() -> None:
    off = cycle_settings(REPO, prometheus_url="http://p:9090").prometheus.settings("http://p:9090")
    on = cycle_settings(REPO, prometheus_url="http://p:9090", prometheus_recording_rules=True)
    assert not off.recorded_histograms
    assert on.prometheus.settings("http://p:9090").recorded_histograms
