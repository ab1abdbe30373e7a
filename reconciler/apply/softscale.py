"""Soft scale-in, as a pure function of one workload's live state.

An instance chosen for removal first leaves service discovery but keeps running;
it is deleted only after an observation window in which the service's SLOs held,
and put back at once (no cold start) if they did not, or if the service needs it
again. The mechanism, chosen to work on Kubernetes 1.20 (no pod-deletion-cost):

- The Deployment's selector includes ``heteroscale.io/serving: "true"``, the label
  the serving router selects on. *Draining* a Pod is one patch: the label flips to
  ``"false"`` and its ownerReference is dropped, so it leaves the router and its
  ReplicaSet at once and keeps running as a bare Pod; the Deployment's replicas then
  drop by one. (Relabel first, shrink second: the ReplicaSet may briefly start a
  replacement, which it deletes again as the newest unready Pod; capacity is never
  below the target.) The drain time and the Deployment it came from are annotations
  on the Pod, so a drain survives restarts of the reconciler.
- *Putting back* is the reverse: replicas up first, then, once the Deployment
  controller has passed them on to the ReplicaSet (``savedplan.await_rollout``), the
  label flips back and the ReplicaSet adopts the Pod (only when it still runs the
  current template). Without that wait a ReplicaSet still at the old replicas adopts
  the Pod and deletes a serving one to make room.
- A restart between a drain and its shrink leaves the drained Pods drained (their
  annotations survive) and the Deployment at the old replicas, so the ReplicaSet
  replaces them; the next cycle lowers replicas without draining again while the
  replacements are still starting (the ReplicaSet removes unready Pods first), and
  the first drained Pods keep their drain time (tested in
  ``tests/apply/test_kube_apply.py``, fault suite).
- *Finishing* deletes a drained Pod whose window passed while the SLOs held.
- Pods that are not ready (still starting, or unscheduled) carry no traffic: they
  are removed by lowering replicas alone (the ReplicaSet deletes unready Pods
  first), without a window.

Drained Pods are not capacity: the observer reports them as ``draining``, and the
Deployment's replicas count only serving instances, so the plan's numbers and the
Deployment's ``spec.replicas`` are the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from reconciler.desired.models import ServicePolicy
from reconciler.state import ServiceMetrics

SloStatus = Literal["held", "broken", "unknown"]


def slo_status(policy: ServicePolicy, metrics: ServiceMetrics | None, now_s: float) -> SloStatus:
    """Did the service meet its TTFT and TBT objectives at this moment? ``unknown``
    when either signal is missing, stale or not finite."""
    if metrics is None:
        return "unknown"
    max_age_s = policy.scaling.metric_max_age_s
    ttft, tbt = metrics.ttft, metrics.tbt
    if (
        ttft is None
        or tbt is None
        or not ttft.is_usable(now_s, max_age_s)
        or not tbt.is_usable(now_s, max_age_s)
    ):
        return "unknown"
    if ttft.value > policy.slo.ttft_ms or tbt.value > policy.slo.tbt_ms:
        return "broken"
    return "held"


@dataclass(frozen=True)
class PodView:
    """What soft scale-in needs to know about one Pod."""

    name: str
    ready: bool
    created: str  # RFC 3339; newer Pods are drained first
    template_hash: str
    drained_at_s: float | None = None


@dataclass(frozen=True)
class ScalePlan:
    """What to do with one workload this cycle (all names are Pod names)."""

    replicas: int  # spec.replicas to apply (0 with ``delete_workload``)
    put_back: tuple[str, ...] = ()
    drain: tuple[str, ...] = ()
    finish: tuple[str, ...] = ()
    delete_workload: bool = False
    notes: tuple[str, ...] = ()

    @property
    def pod_actions(self) -> int:
        return len(self.put_back) + len(self.drain) + len(self.finish)


def plan_scale(
    *,
    desired: int,
    live_replicas: int | None,
    serving: Sequence[PodView],
    drained: Sequence[PodView],
    template_hash: str | None,
    slo: SloStatus,
    now_s: float,
    window_s: float,
) -> ScalePlan:
    """Soft scale-in for one workload.

    ``desired`` is the plan's instance count (0: the workload should go);
    ``live_replicas`` its current ``spec.replicas`` (None: it does not exist);
    ``serving`` its Pods in service; ``drained`` Pods drained from it earlier;
    ``template_hash`` the rendered template's hash (None when not desired).
    """
    if desired < 0 or (live_replicas is not None and live_replicas < 0):
        raise ValueError("instance counts cannot be negative")
    live = live_replicas or 0
    notes: list[str] = []
    eligible_back = sorted(
        (p for p in drained if template_hash is not None and p.template_hash == template_hash),
        key=lambda p: (-(p.drained_at_s or 0.0), p.name),  # most recently drained first
    )

    if slo == "broken":
        # Put back every drained instance that can serve, hold any scale-in.
        put_back = (
            tuple(p.name for p in eligible_back) if live_replicas is not None or desired > 0 else ()
        )
        replicas = max(desired, live + len(put_back))
        if desired < live:
            notes.append(f"scale-in {live} -> {desired} held: SLO not met")
        if put_back:
            notes.append(f"{len(put_back)} drained instance(s) put back: SLO not met")
        return ScalePlan(replicas=replicas, put_back=put_back, notes=tuple(notes))

    put_back_list: list[str] = []
    drain: list[str] = []
    if desired > live:
        want = desired - live
        put_back_list = [p.name for p in eligible_back[:want]]
    elif desired < live:
        reduce = live - desired
        # Unready (starting / unscheduled) Pods carry no traffic: the ReplicaSet removes
        # them first when replicas drop, so only the rest needs a soft drain.
        unready = sum(1 for p in serving if not p.ready)
        soft = max(0, reduce - unready)
        ready = sorted(
            (p for p in serving if p.ready), key=lambda p: (p.created, p.name), reverse=True
        )
        drain = [p.name for p in ready[:soft]]
        if soft > len(drain):
            notes.append(
                f"{soft - len(drain)} instance(s) removed without draining (no ready Pod to drain)"
            )

    finish: list[str] = []
    if slo == "held":
        for pod in drained:
            if pod.name in put_back_list:
                continue
            if pod.drained_at_s is not None and now_s - pod.drained_at_s >= window_s:
                finish.append(pod.name)
        if window_s <= 0:
            finish.extend(drain)
    elif drained or drain:
        notes.append("drained instances kept: SLO status unknown (no fresh TTFT/TBT)")
    waiting = [
        p
        for p in drained
        if p.name not in finish and p.name not in put_back_list and p.drained_at_s is not None
    ]
    if waiting and slo == "held":
        left_s = min(window_s - (now_s - (p.drained_at_s or now_s)) for p in waiting)
        notes.append(
            f"{len(waiting)} drained instance(s) deleted in {math.ceil(max(0.0, left_s))} s if SLOs hold"
        )
    return ScalePlan(
        replicas=desired,
        put_back=tuple(put_back_list),
        drain=tuple(drain),
        finish=tuple(sorted(finish)),
        delete_workload=desired == 0 and live_replicas is not None,
        notes=tuple(notes),
    )
