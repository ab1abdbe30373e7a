"""A real Kubernetes control plane (etcd + kube-apiserver v1.20 + controller manager +
scheduler, no kubelet) for the whole test session, started by the project's own
scripts/k8s/start.sh. Binaries come from scripts/k8s/ensure-binaries.sh (built once
from Debian's source package, then cached); tests marked ``kubernetes`` are skipped,
with the reason, only when they are absent and cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetestkit import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts" / "k8s"
TOOLS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")


def _bin_dir() -> Path:
    return Path(os.environ.get("HETEROSCALE_KUBE_BIN", "/root/.cache/heteroscale/kube-bin"))


def _binaries_present(bin_dir: Path) -> bool:
    return shutil.which("etcd") is not None and all((bin_dir / t).exists() for t in TOOLS)


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    bin_dir = _bin_dir()
    if not _binaries_present(bin_dir):
        result = subprocess.run(
            ["bash", str(SCRIPTS / "ensure-binaries.sh"), str(bin_dir)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not _binaries_present(bin_dir):
            pytest.skip(
                f"no Kubernetes binaries in {bin_dir} and scripts/k8s/ensure-binaries.sh could not build them: "
                + (result.stderr.strip().splitlines() or ["(no output)"])[-1]
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
