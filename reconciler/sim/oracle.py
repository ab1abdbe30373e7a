"""``oracle-min``: the fewest instances that keep the SLO, with the whole workload known.

Every efficiency figure of the project is a multiple of this bound. It answers: with
perfect knowledge of every request, and the simulator's own performance model, how few
prefill and decode instances could have served this day within the SLO?

How it is found. Time is cut into windows of ``window_s`` seconds (60 by default). The
windows are sized one after the other, each from the exact state the previous one left
(its prefill backlog and decode batch), by trying counts on the simulator itself:

1. **prefill**: the fewest prefill instances with which the window's *attainable*
   arrivals meet TTFT for at least the policy's ``attainment_goal`` of them, decode
   held at ``max_instances`` (decode only shortens TTFT: admission wait, first step);
2. **decode**: with that prefill count, the fewest decode instances with which the
   window's attainable arrivals meet both SLOs (TTFT within the SLO and TBT per token:
   the SLO quantile of each request's gaps within the SLO) for at least
   ``attainment_goal`` of them. Where decode limits TTFT (a first step on a large batch
   pushes a request just over the TTFT SLO), this is what decode needs to bring it
   back: the prefill count stays the fewest with which TTFT can meet the goal at all.
3. **trade**: where one decode instance fewer misses TTFT while meeting TBT, decode's
   count is set by the requests near the TTFT SLO, and more prefill can let fewer
   decode instances pass. So prefill + 1, + 2, ... is tried, each with its own decode
   search, as long as each step lowers the window's GPUs: the Mooncake trace on chat
   (bench_matrix's ``mooncake-x10``), sized for 98.1% of each window's attainable
   requests, cost 1,653.5 GPU-hours with prefill's least count taken first and 1,452.4
   with the trade.

4. **the policy's bounds**: the pair, the least the SLO needs, then runs as the policy
   lets a pair run (``bounded_pair``: each role's min/max, the ``pd_ratio`` bounds,
   whole deployment groups), raised only: the planner is held to the same policy file,
   and a bound below what the file allows would count the file's cost as the
   planner's (chat's 1:3 minimum on outputs four times as long asks 6 prefill where
   the SLO needs 4 beside 17 decode). So "minimal" is minimal within those bounds: one
   instance fewer of a role either breaks the window's SLO or leaves the bounds.

A request is attainable when its TTFT can meet the SLO on an idle instance of the
fastest allowed type (``reconciler.sim.engine.idle_ttft_s``); the others miss under
every policy and are left out of the sizing, as they are reported apart
(``unattainable_share``). A window's requests are judged after it ends, once the last
arrival's first token has resolved and the 99th-percentile output has had time to
finish at the TBT SLO, the counts held and the following arrivals still coming; a
request still decoding then is judged on the tokens it has generated so far, since the
following windows are sized to serve it. A trial that asks only about TTFT (step 1)
follows the arrivals only until their first token. A count that meets the window with
one instance fewer of either role would have been found, so taking one instance out of
any window breaks that window's SLO (or the role is at ``min_instances``): this is what
makes the bound minimal, and a test checks it.

How the counts are searched. A count is taken only once trials have shown that it
passes and that the count one below fails (or is below ``min_instances``), so the
answer is the same whatever guided the search; the bound assumes more instances never
hurt a window (true in the model: capacity only grows), and more decode never lengthens
a TTFT. Models of the trials only choose which counts to try:

- prefill: the window's fluid prefill queue and G/G/c wait (the simulator's formulas:
  Lindley's recursion over the arrivals' work, Allen-Cunneen on the smoothed rate) for
  any count, plus each request's TTFT beyond that wait as the last trial measured it
  (before one: its idle TTFT plus what the last window added). The least count the
  model says meets TTFT is ``p``; one TTFT trial at ``p - 1`` (decode at its most) must
  fail, and that ``p`` passes follows from the decode search's passing trial (its TTFT
  meets the goal with less decode). If no decode count passes with ``p``, or a decode
  trial misses TTFT while meeting TBT, a TTFT trial at ``p`` settles whether decode or
  prefill is short; the prefill search goes on upward if prefill is.
- decode: the trials' longest inter-token gap (the step time of the most loaded
  second) and TTFT margin rise steeply as decode shrinks toward what the window needs
  and hardly move far above it, which ``y = y_a + k (n^-g - n_a^-g)`` follows (``y_a``
  at decode's most, ``k``, ``g`` through two trials): TBT holds from where the gap
  reaches the TBT SLO (lower where the failing trials' TBT share says a slow second is
  tolerated), TTFT from where its margin reaches 0. The first count tried is the last
  exact TBT need, scaled by the peak 20 s of output tokens. Decode counts above the
  window's starting count add a generation of new instances, whose gap can follow
  another curve (under a stale router, which floods them, far another): once a count
  above it has failed TBT, only the trials above it are followed (once one at or
  below it has met TBT, only those).

A try is kept strictly inside what the trials have decided; an estimate beyond a
decided count steps away from it by a growing share (or halves the bracket), the
curves pull in the far side when trials keep landing on one side (Illinois), and
estimates that keep missing on one side make the steps grow, then halve the bracket.
A trial that has already lost its window stops early: at its checks (a decode trial
30 s in, at the window's end and half-way through following it, once a token has come
slower than the TBT SLO; the prefill trial when the model expects its misses to have
shown), the requests whose first token has resolved and that already miss the SLO
(which no later second can undo) are counted, and once they are more than the goal
allows the trial is a miss. On the bench day a window costs about one short prefill
trial and five to six decode trials.

What a trial costs: the window's prefill side (arrivals, the prefill queue) depends on
the prefill count alone, so the trials of a window with one prefill count replay the
first one's (``engine.PrefillTape``); the requests' own prefill costs are worked out
once a window (``engine.PromptTables``), and the judging reads only the seconds since
the window's arrivals. None of this changes a trial's outcome.

Under a simulator in which a count can pass while more fail (not monotone), a
count found this way still passes with the count below failing, but it need not be the
least that passes, and another search can stop at another one. The decode-pinned engine
is such a simulator around the window's starting count (a few instances more form a
new generation, which can fail where the starting count passed), and above it too: on
the bench day of ``benchmarks/bench_sim.py`` the window at 5,340 s (prefill 486, from
456 decode instances) meets the goal with 473 and 474 decode instances, misses it with
475 to 477 and meets it again with 478 (``replay_window``). So what guides the search
is part of the bound, not only of its cost: a guide that bisected once a pass and a
miss were known ended that window at 478, and a search made cheaper must be shown to
take the same counts as before, not only counts that pass.

Cost: an instance is started ``startup_s`` before the first window that needs it and
charged from its start (from t = 0 at the earliest: the instances the windows within a
start-up need are running at t = 0, the warm state every policy starts from,
``warm_counts``), and one that a window no longer needs is stopped unless a window
within a start-up needs it again: kept, it costs no more than a stop and a fresh
start. So each second is charged the most instances any second from it to a start-up
later serves with (``per_second_counts``), and the bound never holds more than a
role's ``max_instances``. (Charging each added instance its own start-up instead, a
plan that dips and recovers within a start-up paid for both fleets at once: on
held-out Mooncake summarize x3 up to 51 prefill and 122 decode instances against
``max_instances`` of 32 and 64, 4% of its GPU-hours.)
Instances run on the most preferred allowed GPU type that fits, on RDMA links (a
deployment group inside one subgroup), and the decode router places work by each
instance's current load (``bound_config``: the policies' runs route by the load
reported a second before): the optimistic case, as a bound should be. With the
stale router a window sized at its least leaves the next to scale out, the router
floods the new instances with the admissions that queued meanwhile, and they need
more: a per-window search pays that as a saw-tooth (on the bench day of
``benchmarks/bench_sim.py`` 227 of 480 windows needed more decode than the one
before, at a median 1.34x, and the bound was 9% higher), which no whole day's fleet
has to, so it would raise the bound above what a steadier fleet needs.
The order is the policy's preference order, not price or capacity per dollar: the
bound is on instance counts of the preferred types (a policy that put a role on a
faster allowed type could need fewer GPU-hours; none here does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import PermanentError
from reconciler.perfmodel.queueing import MAX_GGC_UTILISATION
from reconciler.policy.base import Clamp
from reconciler.policy.coordinated import policy_numbers, policy_shaped_pair
from reconciler.sim.engine import (
    LoadProfile,
    PrefillTape,
    PromptTables,
    ServiceSim,
    SimConfig,
    SimSnapshot,
    per_request,
    prompt_tables,
    token_gap_quantiles_s,
)
from reconciler.sim.generations import fast_clip

DEFAULT_WINDOW_S = 60
# Seconds added to how long a window's arrivals are followed (rounding, the first step).
JUDGE_MARGIN_S = 2
PREFILL_LINK = "rdma"  # the optimistic link (module docstring)
# Seconds into a window at which a decode trial that has seen a token slower than the TBT
# SLO looks whether its window is already lost (and at the window's end, and half-way
# through following its arrivals).
DECODE_CHECKS_S: tuple[int, ...] = (30,)
# The exponent of the longest inter-token gap against decode (``_DecodeModel``) when a
# window has one decode trial: about where the calibrated step time turns from reading
# the weights to computing (it was 3-9 over the bench day; 6 guessed best there).
GAP_EXPONENT = 6.0
# How far past a decided count the search steps when the model's estimate lies beyond it
# (a share of that count, doubling with each further trial on that side).
REACH = 0.04


class OracleError(PermanentError):
    """oracle-min cannot size this service (no GPU type of a role fits the model)."""


def bounded_pair(
    policy: ServicePolicy, prefill: int, decode: int
) -> tuple[int, int, tuple[Clamp, ...]]:
    """A pair sized outside any decision (oracle-min's window, static peak) as the
    policy lets it run (``policy_shaped_pair``: min/max, the ``pd_ratio`` bounds, whole
    groups), the clamps saying what moved. The planner is held to those bounds, so a
    bound or a baseline that is not measures the policy file as much as the planner
    (chat's 1:3 minimum on outputs 4x as long: 4 prefill per 17 decode). Only ever
    raised: where the ratio takes a role below what was sized (its other role capped at
    ``max_instances``), that role keeps what was sized, the SLO's need before the
    bound's."""
    shaped_prefill, shaped_decode, clamps = policy_shaped_pair(policy, prefill, decode)
    numbers = policy_numbers(policy)
    return (
        max(numbers.prefill_bounds.clip(prefill), shaped_prefill),
        max(numbers.decode_bounds.clip(decode), shaped_decode),
        clamps,
    )


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


@dataclass(frozen=True)
class InventoryExcess:
    """Where a plan holds more GPUs of one type than the cluster has. The search is held
    to each role's ``max_instances``, not to the cluster: the roles may share a type,
    and sizing one under a joint limit would break the search's premise that more of
    the other role never hurts. Such a plan is the least that meets the goal asked,
    not a fleet this cluster can run, so it is said beside the bound's figures."""

    gpu_type: str
    inventory_gpus: int
    most_gpus: int  # the most the plan holds at any second
    minutes_over: int  # minutes with a second over the inventory
    minutes: int

    def note(self) -> str:
        return (
            f"holds more {self.gpu_type} GPUs than the cluster has in {self.minutes_over} "
            f"of {self.minutes} minutes (up to {self.most_gpus} of {self.inventory_gpus}): "
            "the least that meets the goal asked, not a fleet this cluster can run"
        )


def plan_gpus_by_type(
    plan: OracleMinPlan, counts: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """GPUs per second of each type under the plan (``counts`` from
    :func:`per_second_counts`): every instance of a role runs on the plan's type for
    it, and both roles' GPUs add up where they share one."""
    per_type: dict[str, np.ndarray] = {}
    for gpu_type, gpus in (
        (plan.prefill_gpu_type, counts["prefill_gpus"]),
        (plan.decode_gpu_type, counts["decode_gpus"]),
    ):
        per_type[gpu_type] = per_type[gpu_type] + gpus if gpu_type in per_type else gpus
    return per_type


def inventory_excess(
    gpus_by_type: Mapping[str, np.ndarray], inventory_gpus: Mapping[str, int]
) -> tuple[InventoryExcess, ...]:
    """Each GPU type whose GPUs per second (``plan_gpus_by_type``) exceed
    ``inventory_gpus`` (the cluster's, ``ClusterSpec.gpus_by_type``) at some second."""
    excess = []
    for gpu_type, held in gpus_by_type.items():
        inventory = inventory_gpus.get(gpu_type, 0)
        over = held > inventory
        if over.any():
            minutes = np.unique(np.flatnonzero(over) // 60)
            excess.append(
                InventoryExcess(
                    gpu_type,
                    inventory,
                    round(float(held.max())),
                    len(minutes),
                    math.ceil(held.size / 60),
                )
            )
    return tuple(excess)


def _role_type(sim: ServiceSim, policy: ServicePolicy, role: str) -> str:
    """The most preferred allowed GPU type of a role that the model fits."""
    pools = sim.prefill_pools if role == "prefill" else sim.decode_pools
    for pool in pools:
        if pool.perf.fits:
            return pool.gpu_type
    raise OracleError(
        f"oracle-min: no allowed {role} GPU type of service '{policy.name}' fits the model"
    )


@dataclass(frozen=True, eq=False)
class _Verdict:
    """One trial's outcome for a window's attainable arrivals: the shares decide; the
    rest only guides which count the search tries next."""

    ttft_share: float
    both_share: float
    tbt_share: float = 1.0
    # TTFT of the last request the goal may not lose, over the TTFT SLO (s): <= 0 when
    # TTFT meets the goal (requests served only in part count as over).
    ttft_margin_s: float = -math.inf
    ttft_s: np.ndarray | None = None  # per attainable request (inf: unresolved, dropped)
    gap_max_s: float = math.nan  # the longest inter-token gap of the trial
    gap_window_s: float = math.nan  # ... within the window itself
    settled: bool = False  # stopped early, settled as a miss (shares are upper bounds)


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The ``k``-th largest of ``values`` (0: the largest), as ``-np.partition(-values,
    k)[k]`` gives it: the negated copy is partitioned in place (no wrapper, no second
    copy)."""
    negated = -values
    negated.partition(k)
    return float(-negated[k])


def _mean(values: np.ndarray) -> float:
    """``float(values.mean())`` (the same sum over the same count) without its wrapper."""
    return float(np.add.reduce(values)) / values.size


class _WindowJudge:
    """Judges one window's arrivals on the simulator's current state."""

    def __init__(self, sim: ServiceSim, window_s: int, goal: float = 1.0):
        sample = sim.profile.sample
        if sample is None or sample.requests == 0:
            raise OracleError(f"oracle-min: workload '{sim.profile.name}' has no requests")
        self.sim = sim
        self.arrival = sample.arrival_s
        self.prompt = sample.prompt_tokens.astype(np.float64)
        self.output = sample.output_tokens.astype(np.float64)
        self.window_s = window_s
        self.goal = goal
        self.ttft_slo_s = sim.policy.slo.ttft_ms / 1000.0
        self._tables_key: tuple[int, int] | None = None
        self._tables = prompt_tables(sim, np.zeros(0))

    def span(self, start_s: int, end_s: int) -> tuple[int, int]:
        """The sample's requests arriving in [start_s, end_s)."""
        lo, hi = self.arrival.searchsorted([start_s, end_s], side="left")
        return int(lo), int(hi)

    def tables(self, lo: int, hi: int) -> PromptTables:
        """The ``PromptTables`` of requests ``lo:hi`` (a window's, judged by every trial)."""
        if self._tables_key != (lo, hi):
            self._tables_key = (lo, hi)
            self._tables = prompt_tables(self.sim, self.prompt[lo:hi])
        return self._tables

    def __call__(self, start_s: int, end_s: int) -> _Verdict:
        lo, hi = self.span(start_s, end_s)
        if hi <= lo:
            return _Verdict(1.0, 1.0)
        r = per_request(
            self.sim,
            self.arrival[lo:hi],
            self.prompt[lo:hi],
            self.output[lo:hi],
            unfinished_so_far=True,
            mean_gaps=False,
            tables=self.tables(lo, hi),
        )
        attainable = ~r.unattainable
        n = int(attainable.sum())
        if n == 0:
            return _Verdict(1.0, 1.0)
        complete = r.complete[attainable] > 0
        # A request's TTFT on the pools it may land on (the oracle uses one).
        ttft = np.full(n, -np.inf)
        for values, weights in zip(r.ttft_values, r.ttft_weights, strict=True):
            ttft = np.where(weights[attainable] > 0, np.maximum(ttft, values[attainable]), ttft)
        ttft = np.where(complete & (ttft > -np.inf), ttft, np.inf)
        may_miss = math.floor(n * (1.0 - self.goal) + 1e-9)
        excess = ttft - self.ttft_slo_s
        margin = _kth_largest(excess, may_miss) if may_miss < n else -math.inf
        return _Verdict(
            ttft_share=_mean(r.ttft_ok[attainable]),
            both_share=_mean(r.both_ok[attainable]),
            tbt_share=_mean(r.tbt_ok[attainable]),
            ttft_margin_s=margin,
            ttft_s=ttft,
        )

    def settled(self, start_s: int, end_s: int, now_s: int, both: bool) -> _Verdict | None:
        """The window's verdict if ``now_s`` (the simulator's time, before the arrivals
        have been followed to the end) already settles that it misses the goal for
        both SLOs (or for TTFT, not ``both``): the requests whose first token has
        resolved and that already miss (TTFT over the SLO, more slow tokens than TBT
        allows, dropped: none of which a later second can undo) are more than the goal
        lets the whole window's attainable requests miss. None otherwise. The shares it
        reports are upper bounds."""
        lo, hi = self.span(start_s, end_s)
        if hi <= lo:
            return None
        tables = self.tables(lo, hi)
        attainable = tables.idle_ttft_s <= self.ttft_slo_s
        n = int(attainable.sum())
        arrived = int(self.arrival[lo:hi].searchsorted(now_s - 1, side="left"))
        if n == 0 or arrived == 0:
            return None
        r = per_request(
            self.sim,
            self.arrival[lo : lo + arrived],
            self.prompt[lo : lo + arrived],
            self.output[lo : lo + arrived],
            unfinished_so_far=True,
            mean_gaps=False,
            tables=tables.head(arrived),
        )
        mine = attainable[:arrived]
        ttft = np.full(arrived, -np.inf)
        for values, weights in zip(r.ttft_values, r.ttft_weights, strict=True):
            ttft = np.where(weights > 0, np.maximum(ttft, values), ttft)
        resolved = mine & np.isfinite(ttft) & (ttft > -np.inf)
        missed = [float((1.0 - ok[resolved]).sum()) for ok in (r.ttft_ok, r.tbt_ok, r.both_ok)]
        if 1.0 - missed[2 if both else 0] / n >= self.goal - 1e-9:
            return None
        full_ttft = np.full(n, np.inf)
        full_ttft[: int(mine.sum())] = np.where(
            r.complete[mine] > 0, np.where(resolved[mine], ttft[mine], np.inf), np.inf
        )
        return _Verdict(
            ttft_share=1.0 - missed[0] / n,
            both_share=1.0 - missed[2] / n,
            tbt_share=1.0 - missed[1] / n,
            ttft_margin_s=-math.inf,
            ttft_s=full_ttft,
            settled=True,
        )


def _steps_within(sim: ServiceSim, start: int, stop: int, limit_s: float) -> bool:
    """Whether every decode step that generated tokens in seconds [start, stop) took at
    most ``limit_s``: then the longest inter-token gap (``token_gap_quantiles_s`` at 1,
    one of those steps, or None without any) is at most ``limit_s`` too."""
    rows = slice(start, max(start, min(stop, sim.series.rows)))
    data = sim.series.data
    tau = data[rows, sim._slot_columns_array["tau"]]
    tokens = data[rows, sim._slot_columns_array["tokens"]]
    # ``not (tau <= limit)`` rather than ``tau > limit``: a NaN step is not within it.
    return not ((tokens > 0) & ~(tau <= limit_s)).any()


def _with_gaps(verdict: _Verdict, gaps: Sequence[float | None]) -> _Verdict:
    """``verdict`` with the trial's longest inter-token gap overall and within the
    window (``token_gap_quantiles_s`` at 1, in that order; nan: no token)."""
    gap, gap_window = gaps
    return replace(
        verdict,
        gap_max_s=math.nan if gap is None else gap,
        gap_window_s=math.nan if gap_window is None else gap_window,
    )


def _judge_s(policy: ServicePolicy, profile: LoadProfile, config: SimConfig | None = None) -> int:
    """How long a window's arrivals are followed after it ends: until their first token
    has resolved and nearly all of them (the 99th-percentile output, decoding at the
    TBT SLO) have finished, and at most as long as a run follows its last arrivals
    (``SimConfig.drain_tail_s``). Every trial of every window steps that far: a trace
    whose outputs are millions of tokens long (10 million at 50 ms is 500,000 s) kept
    the search for one request's warm start running for minutes."""
    tail_s = (config or SimConfig()).drain_tail_s
    follow_s = policy.slo.ttft_ms / 1000.0 + profile.output_p99 * policy.slo.tbt_ms / 1000.0
    return math.ceil(min(follow_s, tail_s)) + JUDGE_MARGIN_S


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
        self.previous_decode = 0  # the decode count the window starts from
        # Per prefill count, the window's prefill side as its first trial ran it: the
        # trials with other decode counts replay it (``PrefillTape``).
        self.tapes: dict[int, PrefillTape] = {}
        # (prefill, decode) -> (verdict, state at the window's end, the window's rows of
        # the per-second series, followed to judge_s); a trial settled early has no state.
        self.cache: dict[
            tuple[int, int], tuple[_Verdict, SimSnapshot | None, np.ndarray | None, bool]
        ] = {}
        self.tbt_slo_s = sim.policy.slo.tbt_ms / 1000.0

    def begin(self, start_s: int, end_s: int) -> None:
        self.start, self.end = start_s, end_s
        self.base = self.sim.snapshot()
        self.tapes = {}
        self.previous_decode = self.sim.decode_ready[self.sim.decode_index[self.decode_type]]
        self.cache = {}

    def run(
        self, prefill: int, decode: int, full: bool = True, checks: Sequence[int] = ()
    ) -> _Verdict:
        """The verdict of a trial with these counts (cached for the window). At each of
        ``checks`` (seconds) the trial may stop early, settled as a miss (``settled``);
        a trial that follows both SLOs only tries when a token has already come slower
        than the TBT SLO."""
        cached = self.cache.get((prefill, decode))
        if cached is not None and (cached[3] or not full):
            return cached[0]
        assert self.base is not None, "begin() a window first"
        sim = self.sim
        self.trials += 1
        sim.restore(self.base)
        sim.set_counts(
            {(self.prefill_type, PREFILL_LINK): float(prefill)}, {self.decode_type: decode}, {}
        )
        sim.prefill_tape = self.tapes.setdefault(prefill, PrefillTape(self.start))
        try:
            return self._follow(prefill, decode, full, checks)
        finally:
            sim.prefill_tape = None

    def _follow(self, prefill: int, decode: int, full: bool, checks: Sequence[int]) -> _Verdict:
        """``run``'s trial, its counts set."""
        assert self.base is not None
        sim = self.sim
        start, end, step = self.start, self.end, sim.step
        stop = end + (self.judge_s if full else self.ttft_s)
        at_end: SimSnapshot | None = None
        rows: np.ndarray | None = None
        for point in sorted({end, stop, *(c for c in checks if start < c < stop)}):
            while sim.t < point:
                step()
            if point == end:
                at_end = sim.snapshot()
                rows = sim.series.data[self.base.rows : at_end.rows].copy()
            if point == stop or point not in checks:
                continue
            if full and _steps_within(sim, start, point, self.tbt_slo_s):
                continue  # token_gap_quantiles_s would say the same, at a fraction of the cost
            gaps = (
                token_gap_quantiles_s(sim, 1.0, start, (point, min(point, end))) if full else None
            )
            if gaps is not None and (gaps[0] is None or gaps[0] <= self.tbt_slo_s):
                continue
            verdict = self.judge.settled(start, end, point, full)
            if verdict is not None:
                if gaps is None:
                    gaps = token_gap_quantiles_s(sim, 1.0, start, (point, min(point, end)))
                verdict = _with_gaps(verdict, gaps)
                self.cache[(prefill, decode)] = (verdict, None, None, True)
                return verdict
        verdict = _with_gaps(
            self.judge(start, end), token_gap_quantiles_s(sim, 1.0, start, (sim.t, end))
        )
        assert at_end is not None and rows is not None
        self.cache[(prefill, decode)] = (verdict, at_end, rows, full)
        return verdict

    def accept(self, prefill: int, decode: int) -> _Verdict:
        """Keep these counts for the window: the state moves to its end, and the
        window's rows of the per-second series (the last trial wrote its own) are put
        back."""
        cached = self.cache.get((prefill, decode))
        if cached is not None and cached[1] is None:  # stopped early: run it through
            del self.cache[(prefill, decode)]
        verdict = self.run(prefill, decode)
        _verdict, at_end, rows, _full = self.cache[(prefill, decode)]
        assert at_end is not None and rows is not None
        self.sim.restore(at_end)
        self.sim.series.data[at_end.rows - rows.shape[0] : at_end.rows] = rows
        return verdict


# --------------------------------------------------------------------------- search


def _least_passing(
    passes: Callable[[int], bool],
    lo: int,
    hi: int,
    propose: Callable[[], float | None],
    bad: int | None = None,
    good: int | None = None,
) -> tuple[int, bool]:
    """The least ``n`` in [lo, hi] with ``passes(n)`` (monotone); (hi, False) when none.

    ``bad`` and ``good`` are what is already known (a failing count, ``lo - 1`` if none;
    a passing one). ``propose()`` estimates the answer from the trials so far; the
    search tries it, kept strictly between ``bad`` and ``good``: an estimate at ``good``
    asks for ``good - 1`` (which settles the answer if it fails), one at ``bad`` for
    ``bad + 1``. An estimate further beyond either says the model is wrong there: the
    search halves the bracket, or with one end only steps ``REACH`` of that count away
    from it, twice as far with each further trial on that side. After three trials in a
    row on one side of the answer the next reaches past the estimate, twice as far each
    time, and after four the bracket is halved: a poor estimate costs O(log) trials,
    never a wrong answer."""
    bad = lo - 1 if bad is None else bad
    streak = 0  # > 0: passes in a row, < 0: failures in a row
    while True:
        if good is not None and good - bad <= 1:
            return good, True
        if good is None and bad >= hi:
            return hi, False
        top = hi if good is None else good - 1
        estimate = propose()
        if estimate is None or not math.isfinite(estimate):
            n = (bad + top + 1) // 2
        else:
            n = math.ceil(estimate - 1e-9)
            if n < bad or (good is not None and n > good):
                if good is not None and bad >= lo:
                    n = (bad + good) // 2
                elif n < bad:
                    n = bad + max(1, math.ceil(REACH * bad * 2 ** max(-streak, 0)))
                elif good is not None:
                    n = good - max(1, math.ceil(REACH * good * 2 ** max(streak, 0)))
        if streak >= 3 and good is not None:  # estimates keep landing above the answer
            n = min(n, good - 2 ** (streak - 2))
        elif streak <= -3:  # ... below it
            n = max(n, bad + 2 ** (-streak - 2))
        if good is not None and bad >= lo and abs(streak) >= 4:
            n = (bad + good) // 2
        n = min(max(n, bad + 1), top)
        if passes(n):
            good = n
            streak = max(streak, 0) + 1
        else:
            bad = n
            streak = min(streak, 0) - 1


def _crossing(points: list[tuple[int, float]], target: float, lo: int, hi: int) -> float | None:
    """Where ``y(n)``, smooth in ``1 / n``, reaches ``target``, as a count in [lo, hi],
    from points in the order they were found: between the nearest points on either side
    of it (inverse quadratic through a third point when that stays between them, else
    the line, Illinois-style: the far end pulled in by half for each further point on
    the near side in a row), or along the two nearest."""
    latest = {n: y for n, y in points if math.isfinite(y)}
    pts = [(1.0 / n, y) for n, y in latest.items()]
    above = sorted((p for p in pts if p[1] > target), key=lambda p: p[1] - target)
    below = sorted((p for p in pts if p[1] <= target), key=lambda p: target - p[1])
    if above and below:
        (u1, y1), (u2, y2) = above[0], below[0]
        sides = [y > target for _n, y in points if math.isfinite(y)]
        run = next((i for i, side in enumerate(reversed(sides)) if side != sides[-1]), len(sides))
        if run > 1:  # the last points all fell on one side: pull the other end in
            if sides[-1]:
                y2 = target + (y2 - target) * 0.5 ** (run - 1)
            else:
                y1 = target + (y1 - target) * 0.5 ** (run - 1)
        u = u1 + (target - y1) * (u2 - u1) / (y2 - y1)
        rest = sorted(above[1:] + below[1:], key=lambda p: abs(p[1] - target))
        if run <= 1 and rest and rest[0][1] not in (y1, y2):
            u3, y3 = rest[0]
            quadratic = (
                u1 * (target - y2) * (target - y3) / ((y1 - y2) * (y1 - y3))
                + u2 * (target - y1) * (target - y3) / ((y2 - y1) * (y2 - y3))
                + u3 * (target - y1) * (target - y2) / ((y3 - y1) * (y3 - y2))
            )
            if min(u1, u2) < quadratic < max(u1, u2):
                u = quadratic
    else:
        near = sorted(pts, key=lambda p: abs(p[1] - target))
        if len(near) < 2 or near[0][1] == near[1][1]:
            return None
        (u1, y1), (u2, y2) = near[0], near[1]
        u = u1 + (target - y1) * (u2 - u1) / (y2 - y1)
    return _count_at(u, lo, hi)


def _count_at(u: float, lo: int, hi: int) -> float:
    """The count whose reciprocal is ``u``, within [lo, hi]."""
    if u <= 1.0 / hi:
        return float(hi)
    return min(max(1.0 / u, float(lo)), float(hi))


class _PrefillModel:
    """A window's prefill queue for any prefill count, as the simulator runs it: the
    arrivals' work joins one FIFO fluid queue served at the pooled capacity, each
    second's cohort leaves when the served work reaches its middle, and a G/G/c wait
    (Allen-Cunneen on the smoothed arrival rate) is added. A request's TTFT is that
    wait plus what the last trial measured beyond it (its own prefill, KV transfer,
    admission, first step); the search asks where TTFT meets the goal."""

    def __init__(self, sim: ServiceSim, prefill_type: str, goal: float):
        pool = sim.prefill_pools[sim.prefill_index[(prefill_type, PREFILL_LINK)]]
        profile = sim.profile
        config = sim.config
        self.sim = sim
        self.capacity = max(pool.capacity_work_per_s, 1e-9)
        self.work = (
            sim.work_linear * profile.prompt_sum + sim.work_attention * profile.prompt_sq_sum
        )
        self.mean_service_s = sim.mean_work / self.capacity
        self.scv_sum = config.arrival_scv + sim.service_scv
        self.alpha = 1.0 / max(config.load_smoothing_s, 1.0)
        self.slo_s = sim.policy.slo.ttft_ms / 1000.0
        self.goal = goal
        self.extra_bias = 0.0  # TTFT beyond idle + queue wait, as last seen
        self.extra = np.zeros(0)
        self.idle = np.zeros(0)
        self.arrival = np.zeros(0)
        self.index = np.zeros(0, dtype=np.int64)
        # ``wait_s`` at each request's second, per count: it depends only on what
        # ``begin`` set, and the bisections of ``least`` ask for the same counts again.
        self._request_wait: dict[int, np.ndarray] = {}

    def begin(
        self, start: int, end: int, follow_s: int, arrival: np.ndarray, idle: np.ndarray
    ) -> None:
        """A new window: its arrivals' work, the backlog it starts with; ``idle``: the
        arrivals' ``idle_ttft_s``."""
        sim = self.sim
        span = max(end + follow_s - start, 1)
        work = np.zeros(span)
        have = self.work[start : start + span]
        work[: have.size] = have
        self.work_s = work
        self.queue0 = float(sim.queue_work)
        self.position = self.queue0 + np.cumsum(work) - work / 2.0
        rate = np.empty(span)
        r = float(sim.arrival_rate_work)
        for j in range(span):
            r += (work[j] - r) * self.alpha
            rate[j] = r
        self.rate = rate
        self.half = np.arange(span) + 0.5
        self.ticks = np.arange(1, span + 1, dtype=np.float64)
        attainable = idle <= self.slo_s
        self.arrival = arrival[attainable]
        self.index = (np.floor(self.arrival).astype(np.int64) - start).clip(0, span - 1)
        self.idle = idle[attainable]
        self.extra = self.idle + self.extra_bias
        self._request_wait = {}

    def wait_s(self, count: int) -> np.ndarray:
        """Fluid + G/G/c wait of each second's arrivals with ``count`` instances."""
        capacity = count * self.capacity
        work = self.work_s
        # Lindley's recursion q_t = max(0, q_(t-1) + a_t - c), solved at once.
        net = work.cumsum() - capacity * self.ticks
        queue = net - np.minimum(np.minimum.accumulate(net), -self.queue0)
        before = np.concatenate(([self.queue0], queue[:-1]))
        served = np.concatenate(([0.0], (before + work - queue).cumsum()))
        index = served.searchsorted(self.position, side="left")
        resolved = index < served.size
        index = fast_clip(index, 1, served.size - 1)
        lo, hi = served[index - 1], served[index]
        frac = np.where(hi > lo, (self.position - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
        depart = (index - 1) + fast_clip(frac, 0.0, 1.0)
        wait = np.where(resolved, np.maximum(0.0, depart - self.half), np.inf)
        rho = fast_clip(self.rate / capacity, 0.0, MAX_GGC_UTILISATION)
        exponent = math.sqrt(2.0 * (count + 1.0)) - 1.0
        ggc = self.mean_service_s * self.scv_sum / 2.0 * rho**exponent / (count * (1.0 - rho))
        result: np.ndarray = wait + ggc
        return result

    def request_wait_s(self, count: int) -> np.ndarray:
        """``wait_s`` at each attainable request's second (kept for the window; read
        only)."""
        wait = self._request_wait.get(count)
        if wait is None:
            wait = self._request_wait[count] = self.wait_s(count)[self.index]
            wait.flags.writeable = False
        return wait

    def calibrate(self, count: int, ttft: np.ndarray | None) -> None:
        """Take each request's TTFT beyond the queue from a trial at ``count``."""
        if ttft is None or ttft.size != self.idle.size:
            return
        wait = self.request_wait_s(count)
        known = np.isfinite(ttft) & np.isfinite(wait)
        extra = np.where(known, ttft - np.where(known, wait, 0.0), np.inf)
        if known.any():
            self.extra_bias = float(np.median(extra[known] - self.idle[known]))
        self.extra = np.where(known, extra, self.idle + self.extra_bias)

    def margin_s(self, count: int) -> float:
        """The predicted TTFT margin (``_Verdict.ttft_margin_s``) with ``count``."""
        n = self.extra.size
        may_miss = math.floor(n * (1.0 - self.goal) + 1e-9)
        if may_miss >= n:
            return -math.inf
        excess = self.extra + self.request_wait_s(count) - self.slo_s
        return _kth_largest(excess, may_miss)

    def settles_by(self, count: int) -> int | None:
        """When the model expects a trial at ``count`` to have shown that TTFT misses
        the goal: a second after the first token of the first request too many to
        miss (None: it expects no miss)."""
        n = self.extra.size
        may_miss = math.floor(n * (1.0 - self.goal) + 1e-9)
        ttft = self.extra + self.request_wait_s(count)
        late = np.sort((self.arrival + ttft)[ttft > self.slo_s])
        if late.size <= may_miss or not math.isfinite(late[may_miss]):
            return None
        return math.ceil(late[may_miss]) + 2

    def least(self, lo: int, hi: int) -> int:
        """The least count in [lo, hi] the model says meets the goal (hi if none)."""
        if hi <= lo or self.margin_s(lo) <= 0:
            return lo
        if self.margin_s(hi) > 0:
            return hi
        while hi - lo > 1:  # meets at hi, not at lo
            mid = (lo + hi) // 2
            if self.margin_s(mid) <= 0:
                hi = mid
            else:
                lo = mid
        return hi


# The exponents ``_power_fit`` scans for a sign change (worked out once).
_POWER_FIT_GRID = np.linspace(0.05, 12.0, 120)


def _power_fit(
    p1: tuple[int, float], p2: tuple[int, float], anchor: tuple[int, float]
) -> float | None:
    """The exponent ``g`` of ``y = y_a + k (n^-g - n_a^-g)`` through ``p1`` and ``p2``
    (``anchor``: ``(n_a, y_a)``), searched in (0.05, 12]; None when none fits."""
    (n1, y1), (n2, y2), (na, ya) = p1, p2, anchor
    if n1 == n2 or max(n1, n2) >= na or y1 <= ya or y2 <= ya:
        return None

    def mismatch(g: np.ndarray) -> np.ndarray:
        result: np.ndarray = (y1 - ya) / (n1**-g - na**-g) - (y2 - ya) / (n2**-g - na**-g)
        return result

    grid = _POWER_FIT_GRID
    values = mismatch(grid)
    sign = np.flatnonzero(np.sign(values[:-1]) * np.sign(values[1:]) <= 0)
    if sign.size == 0:
        return None
    a, b = float(grid[sign[0]]), float(grid[sign[0] + 1])
    va = float(values[sign[0]])

    def mismatch_at(g: float) -> float:
        """``mismatch`` at one exponent in Python floats (the same operations, a
        fraction of the cost of 0-d arrays in this loop)."""
        return (y1 - ya) / (n1**-g - na**-g) - (y2 - ya) / (n2**-g - na**-g)

    for _ in range(40):
        mid = (a + b) / 2.0
        if (mismatch_at(mid) > 0) == (va > 0):
            a = mid
        else:
            b = mid
    return (a + b) / 2.0


def _power_root(
    point: tuple[int, float], anchor: tuple[int, float], g: float, target: float
) -> float | None:
    """Where ``y = y_a + k (n^-g - n_a^-g)`` through ``point`` reaches ``target``."""
    (n1, y1), (na, ya) = point, anchor
    if n1 >= na or y1 <= ya or g <= 0:
        return None
    k = (y1 - ya) / (n1**-g - na**-g)
    v = na**-g + (target - ya) / k
    return float(v ** (-1.0 / g)) if v > 0 else None


class _DecodeModel:
    """Which decode count to try next in a window (module docstring).

    Both figures it follows rise steeply as decode shrinks toward what the window needs
    and hardly move far above it (a decode step costs about the same at any small
    batch), which ``y = y_a + k (n^-g - n_a^-g)`` follows well: ``y_a`` at decode's most
    (the anchor, from the prefill search's trial there), ``k`` and ``g`` through two
    trials, or ``g`` as in the last windows when there is one.

    TBT: the trial's longest inter-token gap, to where it reaches the TBT SLO (above
    that no token is slow); where the trials that fail TBT see its share rising, where
    that reaches the goal, if lower (a slow second that only long requests see is
    tolerated). TTFT, where it fails: the TTFT margin, to 0. The first try: the last
    TBT need found, scaled by the load (the peak 20 s of output tokens), or before any,
    the load over one instance's tokens/s at the TBT SLO."""

    def __init__(self, sim: ServiceSim, decode_type: str, goal: float, lo: int, hi: int):
        slo = sim.policy.slo
        self.tbt_slo_s = slo.tbt_ms / 1000.0
        self.ttft_slo_s = slo.ttft_ms / 1000.0
        self.goal = goal
        self.lo, self.hi = lo, hi
        pool = next(p for p in sim.decode_pools if p.gpu_type == decode_type)
        self.tps = max(pool.slo_capacity_tps, 1e-9)
        self.output = np.concatenate(([0.0], np.cumsum(sim.profile.output_sum)))
        self.trials: list[tuple[int, _Verdict]] = []
        self.anchor: tuple[int, _Verdict] | None = None
        self.anchor_gap = math.nan  # the longest gap with decode at its most
        self.load = self.demand = 0.0
        self.need: tuple[int, float] | None = None  # the last exact TBT need, its load
        self.previous = 0  # the decode count the window starts from
        self.gap_g = [GAP_EXPONENT]
        self.margin_g: list[float] = []  # the TTFT margin's

    def _load(self, start: int, end: int, smooth_s: int = 20) -> float:
        """Peak output tokens/s over ``smooth_s`` in the window."""
        last = min(end, self.output.size - 1)
        if last <= start:
            return 0.0
        t = np.arange(start, last)
        first = np.maximum(t + 1 - smooth_s, 0)
        rate = (self.output[t + 1] - self.output[first]) / (t + 1 - first)
        return float(rate.max())

    def begin(
        self,
        start: int,
        end: int,
        anchor: tuple[int, _Verdict] | None,
        anchor_gap: float,
        previous: int,
    ) -> None:
        """A new window; ``anchor``: the prefill count's TTFT with decode at its most;
        ``anchor_gap``: a trial's longest gap there (nan: keep the last window's);
        ``previous``: the decode count the window starts from."""
        self.trials = []
        self.anchor = anchor
        self.previous = previous
        if anchor_gap > 0:
            self.anchor_gap = anchor_gap
        self.load = self._load(start, end)
        last = min(end, self.output.size - 1)
        self.demand = (self.output[last] - self.output[min(start, last)]) / max(end - start, 1)

    def add(self, decode: int, verdict: _Verdict) -> None:
        self.trials.append((decode, verdict))

    def first(self) -> float:
        if self.need is not None and self.need[1] > 0:
            return self.need[0] * self.load / self.need[1]
        return self.demand / self.tps

    def propose(self) -> float:
        if not self.trials:
            return self.first()
        estimates = [e for e in (self._tbt(), self._ttft()) if e is not None]
        return max(estimates) if estimates else self.first()

    def _curve(
        self,
        points: list[tuple[int, float]],
        anchor: tuple[int, float] | None,
        target: float,
        exponents: list[float],
    ) -> float | None:
        """Where the figure reaches ``target``: along the curve through the anchor and
        the two trials nearest the target (on either side of it when there are), with
        one trial along the last windows' exponent; else the line in ``1 / decode``.
        ``points`` in the order tried: when the last ones all fell on one side of the
        target, the nearest on the other is pulled in by half for each (Illinois), so
        the estimates do not creep up on the answer from one side."""
        points = [p for p in points if math.isfinite(p[1]) and p[0] < self.hi]
        if not points:
            return None
        above = sorted((p for p in points if p[1] > target), key=lambda p: p[1] - target)
        below = sorted((p for p in points if p[1] <= target), key=lambda p: target - p[1])
        pair = [above[0], below[0]] if above and below else (above + below)[:2]
        if above and below:
            sides = [y > target for _n, y in points]
            run = next((i for i, side in enumerate(reversed(sides)) if side != sides[-1]), 0)
            if run > 1:
                far = 1 if sides[-1] else 0
                n_far, y_far = pair[far]
                pair[far] = (n_far, target + (y_far - target) * 0.5 ** (run - 1))
        estimate = None
        if anchor is not None and math.isfinite(anchor[1]):
            if len(pair) == 2:
                g = _power_fit(pair[0], pair[1], anchor)
                if g is not None:
                    estimate = _power_root(pair[0], anchor, g, target)
            elif exponents:
                g = float(np.median(exponents[-5:]))
                estimate = _power_root(pair[0], anchor, g, target)
        if estimate is None and len(pair) == 2:
            estimate = _crossing(pair, target, self.lo, self.hi)
        if estimate is None:
            return None
        return min(max(estimate, float(self.lo)), float(self.hi))

    def _ttft(self) -> float | None:
        """Where TTFT starts to meet the goal, when some trial misses it (far over the
        SLO, e.g. waiting for a decode slot, is another regime: left out)."""
        goal, slo = self.goal, self.ttft_slo_s
        unmet = [d for d, v in self.trials if v.ttft_share < goal]
        if not unmet:
            return None
        points = [(d, v.ttft_margin_s) for d, v in self.trials if v.ttft_margin_s < slo]
        anchor = None
        if self.anchor is not None and self.anchor[1].ttft_margin_s < 0:
            anchor = (self.anchor[0], self.anchor[1].ttft_margin_s)
        estimate = self._curve(points, anchor, 0.0, self.margin_g)
        if estimate is None:  # step up from the largest miss
            return max(unmet) * 1.3
        return estimate

    def _tbt(self) -> float | None:
        """Where TBT starts to meet the goal, from the trials so far.

        Counts above the previous window's add a generation of new instances (under a
        stale router, flooded with admissions: its steps far slower than at the
        previous count, however few instances are added), so the gap can follow another
        curve on either side of that count: once a count above it has failed TBT, only
        the trials above it are followed (once one at or below it has met TBT, only
        those)."""
        goal, slo = self.goal, self.tbt_slo_s
        trials = [(d, v) for d, v in self.trials if v.gap_max_s > 0]
        if self.previous > 0:
            above = [(d, v) for d, v in trials if d > self.previous]
            at_or_below = [(d, v) for d, v in trials if d <= self.previous]
            if any(v.tbt_share < goal for _d, v in above):
                trials = above
            elif any(v.tbt_share >= goal for _d, v in at_or_below):
                trials = at_or_below
        met = sorted(d for d, v in trials if v.tbt_share >= goal)
        unmet = sorted(((d, v.tbt_share) for d, v in trials if v.tbt_share < goal), reverse=True)
        # Along the failing trials' TBT share, rising to the goal.
        share = None
        if len(unmet) > 1 and unmet[0][1] > unmet[1][1]:
            (d1, s1), (d2, s2) = unmet[0], unmet[1]
            share = d1 + (goal - s1) * (d1 - d2) / (s1 - s2)
        anchor = (self.hi, self.anchor_gap) if self.anchor_gap > 0 else None
        slow_free = self._curve([(d, v.gap_max_s) for d, v in trials], anchor, slo, self.gap_g)
        tolerated = any(v.tbt_share >= goal and v.gap_max_s > slo for _d, v in trials)
        if not tolerated:
            if slow_free is None:
                return share
            return slow_free if share is None else min(slow_free, share)
        # A slow second that only some requests see is tolerated: TBT holds lower than
        # the gap says, where the failing trials' share says, or, before two failing
        # trials, about where the window's own longest gap reaches the SLO.
        if share is not None:
            return share
        if unmet and met:
            return (unmet[0][0] + met[0]) / 2.0
        return self._curve([(d, v.gap_window_s) for d, v in trials], anchor, slo, self.gap_g)

    def finish(self) -> None:
        """Keep the window's TBT need when found exactly, and the exponents of the
        curves about where they reach their targets."""
        goal = self.goal
        met = [(d, v) for d, v in self.trials if v.tbt_share >= goal]
        unmet = [(d, v) for d, v in self.trials if v.tbt_share < goal]
        if met and unmet and self.load > 0:
            dp = min(d for d, _v in met)
            if dp - max(d for d, _v in unmet) == 1:
                self.need = (dp, self.load)
        # The TTFT margin's exponent, from two trials near where TTFT holds.
        anchor = self.anchor[1].ttft_margin_s if self.anchor else math.nan
        near = sorted(
            (d, v.ttft_margin_s)
            for d, v in self.trials
            if abs(v.ttft_margin_s) < 0.005 * self.ttft_slo_s
        )
        if len(near) > 1 and near[-1][0] - near[0][0] >= 3 and anchor < 0:
            g = _power_fit(near[0], near[-1], (self.hi, anchor))
            if g is not None:
                self.margin_g = [*self.margin_g[-4:], g]


class _PrefillShort(Exception):
    """The prefill count tried misses TTFT even with decode at its most."""


class _Sizer:
    """Sizes one window after another (module docstring)."""

    def __init__(
        self,
        search: _WindowSearch,
        policy: ServicePolicy,
        prefill_type: str,
        decode_type: str,
    ):
        sim = search.sim
        self.search = search
        self.policy = policy
        self.goal = goal = policy.slo.attainment_goal
        self.p_lo = max(policy.prefill.min_instances, 1)
        self.d_lo = max(policy.decode.min_instances, 1)
        self.p_hi = max(policy.prefill.max_instances, self.p_lo)
        self.d_hi = max(policy.decode.max_instances, self.d_lo)
        self.prefill_gpus = policy.prefill.gpus_per_instance
        self.decode_gpus = policy.decode.gpus_per_instance
        self.prefill_model = _PrefillModel(sim, prefill_type, goal)
        self.decode_model = _DecodeModel(sim, decode_type, goal, self.d_lo, self.d_hi)
        self.prefill = 0
        self.confirmed = False  # the prefill count meets TTFT (with decode at its most)
        self.decode_checks: tuple[int, ...] = ()

    # Trials, each teaching its model.
    def prefill_passes(self, n: int, checks: Sequence[int] = ()) -> bool:
        verdict = self.search.run(n, self.d_hi, full=False, checks=checks)
        self.prefill_model.calibrate(n, verdict.ttft_s)
        return verdict.ttft_share >= self.goal

    def prefill_propose(self) -> float:
        return self.prefill_model.least(self.p_lo, self.p_hi)

    def decode_passes(self, n: int) -> bool:
        verdict = self.search.run(self.prefill, n, checks=self.decode_checks)
        self.decode_model.add(n, verdict)
        if not self.confirmed and self._ttft_alone_misses(verdict):
            # TTFT misses where TBT holds: is decode what limits it? A trial with decode
            # at its most says (and anchors the decode model's TTFT).
            self.confirmed = True
            if not self.prefill_passes(self.prefill):
                raise _PrefillShort
            cached = self.search.cache[(self.prefill, self.d_hi)]
            self.decode_model.anchor = (self.d_hi, cached[0])
        return verdict.both_share >= self.goal

    def size(self, start: int, end: int) -> tuple[int, int, bool, _Verdict]:
        search, judge = self.search, self.search.judge
        search.begin(start, end)
        lo, hi = judge.span(start, end)
        self.prefill_model.begin(
            start, end, search.ttft_s, judge.arrival[lo:hi], judge.tables(lo, hi).idle_ttft_s
        )
        # Prefill: the model's answer is confirmed by one failing trial below it; that
        # it passes follows from any decode trial that meets both SLOs with it.
        estimate = self.prefill_model.least(self.p_lo, self.p_hi)
        bad, good = self.p_lo - 1, None
        self.decode_checks = (*(start + c for c in DECODE_CHECKS_S), end, end + search.judge_s // 2)
        if estimate > self.p_lo:
            settle = self.prefill_model.settles_by(estimate - 1)
            if self.prefill_passes(estimate - 1, () if settle is None else (settle,)):
                good = estimate - 1
            else:
                bad = estimate - 1
        self.confirmed = good is not None
        if good is not None:
            prefill, prefill_met = _least_passing(
                self.prefill_passes, self.p_lo, self.p_hi, self.prefill_propose, bad, good
            )
        else:
            prefill, prefill_met = estimate, True
        while True:
            self._begin_decode(start, end, prefill)
            try:
                decode, decode_met = _least_passing(
                    self.decode_passes, self.d_lo, self.d_hi, self.decode_model.propose
                )
            except _PrefillShort:
                decode_met = False
            else:
                if decode_met or self.confirmed or not prefill_met:
                    break
                # No decode count meets both: does this prefill meet TTFT at all?
                self.confirmed = True
                if self.prefill_passes(prefill):
                    break
            prefill, prefill_met = _least_passing(
                self.prefill_passes, self.p_lo, self.p_hi, self.prefill_propose, prefill
            )
        if prefill_met and decode_met:
            prefill, decode = self._traded(start, end, prefill, decode)
        # The least pair the SLO needs, then as the policy lets it run (more of either
        # role never hurts the window).
        prefill, decode, _clamps = bounded_pair(self.policy, prefill, decode)
        self.decode_model.finish()
        verdict = search.accept(prefill, decode)
        return prefill, decode, prefill_met and decode_met, verdict

    def _ttft_alone_misses(self, verdict: _Verdict) -> bool:
        """A decode trial that misses the goal on TTFT while meeting it on TBT: decode's
        count is set by the requests near the TTFT SLO there, not by its own steps."""
        return verdict.ttft_share < self.goal <= verdict.tbt_share

    def _begin_decode(self, start: int, end: int, prefill: int) -> None:
        """Start the decode search of a window at this prefill count."""
        search = self.search
        self.prefill = prefill
        cached = search.cache.get((prefill, self.d_hi))
        if cached is not None:
            anchor = cached[0]
        else:  # the model's word for what a trial at decode's most would show
            anchor = _Verdict(1.0, 1.0, ttft_margin_s=self.prefill_model.margin_s(prefill))
        at_most = [v.gap_max_s for (_p, d), (v, *_rest) in search.cache.items() if d == self.d_hi]
        self.decode_model.begin(
            start,
            end,
            (self.d_hi, anchor),
            max(at_most, default=math.nan),
            search.previous_decode,
        )

    def _traded(self, start: int, end: int, prefill: int, decode: int) -> tuple[int, int]:
        """The window's pair with the fewest GPUs along prefill + 1, + 2, ... (module
        docstring, step 3). Where one decode instance fewer misses TTFT while meeting
        TBT, decode's least count is set by prefill's: the requests near the TTFT SLO
        that a first decode step on a larger batch takes over it. More prefill shortens
        their prefill and can let fewer decode instances pass. Each step is taken only
        when it lowers the GPUs; the pair stays minimal in both roles (a count one
        below the chosen decode fails at this prefill, and at the prefill below it
        every decode count under the one found there fails)."""
        while prefill < self.p_hi and decode > self.d_lo:
            below = self.search.cache.get((prefill, decode - 1))
            if below is None:
                break
            if not self._ttft_alone_misses(below[0]):
                break  # TBT binds decode there: more prefill does not help it
            # Fewer GPUs: prefill_gpus * (p + 1) + decode_gpus * d' below the pair's.
            top = math.ceil(decode - self.prefill_gpus / self.decode_gpus) - 1
            if top < self.d_lo:
                break
            self._begin_decode(start, end, prefill + 1)
            self.confirmed = True  # more prefill than a count that meets TTFT
            fewer, met = _least_passing(
                self.decode_passes, self.d_lo, top, self.decode_model.propose
            )
            if not met:
                break
            prefill, decode = prefill + 1, fewer
        return prefill, decode


def bound_config(config: SimConfig | None) -> SimConfig:
    """The simulator settings the bound is found and judged under: ``config`` with a
    decode router that knows each instance's current load (module docstring, Cost)."""
    return replace(config or SimConfig(), router_staleness_s=0)


def plan_oracle_min(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    config: SimConfig | None = None,
    *,
    window_s: int = DEFAULT_WINDOW_S,
    windows: int | None = None,
    optimistic: bool = True,
) -> OracleMinPlan:
    """Size every window (module docstring); ``windows`` stops after that many (the
    warm start needs only the first). ``optimistic`` False searches in the policies'
    own environment (``config`` as given: their router) instead of the bound's."""
    if window_s < 1:
        raise OracleError(f"oracle-min: window must be at least 1 s, got {window_s}")
    sim = ServiceSim(
        policy, cluster, profile, bound_config(config) if optimistic else config or SimConfig()
    )
    prefill_type = _role_type(sim, policy, "prefill")
    decode_type = _role_type(sim, policy, "decode")
    judge = _WindowJudge(sim, window_s, policy.slo.attainment_goal)
    search = _WindowSearch(
        sim,
        judge,
        prefill_type,
        decode_type,
        _judge_s(policy, profile, config),
        _ttft_judge_s(policy),
    )
    sizer = _Sizer(search, policy, prefill_type, decode_type)
    horizon = profile.horizon_s
    count = (
        math.ceil(horizon / window_s)
        if windows is None
        else min(windows, math.ceil(horizon / window_s))
    )
    chosen: list[OracleWindow] = []
    for k in range(count):
        start = k * window_s
        end = min(start + window_s, horizon)
        prefill, decode, met, verdict = sizer.size(start, end)
        chosen.append(
            OracleWindow(
                start_s=start,
                prefill=prefill,
                decode=decode,
                met=met,
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
    sim = ServiceSim(policy, cluster, profile, bound_config(config))
    judge_s = _judge_s(policy, profile, config)
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


# ``plan_oracle_min``'s parameters, passed on to it: the warm start is its first windows.
def oracle_min_initial_counts(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    config: SimConfig | None = None,
    window_s: int = DEFAULT_WINDOW_S,
) -> tuple[int, int]:
    """The warm state every policy starts in: what oracle-min's search runs or has
    started at t = 0, i.e. the most of each role over the windows that begin within a
    start-up (started before t = 0, so no policy could have asked for them in time),
    searched in the policies' own environment (their router, not the bound's: a fleet
    that holds the first minutes for the bound's perfect router can fall short under
    theirs, and every policy would start in that hole)."""
    lead_s = max(policy.prefill.startup_s, policy.decode.startup_s)
    windows = math.floor(lead_s / window_s) + 1
    plan = plan_oracle_min(
        policy, cluster, profile, config, window_s=window_s, windows=windows, optimistic=False
    )
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
    """Instances and GPUs per second under the plan (module docstring, "Cost"): at each
    second a role holds the most instances that any second from it to a start-up later
    serves with, since an instance must be started a start-up before it serves and one
    that a dip stops and a window within a start-up needs again is cheaper kept.
    ``*_starting`` counts those held but not serving (starting, or kept through a
    dip); the simulator serves with ``*_ready``."""
    ready = {"prefill": np.zeros(horizon_s), "decode": np.zeros(horizon_s)}
    for window in plan.windows:
        start, end = window.start_s, min(window.start_s + plan.window_s, horizon_s)
        ready["prefill"][start:end] = window.prefill
        ready["decode"][start:end] = window.decode
    counts: dict[str, np.ndarray] = {}
    for role, serving in ready.items():
        lead_s = round(policy.role(role).startup_s)
        ahead = np.concatenate([serving, np.zeros(lead_s)])
        held = np.lib.stride_tricks.sliding_window_view(ahead, lead_s + 1).max(axis=1)
        counts[f"{role}_ready"] = serving
        counts[f"{role}_starting"] = held - serving
        counts[f"{role}_gpus"] = held * policy.role(role).gpus_per_instance
    return counts


__all__ = [
    "DEFAULT_WINDOW_S",
    "InventoryExcess",
    "OracleError",
    "OracleMinPlan",
    "OracleWindow",
    "inventory_excess",
    "oracle_min_initial_counts",
    "per_second_counts",
    "plan_gpus_by_type",
    "plan_oracle_min",
    "replay_window",
    "warm_counts",
]
