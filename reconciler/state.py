"""Plain data that flows between the stages of one reconcile cycle.

These are the observed and planned sides; the desired side lives in
``reconciler.desired.models``. Everything here is a frozen dataclass so a cycle can
be recorded and replayed, and no stage can mutate another stage's input.

Vocabulary:
- a *role* is ``"prefill"`` or ``"decode"``;
- an *instance* is one serving engine replica of one role (``gpus_per_instance`` GPUs);
- a *deployment group* is the prefill and decode instances of one service that share
  one scheduling domain (an S1 or S2 switch, or the whole cluster for loose affinity),
  so the KV cache moves over RDMA. Within a group each role runs on one GPU type.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Literal, get_args

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")

# The paper's eight signals, plus KV-cache usage, the requests waiting in each role's
# queue and the mean inter-token gap (optional extra signals).
MetricName = Literal[
    "prefill_tps",
    "decode_tps",
    "ttft",
    "tbt",
    "prefill_gpu_util",
    "decode_gpu_util",
    "prefill_sm_active",
    "decode_sm_active",
    "decode_kv_usage",
    "prefill_queue",
    "decode_queue",
    "tbt_mean",
    "decode_running",
]
# Read from the Literal so that the type and the runtime tuple cannot drift apart.
METRIC_NAMES: tuple[MetricName, ...] = get_args(MetricName)


# No real signal reaches this: 1e12 tokens/s is ten million GPUs at 100,000 tokens/s
# each, 1e12 ms is 31 years, 1e12 requests would not fit any queue. A value beyond it is
# broken, and sizing from it (times tokens per request, times headroom) would overflow.
MAX_SIGNAL_VALUE = 1e12


@dataclass(frozen=True)
class Sample:
    """One observed value and the time (seconds since the epoch, or simulation
    seconds) at which it was sampled."""

    value: float
    at_s: float

    def is_usable(self, now_s: float, max_age_s: float) -> bool:
        """Fresh enough to act on (``is_fresh``), and in range: every signal is a rate,
        a latency, a share or a count, so a negative one is broken (a custom query's
        subtraction, a counter reset), and so is one beyond ``MAX_SIGNAL_VALUE`` (NaN
        fails <=)."""
        return 0.0 <= self.value <= MAX_SIGNAL_VALUE and is_fresh(self.at_s, now_s, max_age_s)


def is_fresh(at_s: float, now_s: float, max_age_s: float) -> bool:
    """A reading taken at ``at_s`` may be acted on at ``now_s``: at most ``max_age_s``
    old, and no further than that in the future either (a clock that far ahead, or a
    timestamp written wrong, is not this cycle's reading; a little ahead is a query's
    evaluation time just after the decision's clock read). NaN is never fresh."""
    return abs(now_s - at_s) <= max_age_s


# No model serves a context this long (the longest are ~10 million tokens), and no
# window holds this many requests (a million a second for thirty years): a length
# histogram beyond either is broken, and sizing from it overflows.
MAX_REQUEST_TOKENS = 1e8
MAX_HISTOGRAM_COUNT = 1e15
# Nor has any engine this many bounds: vLLM's 1-2-5 grid up to a 10-million-token
# context has 22, SGLang's default token buckets fewer than 40. The planner's work on
# a mix grows with its buckets (4,000 cost 0.4 s a decision), so a histogram with more
# is broken or hostile, and read as missing (the last known mix stands in).
MAX_LENGTH_BUCKETS = 256


@lru_cache(maxsize=256)
def _usable_bounds(le: tuple[float, ...]) -> bool:
    """``LengthBuckets.is_usable``'s test of the bounds: at most ``MAX_LENGTH_BUCKETS``,
    distinct, each within ``MAX_REQUEST_TOKENS`` or ``+Inf``. Kept per bounds: an
    engine exports the same ones every cycle."""
    return (
        len(le) <= MAX_LENGTH_BUCKETS
        and len(set(le)) == len(le)
        and all(b <= MAX_REQUEST_TOKENS or b == math.inf for b in le)
    )


def usable_length_histogram(le: tuple[float, ...], requests: float) -> bool:
    """Whether a token-length histogram with bucket bounds ``le`` holding ``requests``
    in all can be sized from: at most ``MAX_LENGTH_BUCKETS`` bounds, distinct, each
    within ``MAX_REQUEST_TOKENS`` or ``+Inf``, and at least one request, at most
    ``MAX_HISTOGRAM_COUNT`` (NaN fails)."""
    return _usable_bounds(le) and 0 < requests <= MAX_HISTOGRAM_COUNT


@dataclass(frozen=True)
class LengthBuckets:
    """A token-length histogram as serving engines export it (vLLM's
    ``vllm:request_prompt_tokens`` / ``vllm:request_generation_tokens``): cumulative
    request counts (or rates: only proportions matter) per bucket upper bound ``le``
    over the metrics window, the last bound possibly ``inf``; sampled at ``at_s``."""

    le: tuple[float, ...]
    cumulative: tuple[float, ...]
    at_s: float

    def is_usable(self, now_s: float, max_age_s: float) -> bool:
        """Fresh, one count per bound, the bounds distinct numbers (two series of one
        bound, ``le="1"`` and ``le="1.0"``, make a histogram no one can read) within
        ``MAX_REQUEST_TOKENS`` or ``+Inf``, the counts finite, within
        ``MAX_HISTOGRAM_COUNT`` and cumulative (never falling from one bound to the
        next beyond rounding: the bounds of one histogram are scraped together, so a
        fall is a broken query or a hand-written series, and read as it stands it would
        put every request in the first bucket), and at least one request."""
        return (
            is_fresh(self.at_s, now_s, max_age_s)
            and bool(self.cumulative)
            and len(self.le) == len(self.cumulative)
            and all(map(math.isfinite, self.cumulative))
            and usable_length_histogram(self.le, max(self.cumulative))
            and _cumulative(self.cumulative)
        )


# Rates of one histogram's bounds are computed alike from samples taken together, so
# their cumulative counts can fall from one bound to the next only by float rounding.
_CUMULATIVE_ROUNDING = 1e-9


def _cumulative(counts: tuple[float, ...]) -> bool:
    slack = _CUMULATIVE_ROUNDING * max(counts)
    return all(later >= earlier - slack for earlier, later in itertools.pairwise(counts))


@dataclass(frozen=True)
class ServiceMetrics:
    """The signals of one service at one moment. ``None`` means missing.

    Units: TPS in tokens/s summed over all instances of the role; ``ttft`` and
    ``tbt`` in milliseconds at the policy's SLO quantile; utilisation and SM
    activity as fractions in [0, 1] averaged over the role's GPUs; KV-cache usage as
    a fraction in [0, 1] averaged over decode instances; queues in requests summed
    over the role's instances.
    """

    service: str
    # One optional sample per ``MetricName`` (``get`` reads them by name): the repeated
    # lines are the schema, not copied logic.
    prefill_tps: Sample | None = None
    decode_tps: Sample | None = None
    ttft: Sample | None = None
    tbt: Sample | None = None
    prefill_gpu_util: Sample | None = None
    decode_gpu_util: Sample | None = None
    prefill_sm_active: Sample | None = None
    decode_sm_active: Sample | None = None
    decode_kv_usage: Sample | None = None
    # Requests waiting for the role (not yet started), summed over its instances: under
    # overload the served token rates stop at capacity and only the queue shows demand.
    prefill_queue: Sample | None = None
    decode_queue: Sample | None = None
    # Requests decoding (admitted, not finished), summed over the decode instances: with
    # the queue, the work in decode (``planner.role_demand``).
    decode_running: Sample | None = None
    # The mean inter-token gap over the window (ms): the TBT histogram's sum over its
    # count, exact where its quantile is known only to a bucket.
    tbt_mean: Sample | None = None
    # The live request mix (prompt and output lengths), when the engine exports it.
    prompt_tokens: LengthBuckets | None = None
    output_tokens: LengthBuckets | None = None
    # (signal, why) for the signals the source read as missing and knows why (stale,
    # NaN, a histogram without its +Inf bucket, a query Prometheus refused): a hold on
    # them says why (``cycle.with_missing_reasons``).
    gaps: tuple[tuple[str, str], ...] = ()

    def get(self, name: MetricName) -> Sample | None:
        sample: Sample | None = getattr(self, name)
        return sample


@dataclass(frozen=True)
class RoleCount:
    """Instances of one role: serving, still starting (count as capacity), and
    draining (soft scale-in: out of service discovery, still running)."""

    ready: int = 0
    starting: int = 0
    draining: int = 0
    # Placed instances (ready and starting) per GPU type, by type name; empty where
    # the caller does not know the types (then all count as the role's first type).
    by_type: tuple[tuple[str, int], ...] = ()
    # Of the starting ones, those no longer on their way: not ready past their
    # Deployment's progress deadline (a crash loop, an image that does not pull).
    # Still counted as the role's size (more of them would likely be stuck too), never
    # waited for.
    stuck: int = 0
    # Instances in groups being deleted (still serving until they go) that no group
    # created since their deletion replaces yet (``observe.kubernetes.
    # deleting_unreplaced``): not counted as capacity (their group goes whatever the
    # plan says), but kept by a hold, so their replacement is made before they go.
    deleting_unreplaced: int = 0

    @property
    def active(self) -> int:
        """Instances that count as capacity for the policy."""
        return self.ready + self.starting

    @property
    def hold_size(self) -> int:
        """The instances a held size keeps: the active ones and those of groups being
        deleted not yet replaced (held at ``active`` alone, the capacity of a group being
        deleted was never replaced, and went when its finalizer did)."""
        return self.active + self.deleting_unreplaced


@dataclass(frozen=True)
class ServiceFleet:
    """How many instances one service has, per role: the policy's view of the fleet."""

    service: str
    prefill: RoleCount = field(default_factory=RoleCount)
    decode: RoleCount = field(default_factory=RoleCount)

    def role(self, role: Role) -> RoleCount:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class NodeInstances:
    """``instances`` instances of one role placed on one node."""

    node: str
    instances: int


@dataclass(frozen=True)
class GroupRole:
    """One role inside a deployment group: its GPU type and where its instances run."""

    gpu_type: str
    instances: int
    nodes: tuple[NodeInstances, ...] = ()
    # Known when observed from a live workload; otherwise the policy's value applies.
    gpus_per_instance: int | None = None


def group_id_prefix(label: str) -> str:
    """What every id of a group made from ``label`` starts with (the placement's
    ``new_group_id`` appends a number, validation compares these prefixes)."""
    return f"g-{label}-"


@dataclass(frozen=True)
class DeploymentGroup:
    """A service's prefill and decode instances that share one scheduling domain.

    ``domain`` is the switch (S1 or S2 name) the group is pinned to, or the cluster
    name for loose-affinity services; ``subgroup`` is the RDMA subgroup it lives in
    (``None`` for loose affinity). ``group_id`` is stable across cycles.
    """

    service: str
    cluster: str
    group_id: str
    domain: str
    subgroup: str | None
    prefill: GroupRole
    decode: GroupRole

    def role(self, role: Role) -> GroupRole:
        return self.prefill if role == "prefill" else self.decode


@dataclass(frozen=True)
class FleetState:
    """Everything running in one cluster that the reconciler owns, as observed."""

    cluster: str
    groups: tuple[DeploymentGroup, ...] = ()
    # Instances per (service, role) that are starting / draining; ready = placed - these.
    starting: Mapping[tuple[str, Role], int] = field(default_factory=dict)
    draining: Mapping[tuple[str, Role], int] = field(default_factory=dict)
    # Of the starting ones, those not ready past their progress deadline.
    stuck: Mapping[tuple[str, Role], int] = field(default_factory=dict)
    # Per service, ids no new group may take although no group in ``groups`` has them:
    # those of its groups being deleted, left out as leftovers, whose Deployments' names
    # are taken until they are gone (``observe.kubernetes.reserved_group_ids``).
    reserved_group_ids: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Per (service, role), instances of its groups being deleted that no group created
    # since replaces yet (``RoleCount.deleting_unreplaced``).
    deleting_unreplaced: Mapping[tuple[str, Role], int] = field(default_factory=dict)

    @cached_property
    def _groups_by_service(self) -> Mapping[str, tuple[DeploymentGroup, ...]]:
        """The groups per service, built once: every cycle asks ``service_fleet`` of
        each service several times (decide, report, metrics), which scanning every
        group each time made services x groups."""
        by_service: dict[str, list[DeploymentGroup]] = {}
        for group in self.groups:
            by_service.setdefault(group.service, []).append(group)
        return {service: tuple(groups) for service, groups in by_service.items()}

    def service_fleet(self, service: str) -> ServiceFleet:
        counts: dict[Role, int] = {"prefill": 0, "decode": 0}
        by_type: dict[Role, dict[str, int]] = {"prefill": {}, "decode": {}}
        for group in self._groups_by_service.get(service, ()):
            for role in ROLES:
                placed = group.role(role)
                counts[role] += placed.instances
                if placed.instances:
                    types = by_type[role]
                    types[placed.gpu_type] = types.get(placed.gpu_type, 0) + placed.instances

        def role_count(role: Role) -> RoleCount:
            starting = self.starting.get((service, role), 0)
            draining = self.draining.get((service, role), 0)
            return RoleCount(
                ready=max(0, counts[role] - starting),
                starting=starting,
                draining=draining,
                by_type=tuple(sorted(by_type[role].items())),
                stuck=min(starting, self.stuck.get((service, role), 0)),
                deleting_unreplaced=self.deleting_unreplaced.get((service, role), 0),
            )

        return ServiceFleet(service, role_count("prefill"), role_count("decode"))


@dataclass(frozen=True)
class Targets:
    """How many instances of each role a service should run (the policy's output)."""

    service: str
    prefill: int
    decode: int
