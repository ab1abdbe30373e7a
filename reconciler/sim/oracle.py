"""``oracle-min``: the fewest instances that keep the SLO, with the whole workload known.

Every efficiency figure of the project is a multiple of this bound. It answers: with
perfect knowledge of every request, and the simulator's own performance model, how few
prefill and decode instances could have served this day within the SLO?

How it is found. Time is cut into windows of ``window_s`` seconds (60 by default). The
windows are sized one after the other, each from the exact state the previous one left
(its prefill backlog and decode batch), by trying counts on the simulator itself:

1. **decode**: the fewest decode instances with which the window's arrivals meet TBT
   (per token: the SLO quantile of each request's gaps within the SLO) for at least
   the policy's ``attainment_goal`` of them, prefill held generous so it does not
   limit the decode load;
2. **prefill**: with that decode count, the fewest prefill instances with which the
   window's *attainable* arrivals meet both SLOs (TTFT within the SLO and TBT as
   above) for at least ``attainment_goal`` of them; if no prefill count can (the
   decode admission wait or first step is the limit), decode grows by one and prefill
   is searched again.

A request is attainable when its TTFT can meet the SLO on an idle instance of the
fastest allowed type (``reconciler.sim.engine.idle_ttft_s``); the others miss under
every policy and are left out of the sizing, as they are reported apart
(``unattainable_share``). A window's requests are judged after it ends, once the last
arrival's first token has resolved and the 99th-percentile output has had time to
finish at the TBT SLO, the counts held and the following arrivals still coming; a
request still decoding then is judged on the tokens it has generated so far, since the
following windows are sized to serve it. A count that meets the window with one instance fewer of either role would
have been found, so taking one instance out of any window breaks that window's SLO
(or the role is at ``min_instances``): this is what makes the bound minimal, and a test
checks it.

Counts are searched by galloping from an estimate (the window's demand over one
instance's capacity, scaled as the previous window's answer was) and then bisecting, so
a day costs a few trial windows per window rather than a full search. The bound
assumes more instances never hurt a window (true in the model: capacity only grows).

Cost: an instance that a window needs and the previous one did not have is started
``startup_s`` before the window and charged from its start (from t = 0 at the
earliest: the instances the windows within a start-up need are running at t = 0, the
warm state every policy starts from, ``warm_counts``).
Instances run on the most preferred allowed GPU type that fits, on RDMA links (a
deployment group inside one subgroup): the optimistic case, as a bound should be.
The GPU catalogue has no prices yet, so "cheapest" is the policy's preference order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import PermanentError
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig, SimSnapshot, per_request

DEFAULT_WINDOW_S = 60
# Seconds added to how long a window's arrivals are followed (rounding, the first step).
JUDGE_MARGIN_S = 2


class OracleError(PermanentError):
    """oracle-min cannot size this service (no GPU type of a role fits the model)."""


@dataclass(frozen=True)
class OracleWindow:
    """The counts chosen for one window, and whether they meet its SLO."""

    start_s: int
    prefill: int
    decode: int
    met: bool  # False: even ``max_instances`` cannot meet this window's goal
    attainment: float  # both-SLO share of the window's attainable requests


@dataclass(frozen=True)
class OracleMinPlan:
    """The per-window counts and the simulator run that follows them."""

    window_s: int
    windows: tuple[OracleWindow, ...]
    prefill_gpu_type: str
    decode_gpu_type: str
    sim: ServiceSim  # advanced to the end of the horizon under the chosen counts
    trials: int  # trial windows simulated by the search


def _role_type(sim: ServiceSim, policy: ServicePolicy, role: str) -> str:
    """The most preferred allowed GPU type of a role that the model fits."""
    pools = sim.prefill_pools if role == "prefill" else sim.decode_pools
    for pool in pools:
        if pool.perf.fits:
            return pool.gpu_type
    raise OracleError(
        f"oracle-min: no allowed {role} GPU type of service '{policy.name}' fits the model"
    )


@dataclass(frozen=True)
class _Verdict:
    ttft_share: float  # of the attainable arrivals
    both_share: float  # of the attainable arrivals


class _WindowJudge:
    """Judges one window's arrivals on the simulator's current state."""

    def __init__(self, sim: ServiceSim, window_s: int):
        sample = sim.profile.sample
        if sample is None or sample.requests == 0:
            raise OracleError(f"oracle-min: workload '{sim.profile.name}' has no requests")
        self.sim = sim
        self.arrival = sample.arrival_s
        self.prompt = sample.prompt_tokens.astype(np.float64)
        self.output = sample.output_tokens.astype(np.float64)
        self.window_s = window_s

    def __call__(self, start_s: int, end_s: int) -> _Verdict:
        lo, hi = np.searchsorted(self.arrival, [start_s, end_s], side="left")
        if hi <= lo:
            return _Verdict(1.0, 1.0)
        r = per_request(
            self.sim,
            self.arrival[lo:hi],
            self.prompt[lo:hi],
            self.output[lo:hi],
            unfinished_so_far=True,
        )
        attainable = ~r.unattainable
        if not attainable.any():
            return _Verdict(1.0, 1.0)
        return _Verdict(float(r.ttft_ok[attainable].mean()), float(r.both_ok[attainable].mean()))


def _gallop_min(ok: Callable[[int], bool], lo: int, hi: int, guess: int) -> tuple[int, bool]:
    """The least ``n`` in [lo, hi] with ``ok(n)`` (``ok`` monotone), searched from
    ``guess`` by doubling steps then bisection; (hi, False) when none is."""
    guess = min(max(guess, lo), hi)
    good: int | None
    if ok(guess):
        good, bad, step = guess, lo - 1, 1
        while good - step >= lo:
            if not ok(good - step):
                bad = good - step
                break
            good -= step
            step *= 2
    else:
        good, bad, step = None, guess, 1
        while bad < hi:
            candidate = min(bad + step, hi)
            if ok(candidate):
                good = candidate
                break
            bad = candidate
            step *= 2
        if good is None:
            return hi, False
    while good - bad > 1:  # ok(good) holds, ok(bad) does not (or bad < lo)
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, True


def _judge_s(policy: ServicePolicy, profile: LoadProfile) -> int:
    """How long a window's arrivals are followed after it ends: until their first token
    has resolved and nearly all of them (the 99th-percentile output, decoding at the
    TBT SLO) have finished."""
    return (
        math.ceil(policy.slo.ttft_ms / 1000.0 + profile.output_p99 * policy.slo.tbt_ms / 1000.0)
        + JUDGE_MARGIN_S
    )


class _DemandEstimate:
    """Instances a window's arrivals would keep busy: its prompt work over one prefill
    instance's compute, its output tokens over one decode instance's tokens/s at the
    TBT SLO (the simulator's own figures)."""

    def __init__(self, sim: ServiceSim, prefill_type: str, decode_type: str):
        profile = sim.profile
        self.work = np.concatenate(
            (
                [0.0],
                np.cumsum(
                    sim.work_linear * profile.prompt_sum
                    + sim.work_attention * profile.prompt_sq_sum
                ),
            )
        )
        self.output = np.concatenate(([0.0], np.cumsum(profile.output_sum)))
        prefill_pool = next(p for p in sim.prefill_pools if p.gpu_type == prefill_type)
        decode_pool = next(p for p in sim.decode_pools if p.gpu_type == decode_type)
        self.prefill_work_per_s = max(prefill_pool.capacity_work_per_s, 1e-9)
        self.decode_tps = max(decode_pool.slo_capacity_tps, 1e-9)

    def __call__(self, start_s: int, end_s: int) -> tuple[float, float]:
        span = max(end_s - start_s, 1)
        end = min(end_s, self.work.size - 1)
        start = min(start_s, end)
        prefill = (self.work[end] - self.work[start]) / span / self.prefill_work_per_s
        decode = (self.output[end] - self.output[start]) / span / self.decode_tps
        return prefill, decode


def _ttft_judge_s(policy: ServicePolicy) -> int:
    """How long a window's arrivals are followed when only their TTFT is asked."""
    return math.ceil(policy.slo.ttft_ms / 1000.0) + JUDGE_MARGIN_S


class _WindowSearch:
    """Trial runs of one window from the state the previous windows left.

    A trial that only asks about TTFT follows the window's arrivals until their first
    token (``ttft_s`` after it ends); one that asks about both SLOs follows them until
    nearly all have finished (``judge_s``). The state at the window's end is the same
    either way, so either trial can be kept."""

    def __init__(
        self,
        sim: ServiceSim,
        judge: _WindowJudge,
        prefill_type: str,
        decode_type: str,
        judge_s: int,
        ttft_s: int,
    ):
        self.sim = sim
        self.judge = judge
        self.prefill_type = prefill_type
        self.decode_type = decode_type
        self.judge_s = judge_s
        self.ttft_s = min(ttft_s, judge_s)
        self.trials = 0
        self.start = self.end = 0
        self.base: SimSnapshot | None = None
        # (prefill, decode) -> (verdict, state at the window's end, the window's rows of
        # the per-second series, followed to judge_s)
        self.cache: dict[tuple[int, int], tuple[_Verdict, SimSnapshot, np.ndarray, bool]] = {}

    def begin(self, start_s: int, end_s: int) -> None:
        self.start, self.end = start_s, end_s
        self.base = self.sim.snapshot()
        self.cache = {}

    def run(self, prefill: int, decode: int, full: bool = True) -> _Verdict:
        cached = self.cache.get((prefill, decode))
        if cached is not None and (cached[3] or not full):
            return cached[0]
        assert self.base is not None, "begin() a window first"
        sim = self.sim
        self.trials += 1
        sim.restore(self.base)
        sim.set_counts(
            {(self.prefill_type, "rdma"): float(prefill)}, {self.decode_type: decode}, {}
        )
        while sim.t < self.end:
            sim.step()
        at_end = sim.snapshot()
        rows = sim.series.data[self.base.rows : at_end.rows].copy()
        follow_s = self.judge_s if full else self.ttft_s
        while sim.t < self.end + follow_s:
            sim.step()
        verdict = self.judge(self.start, self.end)
        self.cache[(prefill, decode)] = (verdict, at_end, rows, full)
        return verdict

    def ttft_meets(self, goal: float, decode: int, prefill: int) -> bool:
        return self.run(prefill, decode, full=False).ttft_share >= goal

    def both_meets(self, goal: float, prefill: int, decode: int) -> bool:
        return self.run(prefill, decode).both_share >= goal

    def accept(self, prefill: int, decode: int) -> _Verdict:
        """Keep these counts for the window: the state moves to its end, and the
        window's rows of the per-second series (the last trial wrote its own) are put
        back."""
        verdict = self.run(prefill, decode)
        _verdict, at_end, rows, _full = self.cache[(prefill, decode)]
        self.sim.restore(at_end)
        self.sim.series.data[at_end.rows - rows.shape[0] : at_end.rows] = rows
        return verdict


def plan_oracle_min(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    config: SimConfig | None = None,
    *,
    window_s: int = DEFAULT_WINDOW_S,
    windows: int | None = None,
) -> OracleMinPlan:
    """Size every window (module docstring); ``windows`` stops after that many (the
    warm start needs only the first)."""
    if window_s < 1:
        raise OracleError(f"oracle-min: window must be at least 1 s, got {window_s}")
    config = config or SimConfig()
    sim = ServiceSim(policy, cluster, profile, config)
    prefill_type = _role_type(sim, policy, "prefill")
    decode_type = _role_type(sim, policy, "decode")
    judge = _WindowJudge(sim, window_s)
    goal = policy.slo.attainment_goal
    judge_s = _judge_s(policy, profile)
    p_lo = max(policy.prefill.min_instances, 1)
    d_lo = max(policy.decode.min_instances, 1)
    p_hi = max(policy.prefill.max_instances, p_lo)
    d_hi = max(policy.decode.max_instances, d_lo)
    horizon = profile.horizon_s
    count = (
        math.ceil(horizon / window_s)
        if windows is None
        else min(windows, math.ceil(horizon / window_s))
    )
    search = _WindowSearch(sim, judge, prefill_type, decode_type, judge_s, _ttft_judge_s(policy))
    chosen: list[OracleWindow] = []
    # Where each window's search starts: the window's demand over one instance's
    # capacity, scaled by how the previous window's answer compared with its own
    # estimate (the search is exact either way; a close start saves trials).
    estimate = _DemandEstimate(sim, prefill_type, decode_type)
    scale = [1.0, 1.0]
    for k in range(count):
        start = k * window_s
        end = min(start + window_s, horizon)
        search.begin(start, end)
        guess_p, guess_d = estimate(start, end)
        # Prefill first, against as much decode as the policy allows (decode only
        # shortens TTFT: admission wait, first step); then the fewest decode with it.
        prefill, prefill_met = _gallop_min(
            functools.partial(search.ttft_meets, goal, d_hi),
            p_lo,
            p_hi,
            round(guess_p * scale[0]),
        )
        decode, decode_met = _gallop_min(
            functools.partial(search.both_meets, goal, prefill),
            d_lo,
            d_hi,
            round(guess_d * scale[1]),
        )
        if guess_p > 0 and guess_d > 0:
            scale = [prefill / guess_p, decode / guess_d]
        verdict = search.accept(prefill, decode)
        chosen.append(
            OracleWindow(
                start_s=start,
                prefill=prefill,
                decode=decode,
                met=decode_met and prefill_met,
                attainment=verdict.both_share,
            )
        )
    return OracleMinPlan(
        window_s=window_s,
        windows=tuple(chosen),
        prefill_gpu_type=prefill_type,
        decode_gpu_type=decode_type,
        sim=sim,
        trials=search.trials,
    )


def replay_window(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    plan: OracleMinPlan,
    window: int,
    prefill: int,
    decode: int,
    config: SimConfig | None = None,
) -> tuple[float, float]:
    """(TTFT share, both-SLO share) of window ``window``'s attainable arrivals when the
    windows before it run the plan's counts and it runs ``prefill`` and ``decode``,
    judged exactly as the search judged it: how a reader checks the bound's minimality."""
    sim = ServiceSim(policy, cluster, profile, config or SimConfig())
    judge_s = _judge_s(policy, profile)
    search = _WindowSearch(
        sim,
        _WindowJudge(sim, plan.window_s),
        plan.prefill_gpu_type,
        plan.decode_gpu_type,
        judge_s,
        _ttft_judge_s(policy),
    )
    for k in range(window + 1):
        start = k * plan.window_s
        search.begin(start, min(start + plan.window_s, profile.horizon_s))
        if k < window:
            chosen = plan.windows[k]
            search.accept(chosen.prefill, chosen.decode)
    verdict = search.run(prefill, decode)
    return verdict.ttft_share, verdict.both_share


def oracle_min_initial_counts(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    config: SimConfig | None = None,
    window_s: int = DEFAULT_WINDOW_S,
) -> tuple[int, int]:
    """The warm state every policy starts in: what oracle-min runs or has started at
    t = 0, i.e. the most of each role over the windows that begin within a start-up
    (oracle-min started those instances before t = 0, so another policy could not
    have asked for them in time)."""
    lead_s = max(policy.prefill.startup_s, policy.decode.startup_s)
    windows = math.floor(lead_s / window_s) + 1
    plan = plan_oracle_min(policy, cluster, profile, config, window_s=window_s, windows=windows)
    return warm_counts(plan, policy)


def warm_counts(plan: OracleMinPlan, policy: ServicePolicy) -> tuple[int, int]:
    """Each role's most over the plan's windows that begin within its start-up."""
    counts = []
    for role in ("prefill", "decode"):
        lead_s = policy.role(role).startup_s
        early = [w for w in plan.windows if w.start_s <= lead_s] or [plan.windows[0]]
        counts.append(max(w.prefill if role == "prefill" else w.decode for w in early))
    return counts[0], counts[1]


def per_second_counts(
    plan: OracleMinPlan, policy: ServicePolicy, horizon_s: int
) -> dict[str, np.ndarray]:
    """Instances and GPUs per second under the plan (module docstring: an instance a
    window adds starts ``startup_s`` before it and is charged from then)."""
    prefill_ready = np.zeros(horizon_s)
    decode_ready = np.zeros(horizon_s)
    prefill_starting = np.zeros(horizon_s)
    decode_starting = np.zeros(horizon_s)
    previous: tuple[int, int] | None = None
    for window in plan.windows:
        start, end = window.start_s, min(window.start_s + plan.window_s, horizon_s)
        prefill_ready[start:end] = window.prefill
        decode_ready[start:end] = window.decode
        if previous is not None:
            for added, startup_s, starting in (
                (window.prefill - previous[0], policy.prefill.startup_s, prefill_starting),
                (window.decode - previous[1], policy.decode.startup_s, decode_starting),
            ):
                if added > 0:
                    starting[max(0, start - round(startup_s)) : start] += added
        previous = (window.prefill, window.decode)
    gp, gd = policy.prefill.gpus_per_instance, policy.decode.gpus_per_instance
    return {
        "prefill_ready": prefill_ready,
        "prefill_starting": prefill_starting,
        "decode_ready": decode_ready,
        "decode_starting": decode_starting,
        "prefill_gpus": (prefill_ready + prefill_starting) * gp,
        "decode_gpus": (decode_ready + decode_starting) * gd,
    }


__all__ = [
    "DEFAULT_WINDOW_S",
    "OracleError",
    "OracleMinPlan",
    "OracleWindow",
    "oracle_min_initial_counts",
    "per_second_counts",
    "plan_oracle_min",
    "replay_window",
    "warm_counts",
]
