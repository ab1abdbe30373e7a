"""One slow cluster holds no other, against the real API server: a loop wired as
``heteroscale run`` wires it (``build_loop``: a kubeconfig context per cluster, a
watch cache, clusters at once within a deadline) over two clusters, one on the
scripted fake API server answering slowly within every bound of the client (short
list pages with fresh continue tokens, each well within the per-request timeouts, for
as long as the test likes: the whole list may take five minutes), the other on the
real kube-apiserver. The real cluster's Deployments are created and then scaled within
its cycles while the other cluster's first cycle still drags; that one is reported
overdue each loop cycle, never started twice, and accounted when it ends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fakeapiserver import FakeApiServer, Reply
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    list_deployments,
    make_desired_state,
)

from reconciler.apply.kubeclient import KubeClient
from reconciler.commands.reconcile import build_loop, cycle_settings
from reconciler.loop import ReconcileLoop

pytestmark = [pytest.mark.kubernetes, pytest.mark.fault]

SLOW, REAL = "conc-east", "conc-west"  # in turn, the slow one came first
DEADLINE_S = 8.0  # the real cluster's cycle ends well within it, even on a busy machine
PAGE_S = 0.2  # each page of the slow API server's lists
HELD_S = 25.0  # released by then whatever happens: in turn, the real cluster waits this long


def _metric(loop: ReconcileLoop, name: str, **labels: str) -> float:
    value = loop.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _replicas(client: KubeClient, namespace: str) -> dict[str, int]:
    """Replicas of our Deployments per role."""
    out = {"prefill": 0, "decode": 0}
    for d in list_deployments(client, namespace).values():
        out[d["metadata"]["labels"]["heteroscale.io/role"]] += d["spec"]["replicas"]
    return out


@pytest.fixture
def slow_apiserver() -> Iterator[tuple[FakeApiServer, threading.Event]]:
    """Lists that never end while the event is unset: a page with a fresh continue
    token every PAGE_S; once set, every request is refused (403)."""
    released = threading.Event()
    page = 0
    lock = threading.Lock()

    def script(method: str, _path: str, _index: int) -> Reply:
        nonlocal page
        if released.wait(PAGE_S) or method != "GET":
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403}
            return Reply(status=403, body=json.dumps({**body, "reason": "Forbidden"}).encode())
        with lock:
            page += 1
            token = f"page-{page}"
        metadata = {"continue": token, "resourceVersion": "1"}
        return Reply(body=json.dumps({"kind": "List", "metadata": metadata, "items": []}).encode())

    server = FakeApiServer(script)
    timer = threading.Timer(HELD_S, released.set)
    timer.start()
    try:
        yield server, released
    finally:
        released.set()
        timer.cancel()
        server.close()


def _kubeconfig(control_plane: ControlPlane, fake: FakeApiServer, path: Path) -> Path:
    """The control plane's kubeconfig plus a context ``slow`` for the fake."""
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"].append({"name": "slow", "cluster": {"server": fake.url}})
    config["users"].append({"name": "slow", "user": {"token": "t"}})
    config["contexts"].append({"name": "slow", "context": {"cluster": "slow", "user": "slow"}})
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_cluster_on_a_slow_api_server_holds_no_other_clusters_cycle(
    control_plane: ControlPlane,
    tmp_path: Path,
    slow_apiserver: tuple[FakeApiServer, threading.Event],
) -> None:
    fake, released = slow_apiserver
    repo = tmp_path / "repo"
    make_desired_state(repo, SLOW, services=("lagging",), affinity="cluster")
    state = make_desired_state(repo, REAL, services=("serving",), affinity="cluster")
    slow_file = repo / "clusters" / f"{SLOW}.yaml"
    slow_file.write_text(slow_file.read_text() + "kube_context: slow\n")
    client = control_plane.client()
    ensure_namespace(client, REAL)
    create_nodes(client, state.clusters[REAL])
    settings = cycle_settings(
        repo=repo,
        kubeconfig=str(_kubeconfig(control_plane, fake, tmp_path / "kubeconfig")),
        placer="greedy",
        prometheus_url=None,  # every service holds: from nothing, at its floor
        drain_window=0.0,
    )
    loop, wiring = build_loop(
        settings,
        dry_run=False,
        interval_s=1.0,
        watch=True,
        cluster_workers=4,
        cluster_deadline_s=DEADLINE_S,
    )
    assert not wiring.simulated
    try:
        # The first cycle: the real cluster's Deployments are made within its cycle.
        started = time.monotonic()
        first = loop.run_cycle()
        took = time.monotonic() - started
        slow, real = first.clusters
        assert real.cluster == REAL and real.outcome == "ok" and real.applied, real.error
        assert real.duration_s < DEADLINE_S and took < DEADLINE_S + 2, took
        floor = _replicas(client, REAL)
        assert floor["prefill"] >= 1 and floor["decode"] >= 1, floor
        assert slow.cluster == SLOW and slow.outcome == "error" and slow.error is not None
        assert slow.error.startswith(f"CycleOverdue: still running after {DEADLINE_S:.0f}.")
        assert fake.requests, "the slow cluster's reads were under way"

        # A reviewed change raises the floor: the real cluster is scaled in its next
        # cycle, while the slow cluster's first cycle still drags.
        policy = repo / "policies" / "serving.yaml"
        policy.write_text(
            policy.read_text().replace(
                "template: templates/decode.yaml, min_instances: 1",
                "template: templates/decode.yaml, min_instances: 3",
            )
        )
        started = time.monotonic()
        second = loop.run_cycle()
        assert time.monotonic() - started < DEADLINE_S, "nothing waited for the slow cluster"
        slow, real = second.clusters
        assert real.outcome == "ok" and real.applied and real.has_changes, real.error
        scaled = _replicas(client, REAL)
        assert scaled["decode"] >= 3 > floor["decode"], (floor, scaled)
        assert slow.outcome == "error" and "still running after" in (slow.error or "")
        # Never two cycles of one cluster: one thread, one cycle in flight.
        threads = [t for t in threading.enumerate() if t.name == f"heteroscale-cycle-{SLOW}"]
        assert len(threads) == 1
        assert _metric(loop, "heteroscale_errors_total", cluster=SLOW, kind="CycleOverdue") == 2
        assert _metric(loop, "heteroscale_cycle_running_seconds", cluster=SLOW) > DEADLINE_S
        assert _metric(loop, "heteroscale_cycles_total", cluster=REAL, outcome="ok") == 2
        assert not released.is_set(), "the slow cluster dragged throughout"

        # The slow API server refuses from now on: the late cycle ends, is accounted.
        released.set()
        deadline = time.monotonic() + 30
        while loop.runs is not None and loop.runs.ages():
            assert time.monotonic() < deadline, "the slow cluster's cycle never ended"
            time.sleep(0.1)
        third = loop.run_cycle()
        (late,) = third.finished_late
        assert late.cluster == SLOW and late.outcome == "error" and not late.applied
        assert "Forbidden" in (late.error or ""), late.error
        assert late.duration_s > DEADLINE_S
        # Started again once its cycle ended (the first failure retries at once).
        slow, real = third.clusters
        assert slow.outcome == "error" and (slow.error or "").startswith("Forbidden")
        assert _metric(loop, "heteroscale_cycles_total", cluster=SLOW, outcome="error") == 2
        assert real.outcome == "ok" and not real.has_changes
    finally:
        loop.stop_cycles(wait_s=10)
        for backend in loop.backends.values():
            backend.close()  # type: ignore[attr-defined]
