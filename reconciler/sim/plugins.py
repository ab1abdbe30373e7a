"""External autoscalers in the simulator's loop: ``--policies python:MODULE:CLASS``.

A plugin is any class with a constructor taking the service's validated
``ServicePolicy`` and a ``decide(observation)`` method returning
``(prefill_instances, decode_instances)``::

    class Planner:
        def __init__(self, service):
            self.slo_ttft_ms = service.slo.ttft_ms

        def decide(self, observation):
            rps = observation.requests_per_s or 0.0
            return max(1, round(rps / 4)), max(1, round(rps / 2))

``MODULE`` is imported from the working directory or ``PYTHONPATH``; ``CLASS`` is
constructed once per evaluation and asked every cycle (the reconcile interval, 30 s
by default) with a :class:`PlannerObservation`: what a planner would read from
Prometheus and the cluster. :class:`PluginAutoscaler` adapts it to the ``Autoscaler``
protocol, so its counts go through the policy's min/max, placement and start-up like
every other policy's.

A plugin that cannot be imported or constructed, raises in ``decide`` (``SystemExit``
included: a plugin's ``sys.exit`` ended the whole command, at exit code 0, with no
result) or returns anything but two non-negative integers raises :class:`PluginError`,
naming the plugin and the cycle, and quoting the plugin's own text (its exception's
message, what it returned) cut and escaped, whatever its ``__str__`` or ``__repr__``
raise; ``reconciler.sim.evaluate`` marks that policy failed and still reports
the others.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any

from reconciler.desired.models import ServicePolicy
from reconciler.errors import PermanentError
from reconciler.policy.base import Decision, DecisionInput
from reconciler.policy.baselines import fixed_counts
from reconciler.sim.fleet import SimulatedServiceMetrics
from reconciler.state import Sample, ServiceFleet, ServiceMetrics
from reconciler.text_safety import quoted

PLUGIN_PREFIX = "python:"
DETAIL_QUANTILES = (0.5, 0.9)


class PluginError(PermanentError):
    """An external autoscaler failed; the message names the plugin and the cycle."""


def _described(exc: BaseException) -> str:
    """``Type: message`` of an exception plugin code raised, quoted; its ``__str__`` is
    plugin code too, and may raise in turn."""
    try:
        message = str(exc)
    except Exception as inner:  # plugin code: reported, not raised
        message = f"(its message cannot be shown: str() raised {type(inner).__name__})"
    return quoted(f"{type(exc).__name__}: {message}")


def _shown(value: object) -> str:
    """The repr of what a plugin returned, quoted; its ``__repr__`` may raise."""
    try:
        text = repr(value)
    except Exception as inner:  # plugin code: reported, not raised
        text = f"a {type(value).__name__} (repr() raised {type(inner).__name__})"
    return quoted(text)


@dataclass(frozen=True)
class PlannerObservation:
    """One cycle's view of a service, as a planner would read it from Prometheus and
    the cluster. Rates, means and quantiles cover the ``window_s`` seconds before the
    last scrape (the scrape every policy's metrics come from; quantiles from histogram
    buckets unless the simulator runs exact); a value is ``None`` when nothing was
    observed (e.g. no request finished its prefill in the window, or the first cycle,
    before any window has elapsed)."""

    now_s: float  # the cycle's time: simulation seconds since the load began
    window_s: float | None  # the window of every rate and quantile below
    requests_per_s: float | None  # requests arriving per second
    prompt_tokens_per_s: float | None  # prompt tokens prefilled per second, all prefill instances
    output_tokens_per_s: float | None  # output tokens generated per second, all decode instances
    mean_prompt_tokens: float | None  # prompt tokens per request arriving in the window
    mean_output_tokens: float | None  # output tokens per request arriving in the window
    ttft_p50_ms: float | None  # time to first token, median over requests, milliseconds
    ttft_p90_ms: float | None  # ... 90th percentile
    tbt_p50_ms: float | None  # time between tokens, median over generated tokens, milliseconds
    tbt_p90_ms: float | None  # ... 90th percentile
    prefill_gpu_util: float | None  # fraction in [0, 1], mean over ready prefill GPUs
    decode_gpu_util: float | None  # fraction in [0, 1], mean over decode GPUs (reads ~1 when busy)
    decode_kv_usage: float | None  # fraction in [0, 1] of decode KV-cache capacity in use
    prefill_queue: float | None  # requests waiting for prefill (the last scrape)
    decode_queue: float | None  # prefilled requests waiting for a decode slot
    decode_running: float | None  # requests decoding (admitted, not finished)
    prefill_ready: int  # prefill instances serving
    decode_ready: int  # decode instances serving
    prefill_starting: int  # prefill instances created, still loading the model
    decode_starting: int  # decode instances created, still loading the model
    prefill_draining: int  # prefill instances leaving: out of routing, finishing their work
    decode_draining: int  # decode instances leaving


def _value(sample: Sample | None) -> float | None:
    return sample.value if sample is not None and math.isfinite(sample.value) else None


def observe(
    policy: ServicePolicy, fleet: ServiceFleet, metrics: ServiceMetrics, now_s: float
) -> PlannerObservation:
    """The observation of one cycle from what the fleet exposes: the fetched metrics
    (with the simulated fleet's extra readings when it is the source) and the fleet view."""
    detail: dict[str, float | None] = {}
    window_s: float | None = None
    if isinstance(metrics, SimulatedServiceMetrics) and metrics.sim is not None:
        detail = metrics.detail(DETAIL_QUANTILES)
        window_s = metrics.window_s
    # Without the simulator's detail the SLO-quantile latency stands in where it is p90.
    at_slo = policy.slo.quantile == 0.9
    return PlannerObservation(
        now_s=float(now_s),
        window_s=window_s,
        requests_per_s=detail.get("requests_per_s"),
        prompt_tokens_per_s=_value(metrics.prefill_tps),
        output_tokens_per_s=_value(metrics.decode_tps),
        mean_prompt_tokens=detail.get("mean_prompt_tokens"),
        mean_output_tokens=detail.get("mean_output_tokens"),
        ttft_p50_ms=detail.get("ttft_p50_ms"),
        ttft_p90_ms=detail.get("ttft_p90_ms", _value(metrics.ttft) if at_slo else None),
        tbt_p50_ms=detail.get("tbt_p50_ms"),
        tbt_p90_ms=detail.get("tbt_p90_ms", _value(metrics.tbt) if at_slo else None),
        prefill_gpu_util=_value(metrics.prefill_gpu_util),
        decode_gpu_util=_value(metrics.decode_gpu_util),
        decode_kv_usage=_value(metrics.decode_kv_usage),
        prefill_queue=_value(metrics.prefill_queue),
        decode_queue=_value(metrics.decode_queue),
        decode_running=_value(metrics.decode_running),
        prefill_ready=fleet.prefill.ready,
        decode_ready=fleet.decode.ready,
        prefill_starting=fleet.prefill.starting,
        decode_starting=fleet.decode.starting,
        prefill_draining=fleet.prefill.draining,
        decode_draining=fleet.decode.draining,
    )


def load_plugin_class(spec: str) -> type:
    """The class ``python:MODULE:CLASS`` names (``CLASS`` may be dotted)."""
    body = spec[len(PLUGIN_PREFIX) :] if spec.startswith(PLUGIN_PREFIX) else spec
    module_name, _, class_name = body.rpartition(":")
    if not module_name or not class_name:
        raise PluginError(f"{spec}: expected python:MODULE:CLASS, e.g. python:my_planner:Planner")
    cwd = os.getcwd()
    # A console script's sys.path starts at its bin directory, not the working one.
    on_path = any(os.path.abspath(p or ".") == cwd for p in sys.path)
    if not on_path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the module's own code may raise anything
        raise PluginError(
            f"{spec}: cannot import module '{module_name}' ({_described(exc)}); "
            f"looked in the working directory {cwd} and on PYTHONPATH (before the first cycle)"
        ) from exc
    finally:
        if not on_path:
            sys.path.remove(cwd)
    found: Any = module
    for part in class_name.split("."):
        if not hasattr(found, part):
            raise PluginError(
                f"{spec}: module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                f"'{class_name}' (before the first cycle)"
            )
        found = getattr(found, part)
    if not isinstance(found, type):
        raise PluginError(
            f"{spec}: '{class_name}' in module '{module_name}' is a {type(found).__name__}, "
            "not a class (before the first cycle)"
        )
    return found


def _counts(spec: str, result: Any, now_s: float) -> tuple[int, int]:
    def whole(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and int(x) >= 0

    try:  # a subclass's __len__, __getitem__ or __int__ is plugin code too
        if isinstance(result, tuple | list) and len(result) == 2 and all(map(whole, result)):
            return int(result[0]), int(result[1])
    except Exception:  # plugin code: reported below, not raised
        pass
    raise PluginError(
        f"{spec}: decide() returned {_shown(result)} in the cycle at t={now_s:g} s; expected "
        "(prefill_instances, decode_instances), two non-negative integers"
    )


class PluginAutoscaler:
    """An external autoscaler class behind the ``Autoscaler`` protocol (module
    docstring): constructed once, asked every cycle, its counts clamped to the
    service's min/max instances like the other baselines'."""

    def __init__(self, spec: str, service: ServicePolicy) -> None:
        self.name = spec
        self.spec = spec
        cls = load_plugin_class(spec)
        self.class_name = f"{cls.__module__}.{cls.__qualname__}"
        try:
            self.plugin = cls(service)
        except (Exception, SystemExit) as exc:  # plugin code: report, never end the run
            raise PluginError(
                f"{spec}: {cls.__qualname__}(service) raised {_described(exc)} "
                "(constructing it, before the first cycle)"
            ) from exc
        if not callable(getattr(self.plugin, "decide", None)):
            raise PluginError(
                f"{spec}: {cls.__qualname__} has no decide(observation) method "
                "(before the first cycle)"
            )

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, fleet, metrics, history, now_s = inputs.unpacked()
        observation = observe(policy, fleet, metrics, now_s)
        try:
            result = self.plugin.decide(observation)
        except (Exception, SystemExit) as exc:  # plugin code: report, never end the run
            raise PluginError(
                f"{self.spec}: decide() raised {_described(exc)} in the cycle at t={now_s:g} s"
            ) from exc
        asked = _counts(self.spec, result, now_s)
        return fixed_counts(policy, fleet, history, now_s, asked, self.class_name)


__all__ = [
    "PLUGIN_PREFIX",
    "PlannerObservation",
    "PluginAutoscaler",
    "PluginError",
    "load_plugin_class",
    "observe",
]
