"""Helpers shared by the simulator tests that run the planner in the loop."""

from __future__ import annotations

from reconciler.policy import PlannerAutoscaler
from reconciler.policy.base import Decision, DecisionInput


class RecordingPlanner:
    """The planner (``heteroscale``), keeping every decision it makes."""

    name = "heteroscale"

    def __init__(self) -> None:
        self.inner = PlannerAutoscaler()
        self.decisions: list[Decision] = []

    def decide(self, inputs: DecisionInput) -> Decision:
        decision = self.inner.decide(inputs)
        self.decisions.append(decision)
        return decision
