"""What the loop reads from outside it: the desired state, a leader election and the
store of durable state. The loop's parts depend on these shapes only, not on the
classes behind them (``reconciler.apply.lease``, ``reconciler.apply.statestore``)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from reconciler.desired.loader import DesiredState
from reconciler.durable import DurableState


class DesiredStateLoader(Protocol):
    def __call__(self) -> DesiredState: ...


@runtime_checkable
class LeaderElection(Protocol):
    """What the loop reads from a leader election (``reconciler.apply.lease.LeaseElector``)."""

    def is_leader(self) -> bool: ...

    def holds_lease(self) -> bool:
        """Whether the API server's Lease names this replica now (one read; False when
        it cannot be read), beside ``is_leader``, which is this replica's own clock."""
        ...

    def health_problem(self) -> str | None: ...

    def error_counts(self) -> dict[str, int]: ...

    def decision_age_s(self) -> float: ...


class StateStore(Protocol):
    """Where the durable state lives (``reconciler.apply.statestore.ConfigMapStateStore``)."""

    def load(self, cluster: str) -> DurableState | None: ...

    def load_problems(self, cluster: str) -> tuple[str, ...]:
        """What the last ``load`` of ``cluster`` left out because it could not be read
        (a memory shard: only its services' planner memories), one line each."""
        ...

    def save(self, state: DurableState) -> bool: ...

    def describe(self, cluster: str) -> str: ...
