"""``heteroscale prometheus-rules``: the recording rules the large-fleet read mode needs.

A cycle's most expensive queries are the histograms' (every bucket of every engine
through ``rate``). With these rules loaded into Prometheus, and ``plan``, ``apply`` or
``run`` given ``--prometheus-recording-rules``, a cycle reads a few pre-aggregated
series per service instead (``reconciler.observe.presets.recording_rules``). The
rules' window and offset must be the ones the reconciler reads with, so they come
from the same options (``--prometheus-scrape-interval``,
``--prometheus-rate-window``), and their labels from the repository's policies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from reconciler.commands._options import (
    PrometheusRateWindowOpt,
    PrometheusScrapeIntervalOpt,
    RepoOpt,
    RevOpt,
    checked_repository,
    console,
    desired_state_or_exit,
)


def register(app: typer.Typer) -> None:
    @app.command("prometheus-rules")
    def prometheus_rules(
        repo: RepoOpt = Path("."),
        rev: RevOpt = None,
        prometheus_scrape_interval: PrometheusScrapeIntervalOpt = 15.0,
        prometheus_rate_window: PrometheusRateWindowOpt = None,
    ) -> None:
        """Print the Prometheus recording rules for --prometheus-recording-rules (a YAML
        rules file: load it with rule_files), for the repository's policies and the
        given scrape interval and rate window."""
        from reconciler.commands.reconcile import prometheus_windows
        from reconciler.observe.presets import recording_rules

        interval_s, window_s = prometheus_windows(
            prometheus_scrape_interval, prometheus_rate_window
        )
        checked_repository(repo, rev=rev)
        state = desired_state_or_exit(repo, rev=rev)
        labels = sorted(
            {(p.metrics.service_label, p.metrics.role_label) for p in state.policies.values()}
        )
        if len(labels) > 1:
            listed = ", ".join(f"{s}/{r}" for s, r in labels)
            console.print(
                f"the policies aggregate by different labels ({listed}): one set of "
                "recorded series cannot serve them all; give every policy the same "
                "metrics.service_label and metrics.role_label",
                markup=False,
            )
            raise typer.Exit(1)
        service_label, role_label = labels[0] if labels else ("service", "role")
        rules = recording_rules(
            window_s,
            service_label=service_label,
            role_label=role_label,
            offset_s=interval_s,
        )
        from ruamel.yaml import YAML

        yaml = YAML()
        yaml.default_flow_style = False
        yaml.width = 4096  # one PromQL expression per line
        yaml.dump(rules, sys.stdout)
