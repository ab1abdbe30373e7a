"""A real Kubernetes control plane (etcd + kube-apiserver v1.20 + controller manager +
scheduler, no kubelet) for the whole test session, started by the project's own
scripts/k8s/start.sh. Binaries come from scripts/k8s/ensure-binaries.sh (built once
from Debian's source package, then cached; ``.ci/run`` runs it); tests marked
``kubernetes`` are skipped, with the reason, when they are absent."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetestkit import ControlPlane

from reconciler.observe.local_prometheus import LocalPrometheus, find_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts" / "k8s"
TOOLS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


def _bin_dir() -> Path:
    return Path(os.environ.get("HETEROSCALE_KUBE_BIN", "/root/.cache/heteroscale/kube-bin"))


def _binaries_present(bin_dir: Path) -> bool:
    return shutil.which("etcd") is not None and all((bin_dir / t).exists() for t in TOOLS)


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    """The binaries, or a skip saying how to get them: a test run never builds them
    (``.ci/run`` does, as an explicit step)."""
    bin_dir = _bin_dir()
    if not _binaries_present(bin_dir):
        missing = [t for t in TOOLS if not (bin_dir / t).exists()]
        if shutil.which("etcd") is None:
            missing.append("etcd")
        pytest.skip(
            f"Kubernetes binaries missing ({', '.join(missing)} in {bin_dir} or on PATH): "
            "run scripts/k8s/ensure-binaries.sh (about 5.5 minutes) or set HETEROSCALE_KUBE_BIN"
        )
    return bin_dir


@pytest.fixture(scope="session")
def control_plane(
    kube_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    state_dir = tmp_path_factory.mktemp("k8s")
    plane = ControlPlane.start(SCRIPTS, state_dir, kube_bin)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[LocalPrometheus]:
    """A real Prometheus scraping every second (targets set by the test), deleted after
    the test; skipped, with the reason, without the binary."""
    if find_binary("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    server = LocalPrometheus(scrape_interval_s=1.0, workdir=tmp_path / "prometheus")
    try:
        yield server
    finally:
        server.cleanup()
