"""Builders shared by the policy tests: a synthetic service policy with round numbers
(so the arithmetic in test comments stays readable), fleets, metrics, histories, and
a small replay harness for scenario tests.

The base policy ``svc``: decode target 1000 tokens/s per instance, tolerance 10%,
P/D ratio 1:2 within 1:4..1:1, prefill 1..100, decode 1..200, max step 4 instances
or 100%, SLO TTFT 1000 ms / TBT 40 ms, and -- unless a test sets them -- no
stabilisation window and no cooldown, so a rule's raw arithmetic is visible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from reconciler.desired import load_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.perfmodel.instance import InstancePerf
from reconciler.policy import Decision, PolicyHistory, decide
from reconciler.policy.base import Autoscaler, DecisionInput, Recommendation
from reconciler.policy.capacity import RequestMix, read_prefill_busy
from reconciler.sim.hand_targets import with_hand_targets
from reconciler.state import LengthBuckets, RoleCount, Sample, ServiceFleet, ServiceMetrics

REPO_ROOT = Path(__file__).resolve().parents[2]
# vLLM's request length buckets (1-2-5 up to 500,000 tokens, then +Inf).
LENGTH_BUCKETS = (*(float(m * 10**e) for e in range(6) for m in (1, 2, 5)), float("inf"))

BASE_POLICY: dict[str, Any] = {
    "name": "svc",
    "model": {"name": "m", "params_b": 8.0, "kv_bytes_per_token": 131072},
    "cluster": "c",
    "namespace": "svc",
    "slo": {"ttft_ms": 1000, "tbt_ms": 40},
    "prefill": {
        "gpus_per_instance": 1,
        "gpu_types": {"h800": 1.0},
        "min_instances": 1,
        "max_instances": 100,
        "template": "t/prefill.yaml",
        "startup_s": 120,
    },
    "decode": {
        "gpus_per_instance": 1,
        "gpu_types": {"h20": 1.0},
        "min_instances": 1,
        "max_instances": 200,
        "template": "t/decode.yaml",
        "startup_s": 120,
    },
    "pd_ratio": {"target": "1:2", "min": "1:4", "max": "1:1"},
    "deployment_group": {"prefill_instances": 2, "decode_instances": 4},
    "scaling": {
        "metric": "decode_tps",
        "target_per_instance": 1000,
        "tolerance": 0.1,
        "scale_in_window_s": 0,
        "cooldown_s": 0,
    },
}


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_policy(**overrides: Any) -> ServicePolicy:
    """The synthetic ``svc`` policy with nested overrides, validated like a YAML file:
    ``make_policy(scaling={"tolerance": 0.2}, decode={"max_instances": 30})``."""
    return ServicePolicy.model_validate(_merge(BASE_POLICY, overrides))


@cache
def example_policy(name: str) -> ServicePolicy:
    """A policy from the repository's own ``policies/`` directory."""
    return load_desired_state(REPO_ROOT).policies[name]


def paper_example_policy(name: str) -> ServicePolicy:
    """An example policy with the hand-set targets the paper policy scales on
    (``reconciler.sim.hand_targets``: the example files set none)."""
    return with_hand_targets(example_policy(name))


def with_overrides(policy: ServicePolicy, **overrides: Any) -> ServicePolicy:
    """``policy`` with nested overrides, validated again."""
    return ServicePolicy.model_validate(_merge(policy.model_dump(), overrides))


def fleet(
    prefill: int, decode: int, *, prefill_starting: int = 0, decode_starting: int = 0
) -> ServiceFleet:
    """``prefill``/``decode`` ready instances plus the starting ones."""
    return ServiceFleet(
        "svc",
        RoleCount(ready=prefill, starting=prefill_starting),
        RoleCount(ready=decode, starting=decode_starting),
    )


def length_buckets(values: np.ndarray, at_s: float) -> LengthBuckets:
    """Request lengths as an engine exports them: cumulative counts per bucket."""
    bounds = np.asarray(LENGTH_BUCKETS)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=bounds.size)
    return LengthBuckets(LENGTH_BUCKETS, tuple(float(c) for c in np.cumsum(counts)), at_s)


def metrics(at_s: float = 0.0, service: str = "svc", **values: float | None) -> ServiceMetrics:
    """Signals sampled at ``at_s``: ``metrics(decode_tps=12000, tbt=30)``."""
    return ServiceMetrics(
        service, **{k: (None if v is None else Sample(float(v), at_s)) for k, v in values.items()}
    )


def steady_history(
    prefill: int, decode: int, *, until_s: float, span_s: float, cycle_s: float = 15.0
) -> PolicyHistory:
    """Recommendations of ``prefill``/``decode`` every ``cycle_s`` over ``span_s``
    seconds before ``until_s`` (exclusive): a window full of one recommendation."""
    count = int(span_s // cycle_s) + 1
    return PolicyHistory(
        recommendations=tuple(
            Recommendation(until_s - cycle_s * (count - k), prefill, decode) for k in range(count)
        )
    )


@dataclass
class Replay:
    """A fleet that carries out each decision: new instances start and become ready
    after ``startup_s``, removed ones go at once (newest first)."""

    prefill: int
    decode: int
    startup_s: float = 120.0
    decisions: list[Decision] = field(default_factory=list)
    # (ready_at_s, role) of instances still starting.
    _starting: list[tuple[float, str]] = field(default_factory=list)

    def fleet_at(self, now_s: float) -> ServiceFleet:
        self._starting = [(t, r) for t, r in self._starting if t > now_s]
        counts = {}
        for role, total in (("prefill", self.prefill), ("decode", self.decode)):
            starting = sum(1 for _t, r in self._starting if r == role)
            counts[role] = RoleCount(ready=total - starting, starting=starting)
        return ServiceFleet("svc", counts["prefill"], counts["decode"])

    def apply(self, decision: Decision, now_s: float) -> None:
        for role in ("prefill", "decode"):
            target = getattr(decision, role)
            total = getattr(self, role)
            if target > total:
                self._starting += [(now_s + self.startup_s, role)] * (target - total)
            elif target < total:
                # Starting instances are removed first (newest first).
                surplus = total - target
                kept = []
                for item in sorted(self._starting, reverse=True):
                    if surplus and item[1] == role:
                        surplus -= 1
                    else:
                        kept.append(item)
                self._starting = kept
            setattr(self, role, target)
        self.decisions.append(decision)

    def changes(self) -> list[Decision]:
        out, last = [], None
        for decision in self.decisions:
            pair = (decision.prefill, decision.decode)
            if last is not None and pair != last:
                out.append(decision)
            last = pair
        return out


def replay(
    policy: ServicePolicy,
    signals: Callable[[float], ServiceMetrics],
    *,
    prefill: int,
    decode: int,
    until_s: float,
    cycle_s: float = 15.0,
    autoscaler: Autoscaler | None = None,
) -> Replay:
    """Run the policy every ``cycle_s`` from 0 to ``until_s`` against ``signals(t)``."""
    fleet_sim = Replay(prefill, decode, startup_s=policy.decode.startup_s)
    history = PolicyHistory()
    now_s = 0.0
    while now_s <= until_s:
        current = fleet_sim.fleet_at(now_s)
        if autoscaler is None:
            decision = decide(policy, current, signals(now_s), history, now_s)
        else:
            decision = autoscaler.decide(
                DecisionInput(policy, current, signals(now_s), history, now_s)
            )
        fleet_sim.apply(decision, now_s)
        history = decision.history
        now_s += cycle_s
    return fleet_sim


def busy_taught(
    perf: InstancePerf,
    mix: RequestMix,
    prompt_tps: float,
    instances: int,
    gpu_util: float,
    backlogged: bool = False,
) -> float | None:
    """The factor one window's busy reading teaches (``read_prefill_busy``'s
    ``taught``), None where there is no reading or it teaches nothing."""
    reading = read_prefill_busy(perf, mix, prompt_tps, instances, gpu_util, backlogged)
    return None if reading is None else reading.taught


def busy_floor(
    perf: InstancePerf, mix: RequestMix, prompt_tps: float, instances: int, gpu_util: float
) -> float | None:
    """The least factor one window's busy reading allows (``BusyReading.floor``)."""
    reading = read_prefill_busy(perf, mix, prompt_tps, instances, gpu_util)
    return None if reading is None else reading.floor
