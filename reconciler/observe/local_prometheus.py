"""Run a real Prometheus server on loopback: for integration tests, benchmarks and local
simulations.

Uses the ``prometheus`` binary on PATH (Debian package ``prometheus``; ``promtool`` for
backfilling comes with it). The server listens on a free loopback port, keeps its TSDB
in a temporary directory, and scrapes the targets listed in a file-SD file that
``set_targets`` rewrites while it runs. Facts worth knowing (Prometheus 2.42):

- Target changes reach the scrape manager through the discovery manager, which sends
  updates at most every 5 s: the first scrape of a new target happens about 5 s after
  it is listed. ``wait_for_targets`` polls ``/api/v1/targets`` instead of sleeping.
- ``backfill`` turns OpenMetrics text into TSDB blocks with
  ``promtool tsdb create-blocks-from openmetrics`` *before* the server starts; queries at
  the backfilled times then see exactly those samples.
- The scrape job uses ``honor_labels: true`` because the simulated-fleet exporter
  speaks for many pods behind one target and sets ``instance`` itself.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from reconciler.atomic_write import replace_text
from reconciler.observe.presets import format_duration

JOB_NAME = "heteroscale-sim"


class PrometheusNotInstalled(RuntimeError):
    """The ``prometheus`` (or ``promtool``) binary is not on PATH."""


def find_binary(name: str = "prometheus") -> str | None:
    return shutil.which(name)


def write_file_sd(path: Path, groups: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write file-SD target groups (``{"targets": [...], "labels": {...}}``).
    Labels may include ``__meta_*`` names, which relabelling sees like discovered ones."""
    replace_text(path, json.dumps(list(groups)))


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalPrometheus:
    """One Prometheus process. Use as a context manager, or ``start()``/``stop()``."""

    def __init__(
        self,
        *,
        scrape_interval_s: float = 1.0,
        scrape_timeout_s: float | None = None,
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        extra_scrape_configs: Sequence[Mapping[str, Any]] = (),
        rules: Mapping[str, Any] | None = None,
    ) -> None:
        """``extra_scrape_configs`` are further scrape jobs (Prometheus' YAML as dicts),
        e.g. a production job with its service discovery swapped for
        ``file_sd_configs`` written with ``write_file_sd``. ``rules`` is a rules file
        (``{"groups": [...]}``, e.g. ``presets.recording_rules``), evaluated every scrape
        interval."""
        self.scrape_interval_s = scrape_interval_s
        self.scrape_timeout_s = scrape_timeout_s or scrape_interval_s
        if self.scrape_timeout_s > self.scrape_interval_s:
            raise ValueError("scrape timeout must not exceed the scrape interval")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="heteroscale-prom-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.targets_file = self.workdir / "targets.json"
        self.config_file = self.workdir / "prometheus.yml"
        self.log_file = self.workdir / "prometheus.log"
        self.binary = binary or find_binary("prometheus")
        self.extra_scrape_configs = [dict(job) for job in extra_scrape_configs]
        self.rules_file = self.workdir / "rules.json"
        self.rules = rules
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.set_targets([])

    # -- configuration

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("Prometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        interval = format_duration(self.scrape_interval_s)
        timeout = format_duration(self.scrape_timeout_s)
        # JSON is YAML: no YAML writer needed.
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": timeout,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": JOB_NAME,
                    "honor_labels": True,
                    "file_sd_configs": [
                        {"files": [str(self.targets_file)], "refresh_interval": "1s"}
                    ],
                },
                *self.extra_scrape_configs,
            ],
        }
        if self.rules is not None:
            self.rules_file.write_text(json.dumps(self.rules, indent=2))
            config["rule_files"] = [str(self.rules_file)]
        self.config_file.write_text(json.dumps(config, indent=2))

    def set_targets(self, addresses: Sequence[str]) -> None:
        """Scrape exactly these ``host:port`` targets (atomically replaces the list)."""
        write_file_sd(self.targets_file, [{"targets": list(addresses), "labels": {}}])

    def file_sd_path(self, name: str) -> Path:
        """A path in the work directory for an extra job's file-SD targets."""
        return self.workdir / f"{name}.json"

    def targets(self) -> list[str]:
        return list(json.loads(self.targets_file.read_text())[0]["targets"])

    def backfill(self, openmetrics: str) -> None:
        """Write OpenMetrics samples (ending in ``# EOF``) as TSDB blocks. Only before
        ``start``: a running server does not pick up new blocks."""
        if self._process is not None:
            raise RuntimeError("backfill before start()")
        promtool = find_binary("promtool")
        if promtool is None:
            raise PrometheusNotInstalled("promtool not found on PATH (Debian package 'prometheus')")
        source = self.workdir / "backfill.om"
        source.write_text(openmetrics)
        done = subprocess.run(
            [
                promtool,
                "tsdb",
                "create-blocks-from",
                "openmetrics",
                str(source),
                str(self.data_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"promtool backfill failed: {done.stderr.strip() or done.stdout.strip()}"
            )

    # -- process

    def start(self, timeout_s: float = 30.0) -> LocalPrometheus:
        if self.binary is None:
            raise PrometheusNotInstalled(
                "prometheus not found on PATH; install the Debian package 'prometheus'"
            )
        if self._process is not None:
            raise RuntimeError("already started")
        self._write_config()
        for _attempt in range(3):  # another process may grab the free port first
            self.port = free_loopback_port()
            log = self.log_file.open("ab")
            self._process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=30d",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            # Its own session (no Ctrl-C twice), so make sure it dies with us.
            atexit.register(self._terminate)
            if self._wait_ready(timeout_s):
                return self
            self._terminate()
        raise RuntimeError(f"Prometheus did not become ready; log:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def wait_for_targets(
        self, addresses: Sequence[str], *, health: str = "up", timeout_s: float = 20.0
    ) -> None:
        """Block until every address is an active target with this health (``up`` once
        scraped successfully, ``down`` once a scrape failed)."""
        wanted = set(addresses)
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                response = requests.get(
                    f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=5
                )
            except requests.RequestException:
                # A loaded machine can stall one poll; the deadline decides, not one read.
                time.sleep(0.2)
                continue
            active = response.json()["data"]["activeTargets"]
            seen = {t["labels"].get("instance", t["scrapeUrl"]): t["health"] for t in active}
            seen.update({t["scrapeUrl"].split("/")[2]: t["health"] for t in active})
            if all(seen.get(a) == health for a in wanted):
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"targets {sorted(wanted)} not {health} after {timeout_s} s; seen {seen}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self._terminate)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def stop(self) -> None:
        """Stop the server (kept data stays until ``cleanup``)."""
        self._terminate()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
