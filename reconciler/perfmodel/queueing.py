"""Queueing formulas shared by the simulator and the planner.

``ggc_wait_s`` lives here, not in ``reconciler.sim``, so the policy can size prefill
with the same waiting-time term the simulator charges, without importing the simulator.
"""

from __future__ import annotations

import math

# Allen-Cunneen is a heavy-traffic approximation that diverges at rho = 1; beyond this
# the simulator's fluid backlog carries the delay (and the planner never sizes there).
MAX_GGC_UTILISATION = 0.995


def ggc_wait_probability(rho: float, servers: float) -> float:
    """Probability that an arrival waits at all in a c-server queue: Sakasegawa's
    ``rho^(sqrt(2 (c + 1)) - 1)``, the approximation of Erlang C that
    :func:`ggc_wait_s` is built on (exact for c = 1: ``rho``)."""
    if servers <= 0 or rho <= 0:
        return 0.0
    rho = min(rho, MAX_GGC_UTILISATION)
    return float(rho ** (math.sqrt(2.0 * (servers + 1.0)) - 1.0))


def ggc_wait_s(rho: float, servers: float, mean_service_s: float, scv_sum: float) -> float:
    """Mean wait of a G/G/c queue (Allen-Cunneen with Sakasegawa's exponent).

    ``rho`` is the per-server utilisation, ``servers`` the number of servers ``c``,
    ``mean_service_s`` one job's mean service time on one server and ``scv_sum`` the
    sum of the squared coefficients of variation of inter-arrival and service times
    (``c_a^2 + c_s^2``; 1 + c_s^2 for Poisson arrivals). ``rho`` is capped just below 1
    (``MAX_GGC_UTILISATION``): beyond it the fluid backlog carries the delay.

    W = E[S] x (c_a^2 + c_s^2) / 2 x rho^(sqrt(2 (c + 1)) - 1) / (c (1 - rho)), where
    Sakasegawa's ``rho^(sqrt(2(c+1)) - 1) / (c (1 - rho))`` approximates the M/M/c
    probability of waiting over ``c (1 - rho)``.
    """
    if servers <= 0 or rho <= 0:
        return 0.0
    rho = min(rho, MAX_GGC_UTILISATION)
    return (
        mean_service_s
        * scv_sum
        / 2.0
        * rho ** (math.sqrt(2.0 * (servers + 1.0)) - 1.0)
        / (servers * (1.0 - rho))
    )
