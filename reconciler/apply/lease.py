"""Leader election through a coordination.k8s.io/v1 Lease, so two replicas of the
reconciler never both act.

The algorithm is client-go's ``leaderelection`` (which the Kubernetes controllers
use): a candidate takes the Lease when it is free or its holder has not renewed it
within ``leaseDurationSeconds``, measured on the candidate's *own* clock from when
it last saw the record change (so clock skew between replicas does not matter);
every write carries the ``resourceVersion`` it read, so of two candidates racing for
the same Lease exactly one write succeeds and the other gets 409. The leader renews
every ``retry_period_s`` and stops acting when it has not renewed for
``renew_deadline_s`` (shorter than the lease duration, so it stops before anyone
else may start).

``lease_decision`` is the pure part; ``LeaseElector`` does the I/O.

Errors never end the election thread: any error of a round (a temporary one, but also
a missing lease namespace, a 403 from RBAC, a bug) is logged, counted by kind
(``error_counts``) and retried with a bounded, jittered exponential backoff (never
slower than ``retry_period_s`` while this replica still leads, so it keeps trying to
renew within its deadline). ``health_problem`` reports when no round has reached a
valid decision (renewed, acquired, or saw a live holder) for ``unhealthy_after_s``
(three lease durations by default): the loop's ``/healthz`` then fails, so Kubernetes
restarts a replica stuck without a working election instead of it idling as a
standby forever.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from reconciler.apply.kubeclient import (
    KubeApiError,
    KubeClient,
    NotFound,
    ResourceConflict,
    leases_path,
)
from reconciler.dns1123 import MAX_SUBDOMAIN
from reconciler.errors import TemporaryError
from reconciler.text_safety import cut

log = logging.getLogger("heteroscale.lease")


@dataclass(frozen=True)
class LeaseRecord:
    holder: str
    duration_s: int
    acquire_time: str | None
    renew_time: str | None
    transitions: int


def format_micro_time(at_s: float) -> str:
    return dt.datetime.fromtimestamp(at_s, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_lease(obj: dict) -> LeaseRecord:
    spec = obj.get("spec") or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        duration_s=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def parse_micro_time(text: str | None) -> float | None:
    """Seconds since the epoch of a Lease's MicroTime (``2024-05-01T12:00:00.123456Z``;
    whole seconds and an explicit offset are accepted too); None when absent or not
    a time."""
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def read_lease(client: KubeClient, namespace: str, name: str) -> LeaseRecord | None:
    """The Lease's record, None when there is no such Lease (API errors propagate)."""
    try:
        return parse_lease(client.get(leases_path(namespace, name)))
    except NotFound:
        return None


def live_holder(record: LeaseRecord | None, now_s: float) -> str | None:
    """Who holds the Lease at ``now_s`` (wall clock), judged from the record alone;
    None when nobody does (no Lease, released, or not renewed within its duration).

    For a one-shot reader (``heteroscale apply``), which cannot watch the record for a
    lease duration as a candidate does (``lease_decision``), so it trusts
    ``renewTime``: clock skew between it and the holder shifts the expiry by the
    skew. A holder without a readable ``renewTime`` counts as live (never assume a
    leader is gone without evidence)."""
    if record is None or not record.holder:
        return None
    renewed = parse_micro_time(record.renew_time)
    if renewed is not None and now_s > renewed + record.duration_s:
        return None
    return record.holder


LeaseAction = Literal["acquire", "renew", "wait"]


def shown_holder(holder: str) -> str:
    """A holder identity as a report quotes it: anyone who may edit the Lease writes
    it, so it is cut at the length of the Pod name it is in practice (10 KB of it
    flooded ``status``); the line that prints it escapes it (``text_safety.visible``)."""
    return cut(holder, MAX_SUBDOMAIN)


def lease_decision(
    record: LeaseRecord, identity: str, observed_at_s: float, now_s: float
) -> LeaseAction:
    """What a candidate does with a Lease it read: renew its own, take a free or
    expired one, or wait for a live holder. ``observed_at_s`` is when this candidate
    first saw the current record (its own clock)."""
    if record.holder == identity:
        return "renew"
    if not record.holder:
        return "acquire"
    if now_s >= observed_at_s + record.duration_s:
        return "acquire"
    return "wait"


class LeaseElector:
    """One candidate for one Lease."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration_s: int = 15,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_backoff_s: float | None = None,
        unhealthy_after_s: float | None = None,
        rng: random.Random | None = None,
    ):
        """``max_backoff_s`` caps the wait between failed rounds (default: one lease
        duration); ``unhealthy_after_s`` is how long without a valid decision makes
        ``health_problem`` report (default: three lease durations)."""
        if not renew_deadline_s < lease_duration_s:
            raise ValueError("renew_deadline_s must be shorter than lease_duration_s")
        # Refused here, once (InvalidObjectName): a round swallows its errors to keep
        # the election alive, so a bad name would otherwise fail every round for ever.
        leases_path(namespace, name)
        self.max_backoff_s = float(lease_duration_s) if max_backoff_s is None else max_backoff_s
        self.unhealthy_after_s = (
            3.0 * lease_duration_s if unhealthy_after_s is None else unhealthy_after_s
        )
        if self.max_backoff_s < retry_period_s or self.unhealthy_after_s <= 0:
            raise ValueError(
                "max_backoff_s must be at least retry_period_s and unhealthy_after_s positive"
            )
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.transitions_seen = 0
        self._observed: LeaseRecord | None = None
        self._observed_at_s = 0.0
        self._renewed_at_s: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = rng or random.Random()
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self._error_counts: dict[str, int] = {}
        # A fresh elector has until unhealthy_after_s to reach its first decision.
        self._decided_at_s = clock()

    # ----------------------------------------------------------------------- state

    def is_leader(self) -> bool:
        """True while the last successful renewal is within the renew deadline."""
        with self._lock:
            renewed = self._renewed_at_s
        return renewed is not None and self.clock() - renewed < self.renew_deadline_s

    def holds_lease(self) -> bool:
        """Whether this replica leads by the Lease as the API server holds it now (one
        read), for a write that would overwrite another's: ``is_leader`` is this
        replica's own clock (its last renewal within the renew deadline), and another
        replica may hold the Lease since (one that took it over while this one had not
        yet run its next round). False when it cannot be read: no overwrite on a guess."""
        if not self.is_leader():
            return False
        try:
            record = parse_lease(self.client.get(leases_path(self.namespace, self.name)))
        except Exception:  # any failure: not known to lead, so no overwrite
            return False
        return record.holder == self.identity

    def error_counts(self) -> dict[str, int]:
        """Failed rounds since construction, by error kind (the exception's class)."""
        with self._lock:
            return dict(self._error_counts)

    def decision_age_s(self) -> float:
        """Seconds since the last valid lease decision (or since construction)."""
        with self._lock:
            decided = self._decided_at_s
        return self.clock() - decided

    def health_problem(self) -> str | None:
        """Why this replica's election is stuck, or None while decisions keep coming."""
        age = self.decision_age_s()
        if age <= self.unhealthy_after_s:
            return None
        return (
            f"no valid decision on Lease {self.namespace}/{self.name} for {age:.0f} s "
            f"(> {self.unhealthy_after_s:g} s): {self.last_error or 'no round completed'}"
        )

    def next_wait_s(self) -> float:
        """The pause before the next round: ``retry_period_s`` after a decision; after
        failures a doubling backoff capped at ``max_backoff_s`` (at ``retry_period_s``
        while still leading), jittered down by up to half so replicas that failed
        together do not retry in lockstep."""
        failures = self.consecutive_failures
        if failures == 0:
            return self.retry_period_s
        cap = self.retry_period_s if self.is_leader() else self.max_backoff_s
        base = min(cap, self.retry_period_s * 2 ** min(failures - 1, 30))
        return base * (0.5 + 0.5 * self._rng.random())

    def _spec(self, record: LeaseRecord | None, now_wall_s: float) -> dict:
        taking_over = record is None or record.holder != self.identity
        transitions = (record.transitions if record else 0) + (
            1 if record and taking_over and record.holder else 0
        )
        stamp = format_micro_time(now_wall_s)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_duration_s,
            "acquireTime": stamp if taking_over or record is None else record.acquire_time,
            "renewTime": stamp,
            "leaseTransitions": transitions,
        }

    # ------------------------------------------------------------------------- I/O

    def try_acquire_or_renew(self) -> bool:
        """One election round; True when this candidate holds the Lease afterwards.
        Never raises: a failed round is recorded (see the module docstring) and leaves
        leadership to the renew deadline."""
        try:
            return self._round()
        except Exception as exc:  # any error: the election thread must outlive it
            self._failed(exc)
            return self.is_leader()

    def _failed(self, exc: Exception) -> None:
        kind = type(exc).__name__
        with self._lock:
            self._error_counts[kind] = self._error_counts.get(kind, 0) + 1
            self.consecutive_failures += 1
            failures = self.consecutive_failures
        self.last_error = f"{kind}: {exc}"
        expected = isinstance(exc, KubeApiError | TemporaryError | OSError)
        log.warning(
            f"Lease {self.namespace}/{self.name}: round failed ({failures} in a row), "
            f"retrying with backoff: {self.last_error}",
            exc_info=not expected,  # a traceback only for what the API did not say
            extra={
                "event": "lease_error",
                "error_kind": kind,
                "failures": failures,
                "lease": f"{self.namespace}/{self.name}",
            },
        )

    def _decided(self, now: float) -> None:
        """A valid decision: the round read or wrote the Lease and knows who leads."""
        with self._lock:
            failures, self.consecutive_failures = self.consecutive_failures, 0
            self._decided_at_s = now
        if failures:
            log.info(
                f"Lease {self.namespace}/{self.name}: election works again after "
                f"{failures} failed round(s)",
                extra={"event": "lease_recovered", "failures": failures},
            )

    def _round(self) -> bool:
        now = self.clock()
        path = leases_path(self.namespace, self.name)
        try:
            current = self.client.get(path)
        except NotFound:
            if self._holder_may_still_lead(now):
                return self._lost()
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, self.wall_clock()),
            }
            try:
                self.client.request("POST", leases_path(self.namespace), body=body)
            except ResourceConflict:  # AlreadyExists: someone else created it first
                return self._lost()
            return self._won(now)
        record = parse_lease(current)
        if record != self._observed:
            self._observed, self._observed_at_s = record, now
        action = lease_decision(record, self.identity, self._observed_at_s, now)
        if action == "wait":
            return self._lost()
        current["spec"] = self._spec(record, self.wall_clock())
        try:
            self.client.request("PUT", path, body=current)  # carries resourceVersion
        except ResourceConflict:
            return self._lost()
        if action == "acquire":
            self.transitions_seen += 1
        return self._won(now)

    def _holder_may_still_lead(self, now: float) -> bool:
        """Whether another replica this one saw holding the Lease may still act as the
        leader though the Lease is gone (deleted by hand, or by a restore): it does
        until its own renew deadline, and a Lease taken at once had two replicas writing
        for up to a round (a hostile prober: the old leader overwrote the new one's state
        five times). So a missing Lease is taken as an expired one is: once the last
        holder seen has not renewed for a lease duration."""
        seen = self._observed
        if self.is_leader() or seen is None or not seen.holder or seen.holder == self.identity:
            return False
        return now < self._observed_at_s + seen.duration_s

    def _won(self, now: float) -> bool:
        with self._lock:
            self._renewed_at_s = now
        self.last_error = None
        self._decided(now)
        return True

    def _lost(self) -> bool:
        """Another candidate holds the Lease (or won the race): a valid decision too."""
        with self._lock:
            self._renewed_at_s = None
        self._decided(self.clock())
        return False

    def release(self) -> None:
        """Give the Lease up (on shutdown), so a standby takes over at once."""
        if not self.is_leader():
            return
        path = leases_path(self.namespace, self.name)
        try:
            current = self.client.get(path)
            if parse_lease(current).holder == self.identity:
                current["spec"]["holderIdentity"] = ""
                self.client.request("PUT", path, body=current)
        except Exception as exc:  # shutdown must finish; the Lease then simply expires
            log.warning(
                f"Lease {self.namespace}/{self.name}: not released ({type(exc).__name__}: "
                f"{exc}); a standby takes over when it expires",
                extra={"event": "lease_release_failed"},
            )
        with self._lock:
            self._renewed_at_s = None

    # ---------------------------------------------------------------- background

    def start(self) -> None:
        """Renew (or try to acquire) every ``retry_period_s`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                self.try_acquire_or_renew()
                self._stop.wait(self.next_wait_s())

        self._thread = threading.Thread(target=run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if release:
            self.release()
