"""The performance model of one serving instance, shared by the simulator and the policy.

One source of truth: ``reconciler.sim`` replays traffic through it and
``reconciler.policy`` derives per-instance capacity from it, so the planner never
imports the simulator. ``instance`` holds the model (prefill latency, decode step time,
KV-cache capacity, KV transfer, GPU counters); ``calibrate`` fits its coefficients to the
real measurements in ``shared/calibration`` (``python -m reconciler.perfmodel.calibrate``).
"""
