"""Give the ``hpa-gpu-util`` baseline its best operating point on the trace at hand.

An HPA's target utilisation is the one number its operator tunes, and any fixed
value favours some traces over others: too low wastes GPUs, too high misses the SLO
while new instances start. So the evaluation runs the HPA at several targets on the
same load (:func:`run_autoscaler`, the harness every policy runs in) and reports the
cheapest target (GPU-hours) whose both-SLO attainment reaches the policy's
``slo.attainment_goal`` (of the requests that are attainable at all); if none does, the one with the best attainment. The
comparison is then against the HPA at its best, not at an arbitrary setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.desired.loader import DesiredState
from reconciler.placement.base import Placer
from reconciler.policy.baselines import HpaGpuUtilAutoscaler
from reconciler.sim.engine import LoadProfile, SimConfig
from reconciler.sim.evaluate import EvaluationError, PolicyResult, Progress, run_autoscaler

DEFAULT_HPA_TARGETS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class SweepPoint:
    """One target's run, in the figures the choice looks at."""

    target: float
    gpu_hours: float
    slo_attainment: float  # share of requests meeting both TTFT and TBT SLOs


def pick_target(points: Sequence[SweepPoint], goal: float) -> tuple[SweepPoint, bool]:
    """The cheapest point reaching ``goal`` (and True), else the best attainment
    (and False). Ties go to the better attainment, then the lower target."""
    if not points:
        raise EvaluationError("hpa target sweep: no targets to choose from")
    reaching = [p for p in points if p.slo_attainment >= goal]
    if reaching:
        return min(reaching, key=lambda p: (p.gpu_hours, -p.slo_attainment, p.target)), True
    return max(points, key=lambda p: (p.slo_attainment, -p.gpu_hours, -p.target)), False


@dataclass(frozen=True)
class HpaSweep:
    """The chosen target, why, every point, and the run at the chosen target (its
    description says the target and why; one note lists every point)."""

    target: float
    reached_goal: bool
    goal: float
    reason: str
    points: tuple[SweepPoint, ...]
    result: PolicyResult


def _share(progress: Progress | None, name: str, index: int, runs: int) -> Progress | None:
    """Run ``index`` of ``runs`` as its share of one progress bar under ``name``."""
    if progress is None:
        return None
    outer = progress

    def report(_name: str, fraction: float) -> None:
        outer(name, (index + fraction) / runs)

    return report


def choose_hpa_target(
    state: DesiredState,
    service: str,
    profile: LoadProfile,
    targets: Sequence[float] = DEFAULT_HPA_TARGETS,
    *,
    config: SimConfig | None = None,
    placer: Placer | None = None,
    interval_s: float = 30.0,
    progress: Progress | None = None,
    name: str = HpaGpuUtilAutoscaler.name,
    warm: tuple[int, int] | None = None,
) -> HpaSweep:
    """Run ``hpa-gpu-util`` at each of ``targets`` on ``profile`` and pick one
    (module docstring). ``progress`` sees one bar over the whole sweep under ``name``;
    ``warm``: the fleet every run starts from (the evaluation's shared warm start)."""
    if not targets:
        raise EvaluationError("hpa target sweep: no targets given")
    if service not in state.policies:
        raise EvaluationError(
            f"unknown service '{service}' (known: {', '.join(sorted(state.policies))})"
        )
    runs: dict[float, PolicyResult] = {}
    for index, target in enumerate(targets):
        runs[target] = run_autoscaler(
            state,
            service,
            profile,
            HpaGpuUtilAutoscaler(target),
            name=name,
            config=config,
            placer=placer,
            interval_s=interval_s,
            progress=_share(progress, name, index, len(targets)),
            warm=warm,
        )
    # The goal applies to the requests any fleet could serve in time: those that miss
    # TTFT even on an idle instance (the same share in every run) are out of reach.
    unattainable = next(iter(runs.values())).unattainable_share
    goal = state.policies[service].slo.attainment_goal * (1.0 - unattainable)
    points = tuple(
        SweepPoint(target, run.gpu_hours, run.slo_attainment) for target, run in runs.items()
    )
    chosen, reached = pick_target(points, goal)
    if reached:
        reason = f"cheapest reaching {goal:.1%}"
    else:
        reason = f"none reaches {goal:.1%}, best attainment ({chosen.slo_attainment:.2%})"
    swept = ", ".join(f"{t:g}" for t in targets)
    description = f"target {chosen.target:g} chosen by sweep: {reason} (swept {swept})"
    table = "; ".join(
        f"{p.target:g}: {p.gpu_hours:.1f} GPU-h, {p.slo_attainment:.2%} both-SLO" for p in points
    )
    run = runs[chosen.target]
    result = dataclasses.replace(
        run, description=description, notes=(*run.notes, f"target sweep: {table}")
    )
    return HpaSweep(chosen.target, reached, goal, reason, points, result)


__all__ = [
    "DEFAULT_HPA_TARGETS",
    "HpaSweep",
    "SweepPoint",
    "choose_hpa_target",
    "pick_target",
]
