"""Fakes for the loop tests: a cluster backend that records what it was asked to do,
a metrics source, an autoscaler that asks for a fixed size, a placer that keeps one
group per service. They implement the shared protocols, nothing more. And a planner
memory packed as a hostile writer would pack it (``packed_memory_of_numbers``)."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.durable import DurableState
from reconciler.errors import ClusterUnavailable
from reconciler.loop import ReconcileLoop
from reconciler.observe.base import Observation
from reconciler.placement.base import PlacementRequest, PlacementResult, SolverStats
from reconciler.plan import Plan
from reconciler.policy.base import Decision, DecisionInput
from reconciler.state import DeploymentGroup, FleetState, GroupRole, ServiceMetrics


@dataclass
class RecordingBackend:
    """Holds a fleet in memory; ``apply`` makes it so, ``diff`` only reports."""

    cluster: str
    fleet: FleetState | None = None
    applied: list[Plan] = field(default_factory=list)
    diffed: list[Plan] = field(default_factory=list)
    fail_with: Exception | None = None

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation:
        if self.fail_with is not None:
            raise self.fail_with
        return Observation(self.fleet or FleetState(cluster.name))

    def diff(self, plan: Plan) -> list[str]:
        self.diffed.append(plan)
        return [str(c) for c in plan.changes]

    def apply(self, plan: Plan) -> list[str]:
        self.applied.append(plan)
        self.fleet = FleetState(plan.cluster, groups=plan.groups)
        return [str(c) for c in plan.changes]


@dataclass
class MemoryStore:
    """A ``StateStore`` in memory: the states saved, and each cluster's loads in order."""

    saved: dict[str, DurableState] = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)

    def load(self, cluster: str) -> DurableState | None:
        self.loads.append(cluster)
        return self.saved.get(cluster)

    def load_problems(self, cluster: str) -> tuple[str, ...]:
        return ()

    def save(self, state: DurableState) -> bool:
        self.saved[state.cluster] = state
        return True

    def describe(self, cluster: str) -> str:
        return f"the memory store's {cluster}"


class StaticMetrics:
    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        return {p.name: ServiceMetrics(service=p.name) for p in policies}


@dataclass
class FixedAutoscaler:
    prefill: int = 1
    decode: int = 2
    name: str = "fixed"

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, history = inputs.policy, inputs.history
        return Decision(
            policy.name,
            self.prefill,
            self.decode,
            "baseline",
            f"fixed {self.prefill}/{self.decode}",
            history=history,
        )


class OneGroupPlacer:
    """Everything of a service in one group under the first S2 switch, each role on its
    preferred GPU type, or both on ``gpu_type`` where given."""

    name = "one-group"

    def __init__(self, gpu_type: str | None = None) -> None:
        self.gpu_type = gpu_type

    def place(self, request: PlacementRequest) -> PlacementResult:
        groups = []
        for name, targets in sorted(request.targets.items()):
            policy = request.policies[name]
            prefill_type = self.gpu_type or policy.prefill.preferred_gpu_types()[0]
            decode_type = self.gpu_type or policy.decode.preferred_gpu_types()[0]
            groups.append(
                DeploymentGroup(
                    service=name,
                    cluster=request.cluster.name,
                    group_id="g0",
                    domain=request.cluster.s2[0].name,
                    subgroup=None,
                    prefill=GroupRole(prefill_type, targets.prefill),
                    decode=GroupRole(decode_type, targets.decode),
                )
            )
        return PlacementResult(
            request.cluster.name, tuple(groups), stats=SolverStats("greedy", "heuristic", 0.001)
        )


def unreachable(cluster: str) -> RecordingBackend:
    return RecordingBackend(
        cluster, fail_with=ClusterUnavailable(f"cluster {cluster}: connection refused")
    )


def packed_memory_of_numbers(numbers: int) -> str:
    """A planner memory as the state stores it (base64 of zlib'd JSON) holding
    ``numbers`` zeros in its forecaster's errors, in rows of 4,000 (the most one list
    may hold; ``numbers`` a multiple of it): two bytes of JSON a number, packed into
    next to nothing, as a hostile writer would."""
    row = "[" + ",".join(["0"] * 4000) + "]"
    errors = "[" + ",".join([row] * (numbers // 4000)) + "]"
    text = '{"prefill_demand":{"samples":1,"errors":' + errors + "}}"
    return base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def recording_loop(
    state: DesiredState, backend: RecordingBackend, is_leader: Callable[[], bool]
) -> ReconcileLoop:
    """A loop over ``state`` whose one cluster is ``backend``, with static metrics, a
    fixed decision and one group per service, led as ``is_leader`` says (an
    election's own method, so the loop finds the election)."""
    return ReconcileLoop(
        load_desired=lambda: state,
        backend_for=lambda spec: backend,
        metrics_for=lambda spec: StaticMetrics(),
        autoscaler=FixedAutoscaler(),
        placer=OneGroupPlacer(),
        is_leader=is_leader,
    )
