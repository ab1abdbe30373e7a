"""Autoscaling decisions: the planner (the default, ``heteroscale``), the paper's
coordinated policy (``heteroscale-paper``) and the baselines.

Every autoscaler implements ``reconciler.policy.base.Autoscaler`` and is pure: time
comes in as an argument and memory between cycles as a ``PolicyHistory``.
``make_autoscaler(name, **kwargs)`` builds one by name, for the simulator and the
command line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from reconciler.policy.base import (
    Autoscaler,
    Clamp,
    Decision,
    PolicyHistory,
    Reason,
    Recommendation,
)
from reconciler.policy.baselines import (
    AutoscalerConfigError,
    HpaGpuUtilAutoscaler,
    HpaTokensAutoscaler,
    PerRoleHpa,
    StaticPeakAutoscaler,
)
from reconciler.policy.coordinated import CoordinatedAutoscaler, decide, decide_many
from reconciler.policy.planner import PlannerAutoscaler

AUTOSCALERS: dict[str, Callable[..., Autoscaler]] = {
    PlannerAutoscaler.name: PlannerAutoscaler,
    CoordinatedAutoscaler.name: CoordinatedAutoscaler,
    HpaGpuUtilAutoscaler.name: HpaGpuUtilAutoscaler,
    HpaTokensAutoscaler.name: HpaTokensAutoscaler,
    StaticPeakAutoscaler.name: StaticPeakAutoscaler,
}


def make_autoscaler(name: str, **kwargs: Any) -> Autoscaler:
    """Build the autoscaler registered as ``name`` with its constructor's keyword
    arguments (``heteroscale`` and ``heteroscale-paper`` take none; see each class
    for the others).

    Raises ``AutoscalerConfigError`` for an unknown name or arguments the
    constructor does not accept."""
    factory = AUTOSCALERS.get(name)
    if factory is None:
        hint = difflib.get_close_matches(name, list(AUTOSCALERS), n=1)
        suffix = f"; did you mean '{hint[0]}'?" if hint else ""
        raise AutoscalerConfigError(
            f"unknown autoscaler '{name}' (known: {', '.join(AUTOSCALERS)}){suffix}"
        )
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise AutoscalerConfigError(f"autoscaler '{name}': {exc}") from exc


__all__ = [
    "AUTOSCALERS",
    "Autoscaler",
    "AutoscalerConfigError",
    "Clamp",
    "CoordinatedAutoscaler",
    "Decision",
    "HpaGpuUtilAutoscaler",
    "HpaTokensAutoscaler",
    "PerRoleHpa",
    "PlannerAutoscaler",
    "PolicyHistory",
    "Reason",
    "Recommendation",
    "StaticPeakAutoscaler",
    "decide",
    "decide_many",
    "make_autoscaler",
]
