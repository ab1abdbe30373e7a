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
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from reconciler.apply.kubeclient import KubeClient, NotFound, ResourceConflict, leases_path
from reconciler.errors import TemporaryError


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


LeaseAction = Literal["acquire", "renew", "wait"]


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
    ):
        if not renew_deadline_s < lease_duration_s:
            raise ValueError("renew_deadline_s must be shorter than lease_duration_s")
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
        self.last_error: str | None = None

    # ----------------------------------------------------------------------- state

    def is_leader(self) -> bool:
        """True while the last successful renewal is within the renew deadline."""
        with self._lock:
            renewed = self._renewed_at_s
        return renewed is not None and self.clock() - renewed < self.renew_deadline_s

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
        """One election round; True when this candidate holds the Lease afterwards."""
        now = self.clock()
        path = leases_path(self.namespace, self.name)
        try:
            try:
                current = self.client.get(path)
            except NotFound:
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
        except TemporaryError as exc:
            self.last_error = str(exc)
            return self.is_leader()

    def _won(self, now: float) -> bool:
        with self._lock:
            self._renewed_at_s = now
        self.last_error = None
        return True

    def _lost(self) -> bool:
        with self._lock:
            self._renewed_at_s = None
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
        except (TemporaryError, NotFound):
            pass
        self._lost()

    # ---------------------------------------------------------------- background

    def start(self) -> None:
        """Renew (or try to acquire) every ``retry_period_s`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                self.try_acquire_or_renew()
                self._stop.wait(self.retry_period_s)

        self._thread = threading.Thread(target=run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if release:
            self.release()
