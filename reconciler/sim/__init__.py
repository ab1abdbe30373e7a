"""Trace-driven simulator of a prefill/decode-disaggregated fleet, calibrated on real
GPU measurements (``calibrate``, ``perf``), with trace readers and synthetic load
(``workload``), the per-second fluid model (``engine``), the simulated cluster behind
the reconciler's MetricsSource/ClusterBackend interfaces (``fleet``, ``default``) and
the side-by-side policy evaluation (``evaluate``).
"""

from reconciler.sim.default import default_simulated_fleet, synthetic_load_for
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig, synthetic_profile
from reconciler.sim.evaluate import EvaluationError, EvaluationResult, PolicyResult, evaluate
from reconciler.sim.fleet import SimulatedFleet
from reconciler.sim.workload import TraceError, Workload, read_trace, synthetic_workload

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "LoadProfile",
    "PolicyResult",
    "ServiceSim",
    "SimConfig",
    "SimulatedFleet",
    "TraceError",
    "Workload",
    "default_simulated_fleet",
    "evaluate",
    "read_trace",
    "synthetic_load_for",
    "synthetic_profile",
    "synthetic_workload",
]
