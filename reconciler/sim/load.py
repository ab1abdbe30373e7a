"""The load a simulation runs on, built the same way wherever it is asked for
(``heteroscale simulate``, the pull-request what-if, ``tune``), so equal options give
equal requests."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from reconciler.desired.loader import DesiredState
from reconciler.sim.engine import LoadProfile, SimConfig
from reconciler.sim.workload import MAX_REQUEST_ARRAYS, Workload, read_trace

# The largest rate scale: a million times the Azure conversation trace's ~5.5 requests
# a second is 5.5 million a second, far beyond any fleet the simulator sizes, and it
# keeps the fluid scaling's Poisson draws in numpy's range (1e300 failed there).
MAX_RATE_SCALE = 1_000_000.0


@dataclass(frozen=True)
class SimulationLoad:
    """The load a simulation runs, and the exact requests it replays when it has them."""

    profile: LoadProfile
    # One entry per request replayed (after rate scaling and diurnal tiling), or None
    # when the load was binned as a fluid (no per-request arrays).
    workload: Workload | None
    fluid_reason: str | None = None  # why ``workload`` is None


def load_with_requests(
    state: DesiredState,
    service: str,
    trace: Path | None,
    rate_scale: float | None,
    diurnal_hours: float | None,
    seed: int,
    config: SimConfig,
) -> SimulationLoad:
    """The load the command runs: a trace (tiled and scaled as asked) or, without one, a
    synthetic diurnal day for the service sized to the fleet; with the per-request
    workload the profile was binned from, when there is one (callers that only replay
    take ``.profile``). ``EvaluationError`` when ``rate_scale`` is not a positive
    number up to :data:`MAX_RATE_SCALE` or the load left has no requests (or, from a
    trace, no prompt tokens)."""
    from reconciler.sim.evaluate import EvaluationError

    if rate_scale is not None and not 0 < rate_scale <= MAX_RATE_SCALE:  # NaN fails too
        # 0 would read as "unscaled" below, infinity fails deep in numpy.
        raise EvaluationError(
            f"--rate-scale: {rate_scale} is not a positive number up to {MAX_RATE_SCALE:g}"
        )
    if trace is None:
        from reconciler.sim.default import synthetic_load_for

        profile = synthetic_load_for(
            state, state.policies[service], hours=diurnal_hours or 8.0, seed=seed, config=config
        )
        scaled = (
            profile.scaled(rate_scale, seed=seed) if rate_scale and rate_scale != 1.0 else profile
        )
        if scaled.requests == 0:
            raise EvaluationError(_none_left(rate_scale, seed, "synthetic load"))
        return SimulationLoad(
            scaled,
            None,
            "the synthetic load (no --trace) is drawn per second as a fluid, without "
            "per-request arrays",
        )
    workload = read_trace(trace, seed=seed)
    if diurnal_hours:
        workload = workload.diurnal(diurnal_hours, seed=seed)
    fluid_factor = 1.0
    if rate_scale and rate_scale != 1.0:
        # Beyond what a load holds as arrays, the binned load is scaled (a fluid).
        if workload.requests * rate_scale <= MAX_REQUEST_ARRAYS:
            workload = workload.rate_scaled(rate_scale, seed=seed)
        else:
            fluid_factor = rate_scale
    if workload.requests == 0:
        raise EvaluationError(_none_left(rate_scale, seed, str(trace)))
    if not workload.prompt_tokens.any():
        # Prefill is sized by prompt tokens per second (read_trace refuses a trace with
        # none; thinning can keep only requests without).
        raise EvaluationError(
            f"{trace}: no prompt tokens in any of the {workload.requests} requests replayed"
        )
    profile = LoadProfile.from_workload(
        workload,
        length_classes=config.length_classes,
        sample_limit=config.request_sample_limit,
        seed=seed,
    )
    if fluid_factor == 1.0:
        return SimulationLoad(profile, workload)
    return SimulationLoad(
        profile.scaled(fluid_factor, seed=seed),
        None,
        f"rate scale x{fluid_factor:g} would make ~{workload.requests * fluid_factor:,.0f} "
        f"requests, more than the {MAX_REQUEST_ARRAYS:,} held as arrays, so the load is "
        "scaled as a fluid, without per-request arrays",
    )


def _none_left(rate_scale: float | None, seed: int, source: str) -> str:
    return (
        f"--rate-scale: x{rate_scale:g} leaves no requests of the {source} (seed {seed}): "
        "scale by more"
        if rate_scale is not None
        else f"{source}: no requests to replay"
    )


def after_warm_up(profile: LoadProfile, hours: float) -> LoadProfile:
    """``profile`` with its first ``hours`` a warm-up, run but not judged
    (``LoadProfile.judged_after``): ``--warm-up-hours`` of ``simulate`` and of the
    review's what-if. ``EvaluationError`` saying why when ``hours`` is not a number of
    hours or leaves nothing to judge."""
    from reconciler.sim.evaluate import EvaluationError

    if math.isnan(hours) or hours < 0:
        raise EvaluationError(f"--warm-up-hours: {hours} is not a number of hours (0 or more)")
    if hours == 0:
        return profile
    try:
        return profile.judged_after(round(hours * 3600))
    except (ValueError, OverflowError) as exc:
        raise EvaluationError(f"--warm-up-hours: {exc}") from None
