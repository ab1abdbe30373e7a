"""Trace-driven simulator of a prefill/decode-disaggregated fleet, calibrated on real
GPU measurements (``calibrate``, ``perf``), with trace readers and synthetic load
(``workload``), the per-second fluid model (``engine``), the simulated cluster behind
the reconciler's MetricsSource/ClusterBackend interfaces (``fleet``, ``default``) and
the side-by-side policy evaluation (``reconciler.sim.evaluate.evaluate``).

Names below are loaded lazily, so ``python -m reconciler.perfmodel.calibrate`` and light
imports do not pull in the whole simulator.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "default_simulated_fleet": "reconciler.sim.default",
    "synthetic_load_for": "reconciler.sim.default",
    "LoadProfile": "reconciler.sim.engine",
    "ServiceSim": "reconciler.sim.engine",
    "SimConfig": "reconciler.sim.engine",
    "synthetic_profile": "reconciler.sim.engine",
    "EvaluationError": "reconciler.sim.evaluate",
    "EvaluationResult": "reconciler.sim.evaluate",
    "PolicyResult": "reconciler.sim.evaluate",
    "SimulatedFleet": "reconciler.sim.fleet",
    "TraceError": "reconciler.sim.workload",
    "Workload": "reconciler.sim.workload",
    "read_trace": "reconciler.sim.workload",
    "synthetic_workload": "reconciler.sim.workload",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'reconciler.sim' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
