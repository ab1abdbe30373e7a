"""Leader election on a real API server: of two candidates exactly one holds the
Lease, a standby takes over only after the holder stopped renewing, and of two
reconcile loops racing for it exactly one acts."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from kubetestkit import ControlPlane, ensure_namespace, make_desired_state

from reconciler.apply.kubeclient import leases_path
from reconciler.apply.lease import LeaseElector, parse_lease
from reconciler.loop import ReconcileLoop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import FixedAutoscaler, OneGroupPlacer, RecordingBackend, StaticMetrics

pytestmark = pytest.mark.kubernetes
NAMESPACE = "lease-tests"


def _race(electors: list[LeaseElector]) -> list[bool]:
    barrier = threading.Barrier(len(electors))
    results: list[bool] = [False] * len(electors)

    def contend(i: int) -> None:
        barrier.wait()
        results[i] = electors[i].try_acquire_or_renew()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(electors))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_of_two_candidates_racing_exactly_one_holds_the_lease(control_plane: ControlPlane) -> None:
    admin = control_plane.client()
    ensure_namespace(admin, NAMESPACE)
    for round_ in range(5):
        electors = [
            LeaseElector(control_plane.client(), NAMESPACE, f"race-{round_}", who)
            for who in ("a", "b")
        ]
        # First round: both create at once; second: both renew/acquire the existing one.
        assert sorted(_race(electors)) == [False, True]
        assert sorted(_race(electors)) == [False, True]
        assert [e.is_leader() for e in electors].count(True) == 1
        holder = parse_lease(admin.get(leases_path(NAMESPACE, f"race-{round_}"))).holder
        assert holder == next(e.identity for e in electors if e.is_leader())


def test_a_standby_takes_over_only_after_the_holder_stops_renewing(
    control_plane: ControlPlane,
) -> None:
    ensure_namespace(control_plane.client(), NAMESPACE)
    kwargs = {"lease_duration_s": 2, "renew_deadline_s": 1.0, "retry_period_s": 0.2}
    holder = LeaseElector(control_plane.client(), NAMESPACE, "takeover", "holder", **kwargs)
    standby = LeaseElector(control_plane.client(), NAMESPACE, "takeover", "standby", **kwargs)
    assert holder.try_acquire_or_renew()
    assert not standby.try_acquire_or_renew()
    # The holder goes silent (crashed): it stops acting after its renew deadline, and
    # the standby may take over only after a full lease duration.
    silent_since = time.monotonic()
    while not standby.try_acquire_or_renew():
        time.sleep(0.1)
    took_over_after = time.monotonic() - silent_since
    assert took_over_after >= 2 - 0.25
    assert not holder.is_leader(), "the old holder stopped acting before the standby started"
    lease = parse_lease(control_plane.client().get(leases_path(NAMESPACE, "takeover")))
    assert lease.holder == "standby" and lease.transitions == 1
    # Release hands over at once.
    standby.release()
    assert holder.try_acquire_or_renew()


def test_two_loops_racing_for_the_lease_exactly_one_acts(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    ensure_namespace(control_plane.client(), NAMESPACE)
    state = make_desired_state(tmp_path, "loop-race")
    loops, backends, electors = [], [], []
    for who in ("replica-a", "replica-b"):
        elector = LeaseElector(
            control_plane.client(), NAMESPACE, "loop-race", who, retry_period_s=0.1
        )
        backend = RecordingBackend("loop-race")
        loops.append(
            ReconcileLoop(
                load_desired=lambda: state,
                backend_for=lambda spec, b=backend: b,
                metrics_for=lambda spec: StaticMetrics(),
                autoscaler=FixedAutoscaler(),
                placer=OneGroupPlacer(),
                is_leader=elector.is_leader,
            )
        )
        backends.append(backend)
        electors.append(elector)
    for elector in electors:
        elector.start()
    try:
        deadline = time.monotonic() + 10
        while not any(e.is_leader() for e in electors) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop = threading.Event()
        threads = [
            threading.Thread(target=lambda lp=lp: [lp.run_cycle() for _ in range(5)])
            for lp in loops
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
    finally:
        for elector in electors:
            elector.stop(release=True)
    acted = [len(b.applied) for b in backends]
    assert sorted(acted) == [0, 5], acted
    standby = backends[acted.index(0)]
    assert len(standby.diffed) == 5, "the standby keeps planning (dry run) without acting"
