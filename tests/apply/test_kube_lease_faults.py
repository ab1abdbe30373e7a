"""Fault: leader election that fails for a reason that is not temporary (the lease
namespace missing, a 403 from RBAC) on a real API server. The election thread must
stay alive, retry with backoff, count the errors in the loop's metrics, fail
``/healthz`` within its bound (so Kubernetes restarts the stuck replica), and recover
by itself once the namespace exists or the permission is granted.

The loop is wired as ``heteroscale run`` wires it: ``is_leader=elector.is_leader``.

And the Lease lost in the middle of an apply: the replica that lost it makes no further
write, a conflict's retry included, so it cannot write its stale decision over the new
leader's.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    grant_role,
    list_deployments,
    make_desired_state,
    service_account_client,
)

from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import KubeClient, leases_path
from reconciler.apply.lease import LeaseElector, parse_lease
from reconciler.desired.loader import DesiredState
from reconciler.loop import ReconcileLoop, serve_http

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import (
    FixedAutoscaler,
    OneGroupPlacer,
    RecordingBackend,
    StaticMetrics,
    recording_loop,
)

pytestmark = [pytest.mark.kubernetes, pytest.mark.fault]

UNHEALTHY_AFTER_S = 1.5
MAX_BACKOFF_S = 0.4
SLACK_S = 2.0  # one request to a loaded API server, and the poll interval


def _elector(client: KubeClient, namespace: str, who: str) -> LeaseElector:
    return LeaseElector(
        client,
        namespace,
        "fault",
        who,
        lease_duration_s=2,
        renew_deadline_s=1.0,
        retry_period_s=0.1,
        max_backoff_s=MAX_BACKOFF_S,
        unhealthy_after_s=UNHEALTHY_AFTER_S,
    )


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait_for_status(url: str, status: int, timeout_s: float) -> tuple[float, str]:
    """Poll ``url`` until it answers ``status``; the seconds it took and the body."""
    started = time.monotonic()
    while True:
        got, body = _get(url)
        if got == status:
            return time.monotonic() - started, body
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{url} still {got} after {timeout_s} s: {body}")
        time.sleep(0.05)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[tuple[LeaseElector, ThreadingHTTPServer]]]:
    """Started electors and their loops' HTTP servers, stopped after the test."""
    running: list[tuple[LeaseElector, ThreadingHTTPServer]] = []
    yield running
    for elector, server in running:
        elector.stop(release=True)
        server.shutdown()
        server.server_close()


def _serve(
    elector: LeaseElector,
    tmp_path: Path,
    running: list[tuple[LeaseElector, ThreadingHTTPServer]],
) -> tuple[ReconcileLoop, str]:
    state = make_desired_state(tmp_path, "lease-fault")
    backend = RecordingBackend("lease-fault")
    loop = recording_loop(state, backend, elector.is_leader)
    server = serve_http(loop, "127.0.0.1", 0)
    running.append((elector, server))
    host, port = server.server_address[:2]
    return loop, f"http://{host!s}:{port}"


def _assert_stuck_then_recovers(
    elector: LeaseElector,
    loop: ReconcileLoop,
    url: str,
    kind: str,
    repair: Callable[[], None],
) -> None:
    """Start the election, see it fail for ``kind`` without dying, see /healthz fail in
    time, ``repair()``, see it lead and /healthz pass again."""
    assert _get(url + "/healthz")[0] == 200  # a fresh elector is within its bound
    elector.start()
    took_s, body = _wait_for_status(url + "/healthz", 503, UNHEALTHY_AFTER_S + SLACK_S + 5)
    assert took_s <= UNHEALTHY_AFTER_S + SLACK_S, took_s
    assert kind in body and "no valid decision on Lease" in body, body
    failures_then = elector.error_counts()[kind]
    time.sleep(3 * MAX_BACKOFF_S)
    assert elector._thread is not None and elector._thread.is_alive()
    retried = elector.error_counts()[kind] - failures_then
    # Backed off to its cap by now: every wait lies in [cap / 2, cap] (jitter), so
    # 1.2 s hold 3 to 7 rounds; a hot loop at the 0.1 s retry period would hold 12.
    assert 1 <= retried <= 7, retried
    assert not elector.is_leader()
    status, metrics = _get(url + "/metrics")
    assert status == 200
    assert f'heteroscale_lease_errors_total{{kind="{kind}"}}' in metrics
    assert "heteroscale_lease_healthy 0.0" in metrics
    # The rest of the loop still runs (as a standby) while the election is stuck.
    result = loop.run_cycle()
    assert [c.outcome for c in result.clusters] == ["standby"]

    repair()
    took_s, body = _wait_for_status(url + "/healthz", 200, MAX_BACKOFF_S + SLACK_S + 5)
    assert took_s <= MAX_BACKOFF_S + SLACK_S, took_s
    assert body == "ok\n"
    deadline = time.monotonic() + SLACK_S
    while not elector.is_leader() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert elector.is_leader()
    assert "heteroscale_lease_healthy 1.0" in _get(url + "/metrics")[1]


def test_a_missing_lease_namespace_fails_healthz_in_time_and_recovers_once_created(
    control_plane: ControlPlane,
    tmp_path: Path,
    served: list[tuple[LeaseElector, ThreadingHTTPServer]],
) -> None:
    admin = control_plane.client()
    namespace = f"lease-missing-{uuid.uuid4().hex[:8]}"
    elector = _elector(control_plane.client(), namespace, "replica-a")
    loop, url = _serve(elector, tmp_path, served)
    _assert_stuck_then_recovers(
        elector, loop, url, "NotFound", lambda: ensure_namespace(admin, namespace)
    )
    lease = parse_lease(admin.get(leases_path(namespace, "fault")))
    assert lease.holder == "replica-a"


def _restricted_client(admin: KubeClient, namespace: str) -> KubeClient:
    """A ServiceAccount token that RBAC allows nothing on Leases (until granted)."""
    ensure_namespace(admin, namespace)
    return service_account_client(admin, namespace, "elector")


def _grant_leases(admin: KubeClient, namespace: str) -> None:
    rules = [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    grant_role(admin, namespace, "leases", "elector", rules)


def test_a_forbidden_lease_fails_healthz_in_time_and_recovers_once_granted(
    control_plane: ControlPlane,
    tmp_path: Path,
    served: list[tuple[LeaseElector, ThreadingHTTPServer]],
) -> None:
    admin = control_plane.client()
    namespace = f"lease-rbac-{uuid.uuid4().hex[:8]}"
    restricted = _restricted_client(admin, namespace)
    elector = _elector(restricted, namespace, "replica-b")
    loop, url = _serve(elector, tmp_path, served)
    _assert_stuck_then_recovers(
        elector, loop, url, "Forbidden", lambda: _grant_leases(admin, namespace)
    )
    lease = parse_lease(admin.get(leases_path(namespace, "fault")))
    assert lease.holder == "replica-b"


def _kube_loop(
    state: DesiredState, client: KubeClient, decide: tuple[int, int], is_leader: Callable[[], bool]
) -> ReconcileLoop:
    backend = KubernetesBackend(client, state=state, options=ApplyOptions(soft_scale_in_window_s=0))
    return ReconcileLoop(
        load_desired=lambda: state,
        backend_for=lambda spec: backend,
        metrics_for=lambda spec: StaticMetrics(),
        autoscaler=FixedAutoscaler(*decide),
        # The test cluster's H20 nodes are under the other switch.
        placer=OneGroupPlacer(gpu_type="h800"),
        clock=time.time,
        is_leader=is_leader,
    )


def test_a_replica_that_lost_the_lease_mid_apply_writes_nothing_more(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Leader A applies prefill 2 / decode 2; after its first write its Lease is lost
    and B, the new leader, applies 3 / 3. A wrote on: its next write met a 409 (B had
    written the object), was re-read and written again at A's 2, scaling B's prefill
    in without a drain (found by a hostile prober). A now asks before every write and
    stops at the first refusal, reporting what it did not write."""
    name = "lease-mid-apply"
    state = make_desired_state(tmp_path, name)
    admin = control_plane.client()
    ensure_namespace(admin, name)
    create_nodes(admin, state.clusters[name])

    def replicas() -> dict[str, int]:
        return {n: d["spec"]["replicas"] for n, d in list_deployments(admin, name).items()}

    first = _kube_loop(state, control_plane.client(), (1, 1), lambda: True).run_cycle()
    assert first.clusters[0].applied, first.clusters[0].error
    assert replicas() == {"svc-g0-p": 1, "svc-g0-d": 1}

    a_leads = [True]
    writes_after_loss: list[str] = []
    client_a = control_plane.client()
    real_apply = client_a.apply

    def apply_a(path: str, manifest: dict[str, object], **kwargs: object) -> dict[str, object]:
        if not kwargs.get("dry_run") and not a_leads[0]:
            writes_after_loss.append(path)
        answer = real_apply(path, manifest, **kwargs)  # type: ignore[arg-type]
        if not kwargs.get("dry_run") and a_leads[0]:
            # A's first write is made; its Lease is lost now (a partition, a pause).
            a_leads[0] = False
            b = _kube_loop(state, control_plane.client(), (3, 3), lambda: True).run_cycle()
            assert b.clusters[0].applied, b.clusters[0].error
            assert replicas() == {"svc-g0-p": 3, "svc-g0-d": 3}
        return answer

    client_a.apply = apply_a  # type: ignore[method-assign]
    a = _kube_loop(state, client_a, (2, 2), lambda: a_leads[0]).run_cycle()

    assert writes_after_loss == []
    assert replicas() == {"svc-g0-p": 3, "svc-g0-d": 3}
    outcome = a.clusters[0]
    assert outcome.diff is not None
    stopped = [o for o in outcome.diff.objects if any("not written" in n for n in o.notes)]
    assert stopped and all(o.action == "error" for o in stopped)
    assert any("no longer leads" in n for o in stopped for n in o.notes)
