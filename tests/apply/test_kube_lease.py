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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import (
    RecordingBackend,
    recording_loop,
)

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


@pytest.mark.fault
def test_a_deleted_lease_is_taken_over_only_as_an_expired_one_is(
    control_plane: ControlPlane,
) -> None:
    """Someone deletes the Lease while it has a holder: the standby that saw it held
    waits until the holder it saw would have expired (a lease duration after its last
    renewal it saw), by which time the holder has stopped acting (its renew deadline is
    shorter), instead of creating the Lease at once while the old leader still acts
    until its next round (two writers, a hostile prober). The holder itself, still
    leading, takes its own Lease back at once."""
    admin = control_plane.client()
    ensure_namespace(admin, NAMESPACE)
    kwargs = {"lease_duration_s": 2, "renew_deadline_s": 1.0, "retry_period_s": 0.2}
    holder = LeaseElector(control_plane.client(), NAMESPACE, "deleted", "holder", **kwargs)
    standby = LeaseElector(control_plane.client(), NAMESPACE, "deleted", "standby", **kwargs)
    assert holder.try_acquire_or_renew() and not standby.try_acquire_or_renew()
    admin.request("DELETE", leases_path(NAMESPACE, "deleted"))
    assert holder.try_acquire_or_renew(), "the leader takes its own Lease back at once"
    assert not standby.try_acquire_or_renew()
    admin.request("DELETE", leases_path(NAMESPACE, "deleted"))
    last_renewal_seen = time.monotonic()
    assert not standby.try_acquire_or_renew(), "the holder it saw may still act"
    while not standby.try_acquire_or_renew():
        time.sleep(0.1)
    assert time.monotonic() - last_renewal_seen >= 2 - 0.25
    assert not holder.is_leader(), "the old holder stopped acting before the standby started"
    assert parse_lease(admin.get(leases_path(NAMESPACE, "deleted"))).holder == "standby"
    # A candidate that never saw a holder (a fresh replica) creates a missing Lease.
    admin.request("DELETE", leases_path(NAMESPACE, "deleted"))
    fresh = LeaseElector(control_plane.client(), NAMESPACE, "deleted", "fresh", **kwargs)
    assert fresh.try_acquire_or_renew()


@pytest.mark.fault
def test_a_replica_that_no_longer_holds_the_lease_does_not_write_its_state_over_the_leaders(
    control_plane: ControlPlane,
) -> None:
    """Two state stores of one cluster, the old leader's still leading by its own clock
    (its last renewal within the renew deadline) while the Lease names the other: on
    the conflict with the new leader's write it asks the API server, finds it does not
    hold the Lease, and leaves the new leader's state standing (it wrote over it,
    re-reading after each conflict)."""
    from reconciler.apply.statestore import ConfigMapStateStore
    from reconciler.durable import DurableState
    from reconciler.policy.base import PolicyHistory, Recommendation

    admin = control_plane.client()
    ensure_namespace(admin, NAMESPACE)
    old = LeaseElector(control_plane.client(), NAMESPACE, "state-fence", "old")
    new = LeaseElector(control_plane.client(), NAMESPACE, "state-fence", "new")
    assert old.try_acquire_or_renew()
    stores = {
        who: ConfigMapStateStore(
            control_plane.client(),
            NAMESPACE,
            who,
            is_leader=elector.is_leader,
            holds_lease=elector.holds_lease,
        )
        for who, elector in (("old", old), ("new", new))
    }

    def state(prefill: int) -> DurableState:
        history = PolicyHistory(recommendations=(Recommendation(100.0, prefill, 4),))
        return DurableState("fenced", 100.0, histories={"svc": history})

    assert stores["old"].save(state(1))
    assert stores["new"].load("fenced") is not None  # both have read the object now
    # The Lease passes to "new" (the old holder released nothing: it is merely late).
    lease = admin.get(leases_path(NAMESPACE, "state-fence"))
    lease["spec"]["holderIdentity"] = "new"
    admin.request("PUT", leases_path(NAMESPACE, "state-fence"), body=lease)
    assert new.try_acquire_or_renew() and old.is_leader()
    assert stores["new"].save(state(7))
    assert not stores["old"].save(state(1)), "a conflict, and the Lease is the other's"
    (history,) = stores["new"].load("fenced").histories.values()  # type: ignore[union-attr]
    assert history.recommendations[0].prefill == 7


@pytest.mark.fault
def test_a_replica_whose_lease_another_holds_does_not_apply_while_its_clock_says_it_leads(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's own clock says it leads (its last renewal within the renew
    deadline) while the Lease on the API server names another replica (one that took
    it over, an operator who moved it): right before applying, the cycle asks the API
    server, finds the Lease another's, and only reports, as a standby does. Back as the
    holder, it applies again."""
    admin = control_plane.client()
    ensure_namespace(admin, NAMESPACE)
    state = make_desired_state(tmp_path, "apply-fence")
    elector = LeaseElector(control_plane.client(), NAMESPACE, "apply-fence", "old")
    backend = RecordingBackend("apply-fence")
    loop = recording_loop(state, backend, elector.is_leader)
    assert elector.try_acquire_or_renew()
    loop.run_cycle()
    assert len(backend.applied) == 1
    lease = admin.get(leases_path(NAMESPACE, "apply-fence"))
    lease["spec"]["holderIdentity"] = "new"
    admin.request("PUT", leases_path(NAMESPACE, "apply-fence"), body=lease)
    assert elector.is_leader()
    with caplog.at_level("WARNING"):
        loop.run_cycle()
    assert len(backend.applied) == 1, "applied while the Lease named another replica"
    assert len(backend.diffed) >= 1, "it still plans and reports, as a standby"
    assert any("does not name this replica" in r.getMessage() for r in caplog.records)
    lease = admin.get(leases_path(NAMESPACE, "apply-fence"))
    lease["spec"]["holderIdentity"] = "old"
    admin.request("PUT", leases_path(NAMESPACE, "apply-fence"), body=lease)
    loop.run_cycle()
    assert len(backend.applied) == 2


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
        loops.append(recording_loop(state, backend, elector.is_leader))
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
