"""The autoscaling decision as data, and the interface every autoscaler implements.

An autoscaler is a pure function of one ``DecisionInput`` (policy, fleet, metrics,
history, now and the service's cluster): no I/O, no clock reads. ``history`` holds
what earlier cycles recommended; it is never mutated, a new one comes back inside
the ``Decision``.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.state import ServiceFleet, ServiceMetrics

Reason = Literal[
    "within_tolerance",  # observed/target inside the tolerance band: hold
    "scale_out",  # primary metric asks for more
    "scale_in",  # primary metric asks for less (after stabilisation)
    "latency_feedback",  # a TTFT/TBT tier fired
    "kv_cache_pressure",  # decode KV-cache usage above threshold
    "metrics_missing",  # missing/stale/NaN signal: hold current size
    "decision_failed",  # the autoscaler raised (a bug): hold current size (reconciler.cycle)
    "stabilised",  # a scale-in was held back by the window or cooldown
    "bounds",  # only min/max/ratio enforcement changed the size
    "baseline",  # a baseline autoscaler's own logic
]
# Reasons of a decision that could not size the service and held it where it runs;
# every other reason sized it. A review names a service whose decision moves between
# the two kinds: its counts may stay the same while it stops being sized.
UNSIZED_REASONS: frozenset[Reason] = frozenset({"metrics_missing", "decision_failed"})


@dataclass(frozen=True)
class Clamp:
    """A limit that changed the raw recommendation; names itself and its numbers."""

    name: str  # e.g. "max_step", "min_instances", "ratio_bound", "scale_in_window"
    role: str  # "prefill", "decode" or "both"
    before: int
    after: int
    detail: str  # e.g. "max step 4 instances or 100% of 6"

    def __str__(self) -> str:
        return f"{self.name}({self.role}: {self.before} -> {self.after}; {self.detail})"


@dataclass(frozen=True)
class Recommendation:
    """One earlier cycle's raw recommendation, kept for stabilisation windows."""

    at_s: float
    prefill: int
    decode: int


@dataclass(frozen=True)
class PolicyHistory:
    """What a service's autoscaler remembers between cycles (immutable)."""

    recommendations: tuple[Recommendation, ...] = ()
    last_change_at_s: float | None = None
    # Latency and KV-cache observations for windowed rules: (at_s, value).
    ttft_ms: tuple[tuple[float, float], ...] = ()
    tbt_ms: tuple[tuple[float, float], ...] = ()
    kv_usage: tuple[tuple[float, float], ...] = ()
    # The dynamic P/D ratio target (prefill/decode), when the policy moves it.
    dynamic_ratio: float | None = None
    extra: tuple[tuple[str, float], ...] = field(default=())
    # The planner's memory (``reconciler.policy.planner.PlannerMemory``): demand
    # forecasters, latency correction, last known request mix. Opaque to the rest.
    planner: object | None = None


@dataclass(frozen=True)
class Decision:
    """Target instances for one service, why, and every clamp that applied."""

    service: str
    prefill: int
    decode: int
    reason: Reason
    message: str  # one line with the numbers, for logs, reports and status
    clamps: tuple[Clamp, ...] = ()
    history: PolicyHistory = field(default_factory=PolicyHistory)

    def changes(self, fleet: ServiceFleet) -> bool:
        return self.prefill != fleet.prefill.active or self.decode != fleet.decode.active


@dataclass(frozen=True)
class DecisionInput:
    """Everything one decision reads: an autoscaler is a pure function of this."""

    policy: ServicePolicy
    fleet: ServiceFleet
    metrics: ServiceMetrics
    history: PolicyHistory
    now_s: float
    # The service's cluster (GPU catalogue and network), for autoscalers that size
    # from the performance model; None where none is known (such autoscalers then
    # size only from the policy's own targets, or hold).
    cluster: ClusterSpec | None = None

    def unpacked(
        self,
    ) -> tuple[ServicePolicy, ServiceFleet, ServiceMetrics, PolicyHistory, float]:
        """(policy, fleet, metrics, history, now_s), for code written over them."""
        return self.policy, self.fleet, self.metrics, self.history, self.now_s


def clamps_note(clamps: Sequence[Clamp]) -> str:
    """``"; clamps: "`` and the clamps, for the end of a decision's message ("" if none)."""
    return "; clamps: " + ", ".join(str(c) for c in clamps) if clamps else ""


def decided(
    service: str,
    counts: tuple[int, int],
    before: Sequence[int],
    reason: Reason,
    message: str,
    clamps: Sequence[Clamp],
    remembered: PolicyHistory,
    now_s: float,
) -> Decision:
    """The decision to run ``counts`` (prefill, decode) of ``service``, carrying
    ``remembered`` as the next cycle's history, its last change moved to ``now_s``
    when the counts differ from those ``before``. Every autoscaler ends here."""
    if counts[0] != before[0] or counts[1] != before[1]:
        remembered = replace(remembered, last_change_at_s=now_s)
    return Decision(
        service=service,
        prefill=counts[0],
        decode=counts[1],
        reason=reason,
        message=message,
        clamps=tuple(clamps),
        history=remembered,
    )


class _GcPause:
    """How many batches have the collector paused: several clusters' cycles decide at
    once (``reconciler.loop``, one thread per cluster), and the first to end must not
    start the collector under the others, nor a batch that began while another had
    paused it leave it paused for good."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches = 0
        self.was_enabled = False


_GC_PAUSE = _GcPause()


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while deciding a batch of services:
    decisions allocate many small frozen objects and no reference cycles, and
    collections triggered midway were the largest source of variance in a batch's time
    (and a third of the planner's for 1,000 services). Batches of several threads
    overlap: the collector runs again when the last of them ends, if it ran before
    the first began."""
    pause = _GC_PAUSE
    with pause.lock:
        if pause.batches == 0:
            pause.was_enabled = gc.isenabled()
            gc.disable()
        pause.batches += 1
    try:
        yield
    finally:
        with pause.lock:
            pause.batches -= 1
            if pause.batches == 0 and pause.was_enabled:
                gc.enable()


class Autoscaler(Protocol):
    """Anything that sizes a service: the planner, the paper's policy, every baseline.
    Every harness (the cycle, the simulator, the benchmarks) makes this one call."""

    name: str

    def decide(self, inputs: DecisionInput) -> Decision: ...
