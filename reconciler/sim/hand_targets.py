"""The hand-set capacity targets of the example services, for the policies that scale
only on such targets.

The example policies (``policies/*.yaml``) set no ``target_per_instance``: the default
planner derives capacity from the performance model. The paper's coordinated policy
(``heteroscale-paper``) and the tokens/s HPA (``hpa-decode-tps``) need a per-instance
target; the evaluation matrix and their tests run them on the values the example
policies carried while the paper policy was the default. Each was tuned by hand on that
service's synthetic day: decode output tokens/s about 20% below the calibrated TBT cliff
of one instance, prefill prompt tokens/s about 13-15% below the prefill capacity at 85%
of full compute (the derivations were in the policy files' comments up to 40c834f).
"""

from __future__ import annotations

from reconciler.desired.models import ServicePolicy

# service -> (target_per_instance: decode output tokens/s,
#             prefill_target_per_instance: prefill prompt tokens/s)
HAND_TARGETS: dict[str, tuple[float, float]] = {
    "chat": (1300.0, 10200.0),
    "summarize": (600.0, 5450.0),
    "svc-a": (1250.0, 11950.0),
    "svc-b": (1250.0, 24050.0),
}


def with_hand_targets(policy: ServicePolicy) -> ServicePolicy:
    """``policy`` with its service's ``HAND_TARGETS`` set in ``scaling``.

    Raises ``KeyError`` for a service that has none."""
    decode_tps, prefill_tps = HAND_TARGETS[policy.name]
    scaling = policy.scaling.model_copy(
        update={"target_per_instance": decode_tps, "prefill_target_per_instance": prefill_tps}
    )
    return policy.model_copy(update={"scaling": scaling})
