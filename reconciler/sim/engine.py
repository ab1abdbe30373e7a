"""The fluid P/D serving model of one service, advanced one second at a time.

Why fluid: an 8-hour day of a 2,000-instance fleet is hundreds of millions of requests,
too many to hold, let alone to step one by one. The simulator therefore keeps the
*state* of the service in aggregate, per second, and derives per-request latencies from
that state afterwards, vectorised over the requests (or a uniform sample of them).

Per second ``t`` the service does, in order:

1. **Arrivals** (a :class:`LoadProfile` bin: requests, prompt-token and squared-prompt
   sums) join the prefill queue, unless no prefill or decode instance is ready (no
   endpoint: dropped), or the queue ahead already holds more than
   ``max_queue_wait_s`` of work (the client times out: dropped).
2. **Prefill**: one FIFO queue in front of all prefill instances, served at the sum of
   their capacities (compute-equivalent FLOPs/s, ``perf.InstancePerf``; a pool that
   ships KV cache over a slow link is also capped by the link). Work is
   ``2 x params x tokens + attention``, so long prompts cost more than their tokens.
3. **Decode admission**: prompts done with prefill wait in a FIFO until a decode
   instance has room: at most ``max_batch`` sequences and KV cache for the prompt plus
   the mean output. Admissions are split over the decode pools (one per GPU type) in
   proportion to their capacity at the TBT SLO, spilling over when one is full. Within
   a pool a router spreads them over its *generations* (below), least loaded first, by
   the load the instances reported ``router_staleness_s`` ago.
4. **Decode**: a decode pool is split into generations (``reconciler.sim.generations``):
   sub-pools of instances that share one per-instance load, because a sequence stays
   on the instance it was admitted to. Each generation advances its own *decode clock*
   ``psi`` (tokens generated per running sequence so far) by ``1 / step_time``, the
   step time coming from its own batch and KV cache per instance. A cohort (the
   requests admitted to it in one second) that entered at ``psi_0`` has generated ``x
   = psi - psi_0`` tokens; the share still running is the output-length survival ``P(L
   > x)``, the trace-wide length distribution scaled to the cohort's own mean output
   (so decode load follows the actual tokens of the requests admitted, not just their
   count). Completions, decode tokens, batch and KV usage all follow.

Per-request latencies are then exact functions of that per-second state:

- TTFT = fluid queue wait (from the cumulative admitted and served work curves)
  + a G/G/c waiting time for sub-second contention (Allen-Cunneen approximation with
  the instances as servers) + the request's own prefill latency on its instance +
  KV transfer over its group's link, slowed by that link's load (``1 / (1 - rho)``)
  + decode admission wait + one decode step (the first token streams from the decode
  instance). The prefill pool is a mixture: a request lands on pool ``p`` with the
  pool's share of capacity that second.
- TBT is judged per token: a request meets it when at most ``1 - quantile`` of its
  ``L`` tokens came with a gap above the SLO (the SLO quantile of its own gaps is
  within the SLO); its tokens span ``psi(start) .. psi(start) + L`` on the clock of the
  generation it was admitted to (followed through merges, and through a drain's split
  with the split's share: ``generations.chase``), and every token of a second takes
  that generation's step time of that second. Generations (of every pool) are mixed by
  their share of that second's admissions. The mean gap ``(psi^-1(psi(start) + L) -
  start) / L`` is kept as a reported figure.
- A request meets both SLOs when it meets each (per request, not the product of two
  rates). Attainment counts a dropped (or unfinished) request as missing both SLOs;
  requests that miss TTFT even on an idle instance are reported as unattainable.

Signals (``window_metrics``, units as in ``reconciler.state.ServiceMetrics``) are read
as Prometheus returns them (``SimConfig.prometheus_like``, on by default): from the last
scrape (every ``scrape_interval_s``, 15 s, from ``scrape_offset_s``, 7 s) at or before the read, over the
``metrics_window_s`` (60 s) before that scrape, using only what was known at it:

- prefill and decode tokens/s (and requests/s): the window's total over 60 s, as
  ``rate(x[1m])`` evaluated at the scrape;
- TTFT at the SLO quantile over the requests whose prefill completed in the window (one
  still waiting for decode admission counts with its wait so far), TBT at the SLO
  quantile of the window's inter-token gaps (each second's decode step time, once per
  token generated: vLLM observes one gap per token); both through the engine's
  histogram buckets (``reconciler.latency_buckets``: vLLM's
  ``vllm:time_to_first_token_seconds`` and ``vllm:inter_token_latency_seconds``, SGLang's
  inter-token bounds for an SGLang service) and PromQL's ``histogram_quantile``: linear
  within the bucket holding the rank, the highest finite bound when the rank is in +Inf;
- prefill GPU utilisation and SM activity from the busy fraction, averaged over ready
  prefill instances; decode GPU utilisation = the share of decode instances running at
  least one sequence (a generation's instances share its sequences equally, so
  ``min(1, sequences / instances)`` per generation: a new generation or a drained one
  can sit idle while others are busy) times the calibrated 100 %, and SM activity from
  the calibrated batch curve of each generation; each a DCGM gauge, so
  ``avg_over_time`` of the samples scraped in the window (the state in the second
  before each scrape); the TBT histogram observes every generation's step time;
- KV-cache usage = cached tokens / capacity per decode instance, the last sample
  averaged over instances (``avg(vllm:kv_cache_usage_perc)``);
- queues: requests waiting for prefill and prompts waiting for a decode slot, the last
  sample (``sum(vllm:num_requests_waiting)`` per role).

``SimulatedFleet.fetch`` stamps every sample with its scrape's time, so a policy's
``metric_max_age_s`` sees its real age. ``prometheus_like=False`` reads everything at
the moment asked, exactly: rates over the 60 s before it, exact weighted quantiles,
gauges averaged over every second of the window.

Assumptions beyond ``perf`` (each one a modelling choice):

- Time resolves to one second; the decode step time is taken at the middle of each
  second (predictor-corrector), and a cohort admitted in a second decodes from its
  start.
- Prefill is one pooled FIFO fluid queue (fair for a shared scheduler in front of the
  instances); the sub-second queueing it cannot see comes from an Allen-Cunneen G/G/c
  term with Poisson arrivals (squared CV 1) and the prompt mix's service-time CV.
- KV transfer on a link of utilisation ``rho`` takes ``1 / (1 - rho)`` times its bare
  time (M/M/1 sojourn), ``rho`` capped at ``max_link_utilisation``.
- Requests are dropped, never silently lost: when no prefill or decode instance is
  ready (no endpoint), when the prefill backlog exceeds ``max_queue_wait_s`` (client
  timeout), when prompt + output exceed the largest decode instance's KV cache, or
  when still unfinished ``drain_tail_s`` after the last arrival.
- Prompt and output lengths are independent; each cohort's outputs follow the
  trace-wide shape scaled to the cohort's mean.
- Decode pinning: a decode request stays on the instances it started on until it
  finishes. Instances that become ready in one second form a new generation, empty,
  that takes only new admissions (it does not relieve the running sequences);
  instances scaled in are split off their generation with their share of its
  sequences (per-instance load being equal within a generation, the split is exact),
  keep them until they finish and get no new ones. The fleet ends a drain once the
  pool's drain clock (``decode_clock``: the slowest draining generation's clock) has
  advanced by the 99th-percentile output length; the few sequences still running then
  move to the least loaded generation. Generations whose per-instance batch and step
  time agree within ``generation_merge_tolerance`` (2 %) merge (cohorts re-based onto
  one clock, so every sequence keeps its progress); at most ``decode_generations`` (4)
  live per pool (a new one beyond that merges the two closest; 1 is the fluid pool of
  old, where a new instance relieves the running sequences at once). Within a
  generation the instances share its sequences evenly (no per-instance variance). Instances removed without a
  drain (counts set directly, as oracle-min does) leave their sequences to their
  generation's remaining instances, the least loaded generation's first.
- Stale routing: the admissions of a second are water-filled over a pool's
  generations, least loaded (running sequences per instance) first, on the loads the
  instances reported ``router_staleness_s`` (1) seconds before that second, plus the
  second's own placements; none beyond an instance's free batch and KV cache (it
  would refuse them). So a burst goes mostly to the instances that looked emptiest a
  second ago, and a new generation keeps getting admissions a second after it has
  caught up (0: a perfect router, which keeps generations level).
- Admission reserves KV cache for the prompt plus the mean output (no preemption).
- Per-request outcomes use a uniform sample of at most ``request_sample_limit``
  requests when there are more (attainment error ~0.1 %).
"""

from __future__ import annotations

import math
import operator
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, cast

import numpy as np

from reconciler.desired.models import ClusterSpec, GpuType, ServicePolicy
from reconciler.latency_buckets import engine_latency_buckets
from reconciler.perfmodel.instance import (
    DEFAULT_MAX_BATCH,
    InstancePerf,
    instance_perf,
    kv_transfer_s,
)
from reconciler.perfmodel.queueing import ggc_wait_s
from reconciler.policy.capacity import ENGINE_LENGTH_BOUNDS
from reconciler.policy.gpu_economics import ranked_gpu_types
from reconciler.sim.generations import (
    POOL_COLUMNS,
    SLOT_COLUMNS,
    DecodeGenerations,
    GenerationsState,
    LengthCurves,
    SlotCurves,
    chase,
    fast_clip,
)
from reconciler.sim.workload import (
    Burst,
    LengthShape,
    Workload,
    default_bursts,
    rate_curve,
    synthetic_workload,
)
from reconciler.state import METRIC_NAMES, Role
from reconciler.tables import small_percent

LINKS: tuple[str, str] = ("rdma", "cross")


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the fluid model (defaults are the documented assumptions)."""

    metrics_window_s: float = 60.0  # rate/quantile window of every metric (Prometheus [1m])
    max_queue_wait_s: float = 120.0  # arrivals facing a longer prefill backlog are dropped
    max_batch: int = DEFAULT_MAX_BATCH
    drain_tail_s: float = 1800.0  # after the last arrival, keep serving in-flight requests
    length_classes: int = 32  # prompt-length quantiles for metric-time TTFT quantiles
    prefill_drain_s: float = 5.0  # a draining prefill instance finishes its pass
    arrival_scv: float = 1.0  # squared CV of inter-arrival times (Poisson)
    load_smoothing_s: float = 30.0  # averaging of the arrival rate for the G/G/c term
    max_link_utilisation: float = 0.95
    request_sample_limit: int = 500_000  # per-request outcomes on a uniform sample of this many
    # Metrics as Prometheus gives them: read at the last scrape (every scrape_interval_s),
    # latency quantiles from the engine's histogram buckets. False: exact at the moment read.
    prometheus_like: bool = True
    scrape_interval_s: float = 15.0
    # Scrapes fall this far after each multiple of the interval: a reconcile loop is not
    # in phase with Prometheus, so a decision (every 30 s, from 0) reads a scrape 8 s
    # old, about half an interval, as at a random phase.
    scrape_offset_s: float = 7.0
    # Decode pinning (reconciler.sim.generations): a decode pool is split into at most
    # this many generations, sub-pools whose sequences stay on their instances (1: one
    # fluid pool, where a new instance relieves the running sequences at once).
    decode_generations: int = 4
    # Generations whose per-instance batch and step time (in the last second) agree
    # within this (relative) merge; negative: never, unless a new one needs a slot.
    generation_merge_tolerance: float = 0.02
    # The decode router fills the least loaded instances first by the load they
    # reported this many seconds ago (0: the current load, a perfect router).
    router_staleness_s: int = 1
    # The simulated engines' speed against the cluster file's GPU figures, per role: the
    # share of the declared compute and memory bandwidth their cards deliver (1: as
    # declared). The policies' performance models read the declared figures, so a
    # value other than 1 is a model that is off (0.77: engines ~30% slower than the
    # model says, as a card whose datasheet-scaled figures overstate it would be).
    prefill_engine_speed: float = 1.0
    decode_engine_speed: float = 1.0
    # Time every request's TTFT spends outside the instances, whatever the load: a
    # gateway, tokenisation, the network to the engine. No performance model sees it;
    # a deployment behind a gateway has some.
    ttft_outside_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prefill_engine_speed", "decode_engine_speed"):
            speed = getattr(self, name)
            if not (math.isfinite(speed) and speed > 0):
                raise ValueError(f"{name} must be a positive number, got {speed!r}")
        if not (math.isfinite(self.ttft_outside_s) and self.ttft_outside_s >= 0):
            raise ValueError(
                f"ttft_outside_s must be a non-negative number, got {self.ttft_outside_s!r}"
            )

    def engine_speed(self, role: str) -> float:
        """``role``'s engine speed (``prefill_engine_speed`` or ``decode_engine_speed``)."""
        return self.prefill_engine_speed if role == "prefill" else self.decode_engine_speed

    @property
    def engines_note(self) -> str | None:
        """What a report says of engine speeds other than 1 and of a TTFT spent outside
        the instances (None when the engines run as declared, with none)."""
        notes = []
        if self.prefill_engine_speed != 1.0 or self.decode_engine_speed != 1.0:
            notes.append(
                f"simulated engines at {self.prefill_engine_speed:g}x (prefill) and "
                f"{self.decode_engine_speed:g}x (decode) the compute and memory bandwidth "
                "the cluster file declares; the policies' performance models read the "
                "declared figures"
            )
        if self.ttft_outside_s > 0:
            notes.append(
                f"every TTFT holds {self.ttft_outside_s * 1000:.0f} ms spent outside the "
                "instances (a gateway, the network), which no performance model sees"
            )
        return "; ".join(notes) or None


def engine_perf(
    policy: ServicePolicy, cluster: ClusterSpec, role: str, gpu_type: str, config: SimConfig
) -> InstancePerf:
    """One simulated ``role`` instance of ``policy`` on ``gpu_type`` as it runs: the
    card at ``config``'s engine speed (``engine_gpu``), ``config``'s batch limit."""
    return instance_perf(
        policy.model,
        gpu_type,
        engine_gpu(cluster.gpu_types[gpu_type], config.engine_speed(role)),
        policy.role(role).gpus_per_instance,
        max_batch=config.max_batch,
    )


def engine_gpu(gpu: GpuType, speed: float) -> GpuType:
    """The card the simulated engines run on: ``gpu`` delivering ``speed`` x its
    declared compute and memory bandwidth (``SimConfig.prefill_engine_speed``); ``gpu``
    itself at 1."""
    if speed == 1.0:
        return gpu
    return gpu.model_copy(
        update={
            "bf16_tflops": gpu.bf16_tflops * speed,
            "memory_bandwidth_gbps": gpu.memory_bandwidth_gbps * speed,
        }
    )


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadProfile:
    """A workload binned per second, plus the length distributions the fluid model needs
    and a (sample of the) requests for per-request outcomes."""

    count: np.ndarray  # requests arriving in second t
    prompt_sum: np.ndarray
    prompt_sq_sum: np.ndarray
    output_sum: np.ndarray
    prompt_classes: np.ndarray  # equal-probability prompt lengths (quantile midpoints)
    output_survival: np.ndarray  # P(output > x) for x = 0 .. max output
    prompt_mean: float
    prompt_sq_mean: float
    output_mean: float
    output_p99: float
    sample: Workload | None  # requests (or a uniform sample) for per-request outcomes
    sample_weight: float  # requests one sample request stands for
    name: str = "load"
    cyclic: bool = False  # repeat forever (the embedded default fleet)
    notes: tuple[str, ...] = field(default=())
    # Seconds before this are a warm-up (``preceded_by``): simulated, so every policy
    # enters the judged part with the memory and the fleet that traffic left it, but
    # neither judged nor counted.
    judged_from_s: int = 0

    @property
    def horizon_s(self) -> int:
        return len(self.count)

    def preceded_by(self, warmup: LoadProfile) -> LoadProfile:
        """This load after ``warmup``: one profile whose first ``warmup.horizon_s``
        seconds are ``warmup``'s and are not judged (``judged_from_s``). The length
        statistics, sample weight and name stay this load's; the request sample is
        both samples, this one's shifted by the warm-up."""
        if self.cyclic or warmup.cyclic or self.judged_from_s or warmup.judged_from_s:
            raise ValueError("a warm-up joins two plain (not cyclic, not warmed-up) loads")
        if self.sample is None or warmup.sample is None:
            raise ValueError("a warm-up needs both loads' request samples")
        shift = warmup.horizon_s
        sample = Workload(
            np.concatenate([warmup.sample.arrival_s, self.sample.arrival_s + shift]),
            np.concatenate([warmup.sample.prompt_tokens, self.sample.prompt_tokens]),
            np.concatenate([warmup.sample.output_tokens, self.sample.output_tokens]),
            self.sample.name,
        )
        return replace(
            self,
            count=np.concatenate([warmup.count, self.count]),
            prompt_sum=np.concatenate([warmup.prompt_sum, self.prompt_sum]),
            prompt_sq_sum=np.concatenate([warmup.prompt_sq_sum, self.prompt_sq_sum]),
            output_sum=np.concatenate([warmup.output_sum, self.output_sum]),
            sample=sample,
            judged_from_s=shift,
            notes=(
                *self.notes,
                f"after a warm-up of {shift / 3600:g} h ({warmup.name}; not judged): "
                + "; ".join(warmup.notes),
            ),
        )

    def judged_after(self, warmup_s: int) -> LoadProfile:
        """This load with its first ``warmup_s`` seconds a warm-up (run, not judged:
        ``judged_from_s``), for a caller that has no other traffic to precede it."""
        if self.cyclic or self.judged_from_s:
            raise ValueError("a warm-up is set once, on a plain (not cyclic) load")
        if not 0 <= warmup_s < self.horizon_s:
            raise ValueError(
                f"a warm-up of {warmup_s} s leaves nothing of this {self.horizon_s} s load to judge"
            )
        return replace(self, judged_from_s=warmup_s)

    def judged(self) -> LoadProfile:
        """The judged part alone, as a plain profile from time 0 (itself without a
        warm-up): what a policy that needs no memory (static provisioning, oracle-min,
        the reactive reference) is sized or planned on."""
        if self.judged_from_s == 0:
            return self
        return self._part(self.judged_from_s, None)

    def warm_up(self) -> LoadProfile:
        """The warm-up alone (``preceded_by``), as a plain profile: the service's past
        when the judged part begins, what provisioning without hindsight is sized on
        (``static-past-peak``). ``ValueError`` when the load has no warm-up."""
        if self.judged_from_s == 0:
            raise ValueError("this load has no warm-up")
        return self._part(0, self.judged_from_s)

    def _part(self, start: int, stop: int | None) -> LoadProfile:
        """Seconds ``[start, stop)`` (``stop`` None: to the end) as a plain profile
        from time 0 (the length statistics stay the whole load's). Made once per
        profile: an evaluation reads the judged part for oracle-min, static peak's
        sizing, the fixed fleets' runs and its totals, and filtering the request
        sample each time was most of the cost. Kept in the instance's ``__dict__``,
        outside the fields, so equality, ``replace`` and the repr never see it."""
        parts: dict[tuple[int, int | None], LoadProfile] = self.__dict__.setdefault("_parts", {})
        key = (start, stop)
        if key not in parts:
            parts[key] = self._sliced(start, stop)
        return parts[key]

    def _sliced(self, start: int, stop: int | None) -> LoadProfile:
        sample = self.sample
        if sample is not None:
            keep = sample.arrival_s >= start
            if stop is not None:
                keep &= sample.arrival_s < stop
            sample = Workload(
                sample.arrival_s[keep] - start,
                sample.prompt_tokens[keep],
                sample.output_tokens[keep],
                sample.name,
            )
        return replace(
            self,
            count=self.count[start:stop],
            prompt_sum=self.prompt_sum[start:stop],
            prompt_sq_sum=self.prompt_sq_sum[start:stop],
            output_sum=self.output_sum[start:stop],
            sample=sample,
            judged_from_s=0,
        )

    @property
    def requests(self) -> float:
        return float(self.count.sum())

    @classmethod
    def from_bins(
        cls,
        count: np.ndarray,
        prompt_sum: np.ndarray,
        prompt_sq_sum: np.ndarray,
        output_sum: np.ndarray,
        prompt: np.ndarray,
        output: np.ndarray,
        *,
        length_classes: int,
        sample: Workload | None,
        sample_weight: float,
        name: str,
        cyclic: bool,
        notes: tuple[str, ...],
    ) -> LoadProfile:
        """A profile from its per-second sums, with the length statistics read from the
        per-request ``prompt`` and ``output`` lengths they were binned (or drawn) from."""
        return cls(
            count=count,
            prompt_sum=prompt_sum,
            prompt_sq_sum=prompt_sq_sum,
            output_sum=output_sum,
            prompt_classes=_quantile_classes(prompt, length_classes),
            output_survival=_survival(output),
            prompt_mean=float(prompt.mean()),
            prompt_sq_mean=float((prompt * prompt).mean()),
            output_mean=float(output.mean()),
            output_p99=float(np.quantile(output, 0.99)),
            sample=sample,
            sample_weight=sample_weight,
            name=name,
            cyclic=cyclic,
            notes=notes,
        )

    @classmethod
    def from_workload(
        cls,
        workload: Workload,
        *,
        horizon_s: int | None = None,
        length_classes: int = 32,
        sample_limit: int = 500_000,
        seed: int = 0,
        cyclic: bool = False,
    ) -> LoadProfile:
        """Bin ``workload`` per second (the horizon defaults to its last arrival + 1 s)."""
        if workload.requests == 0:
            raise ValueError(f"workload '{workload.name}' has no requests")
        horizon = int(horizon_s if horizon_s is not None else math.floor(workload.duration_s) + 1)
        inside = workload.arrival_s < horizon
        sec = np.floor(workload.arrival_s[inside]).astype(np.int64)
        prompt = workload.prompt_tokens[inside].astype(np.float64)
        output = workload.output_tokens[inside].astype(np.float64)
        count = np.bincount(sec, minlength=horizon).astype(np.float64)
        prompt_sum = np.bincount(sec, weights=prompt, minlength=horizon)
        prompt_sq_sum = np.bincount(sec, weights=prompt * prompt, minlength=horizon)
        output_sum = np.bincount(sec, weights=output, minlength=horizon)
        kept = Workload(
            workload.arrival_s[inside],
            workload.prompt_tokens[inside],
            workload.output_tokens[inside],
            workload.name,
        )
        sample, weight = kept, 1.0
        if kept.requests > sample_limit:
            rng = np.random.default_rng([seed, 0x5A3])
            pick = np.sort(rng.choice(kept.requests, size=sample_limit, replace=False))
            sample = Workload(
                kept.arrival_s[pick], kept.prompt_tokens[pick], kept.output_tokens[pick], kept.name
            )
            weight = kept.requests / sample_limit
        return cls.from_bins(
            count,
            prompt_sum,
            prompt_sq_sum,
            output_sum,
            prompt,
            output,
            length_classes=length_classes,
            sample=sample,
            sample_weight=weight,
            name=workload.name,
            cyclic=cyclic,
            notes=workload.notes,
        )

    def scaled(self, factor: float, seed: int = 0, smoothing_s: int = 60) -> LoadProfile:
        """``factor`` x the load as a fluid, for fleets whose request count is too large
        to hold as arrays (``Workload.rate_scaled`` is the per-request version).

        Like the per-request version it keeps the rate curve at minute scale but not the
        original's per-second noise times ``factor``: the bins are averaged over
        ``smoothing_s`` seconds (the jitter of copied requests), multiplied, and the
        count of each second is then drawn from a Poisson distribution (seeded), with
        the token sums following the count. Per-request outcomes use the unscaled
        requests, each standing for ``factor`` requests."""
        if not factor > 0:
            raise ValueError(f"scale factor must be positive, got {factor}")
        rng = np.random.default_rng([seed, 0xF1D])
        kernel = np.ones(max(1, smoothing_s)) / max(1, smoothing_s)

        def smooth(values: np.ndarray) -> np.ndarray:
            out: np.ndarray = np.convolve(values, kernel, mode="same")
            return out

        mean_count = smooth(self.count) * factor
        count = rng.poisson(mean_count).astype(np.float64)
        ratio = np.where(mean_count > 0, count / np.maximum(mean_count, 1e-12), 0.0)
        return replace(
            self,
            count=count,
            prompt_sum=smooth(self.prompt_sum) * factor * ratio,
            prompt_sq_sum=smooth(self.prompt_sq_sum) * factor * ratio,
            output_sum=smooth(self.output_sum) * factor * ratio,
            sample_weight=self.sample_weight * float(count.sum()) / max(self.requests, 1e-12),
            name=f"{self.name} x{factor:g} (fluid)",
            notes=(
                *self.notes,
                f"load scaled x{factor:g} as a fluid (bins averaged over {smoothing_s} s, Poisson counts, "
                f"seed {seed}); per-request outcomes from the unscaled requests",
            ),
        )

    def bin(self, t: int) -> tuple[float, float, float, float]:
        """(requests, prompt tokens, squared prompt tokens, output tokens) arriving in
        second ``t``."""
        if self.cyclic:
            t %= self.horizon_s
        elif t >= self.horizon_s or t < 0:
            return 0.0, 0.0, 0.0, 0.0
        return (
            float(self.count[t]),
            float(self.prompt_sum[t]),
            float(self.prompt_sq_sum[t]),
            float(self.output_sum[t]),
        )

    def demand_series(self, window_s: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_s, prompt tokens/s, output tokens/s) averaged over ``window_s`` bins: the
        demand static provisioning sizes for (output tokens attributed to the arrival
        second)."""
        n = self.horizon_s
        bins = math.ceil(n / window_s)
        pad = bins * window_s - n

        def average(values: np.ndarray) -> np.ndarray:
            out: np.ndarray = (
                np.concatenate([values, np.zeros(pad)]).reshape(bins, window_s).sum(axis=1)
                / window_s
            )
            return out

        return np.arange(bins) * float(window_s), average(self.prompt_sum), average(self.output_sum)


def sampled_s(horizon_s: int, sample_until_s: float | None) -> int:
    """The seconds a profile's request sample covers (all of them without a limit)."""
    if sample_until_s is None:
        return horizon_s
    return max(0, min(horizon_s, math.ceil(sample_until_s)))


def synthetic_profile(
    shape: str | LengthShape,
    *,
    hours: float,
    peak_rps: float,
    seed: int = 0,
    trough_ratio: float = 1.0 / 3.0,
    bursts: tuple[Burst, ...] | None = None,
    length_classes: int = 32,
    sample_limit: int = 200_000,
    cyclic: bool = False,
    sample_until_s: float | None = None,
) -> LoadProfile:
    """The load of ``synthetic_workload`` binned directly, without a Python-side array
    per request: per second a Poisson count of the rate curve, and token sums drawn
    from a gamma distribution with the sum's exact mean and variance (``n`` times the
    length distribution's). For fleets too large for per-request arrays (the
    benchmark, the embedded default fleet). Per-request outcomes use a sample of the
    same process (at most ``sample_limit`` requests over the day). ``sample_until_s``:
    the sample, at the same density, covers only the day's first seconds: for a caller
    that simulates no further (the review's warm-up reads ~12 minutes of a 2-hour day,
    and drawing the whole day's sample was half of its time). Per-request outcomes and
    length histograms after it are empty."""
    horizon = round(hours * 3600)
    rng = np.random.default_rng([seed, 0xB1A5])
    if bursts is None:
        bursts = default_bursts(hours, seed)
    expected = peak_rps * horizon * (1.0 + trough_ratio) / 2.0
    sample_rps = peak_rps * min(1.0, sample_limit / max(expected, 1.0))
    sample = synthetic_workload(
        shape,
        hours=hours,
        peak_rps=sample_rps,
        seed=seed,
        trough_ratio=trough_ratio,
        bursts=bursts,
        until_s=sample_until_s,
    )
    t = np.arange(horizon) + 0.5
    rate = rate_curve(t, float(horizon), peak_rps, trough_ratio, bursts)
    count = rng.poisson(rate).astype(np.float64)
    prompt = sample.prompt_tokens.astype(np.float64)
    output = sample.output_tokens.astype(np.float64)

    def gamma_sums(values: np.ndarray) -> np.ndarray:
        mean, var = float(values.mean()), float(values.var())
        shape_k = np.where(count > 0, count * mean * mean / max(var, 1e-9), 1.0)
        draw = rng.gamma(shape_k, max(var, 1e-9) / mean)
        return np.where(count > 0, draw, 0.0)

    prompt_sum = gamma_sums(prompt)
    output_sum = gamma_sums(output)
    # Squared prompts follow the per-second prompt mass (attention work).
    prompt_sq_sum = prompt_sum * float((prompt * prompt).mean() / prompt.mean())
    # The same call as ``LoadProfile.from_workload``'s: from_bins is what the two
    # sources share; the sample's weight and the notes are each source's own.
    return LoadProfile.from_bins(
        count,
        prompt_sum,
        prompt_sq_sum,
        output_sum,
        prompt,
        output,
        length_classes=length_classes,
        sample=sample,
        # Requests one sample request stands for, over the span the sample covers.
        sample_weight=float(count[: sampled_s(horizon, sample_until_s)].sum())
        / max(sample.requests, 1),
        name=sample.name,
        cyclic=cyclic,
        notes=(
            sample.notes[0].replace(f"peak {sample_rps:g} req/s", f"peak {peak_rps:g} req/s")
            + f"; binned per second ({int(count.sum())} requests, per-request outcomes on a sample of {sample.requests})",
        ),
    )


def _quantile_classes(values: np.ndarray, classes: int) -> np.ndarray:
    probs = (np.arange(classes) + 0.5) / classes
    return np.quantile(values, probs)


def _survival(output: np.ndarray) -> np.ndarray:
    """``G[x] = P(L > x)`` for integer x from 0 to max(L)."""
    lengths = np.maximum(output.astype(np.int64), 1)
    counts = np.bincount(lengths, minlength=int(lengths.max()) + 1).astype(np.float64)
    at_most = np.cumsum(counts) / counts.sum()
    survival: np.ndarray = 1.0 - at_most
    survival[-1] = 0.0
    return survival


# --------------------------------------------------------------------------- helpers


def fifo_delay(
    position: np.ndarray, served_cum: np.ndarray, first: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """When a FIFO server has served ``position`` units, given the cumulative amount served
    by the end of each second (``served_cum[t]`` at time t + 1, 0 at time 0; linear in
    between). Returns (time, resolved); unresolved entries get ``inf``.

    ``first``: where the positions are expected to lie beyond what was served by time
    ``first``, only the curve from there is searched (a late window of a long run need
    not copy the whole day); if any does not, the whole curve is, so the answer is the
    same whatever ``first``."""
    first = min(max(first, 0), max(served_cum.size - 1, 0))
    # curve[i]: served by time first + i
    curve = np.concatenate(([served_cum[first - 1] if first else 0.0], served_cum[first:]))
    index = curve.searchsorted(position, side="left")
    if first and not index.all():  # a position at or below curve[0]: search it all
        return fifo_delay(position, served_cum)
    resolved = index < curve.size
    index = fast_clip(index, 1, curve.size - 1)
    below = index - 1
    lo, hi = curve[below], curve[index]
    rising = hi > lo
    frac = np.where(rising, (position - lo) / np.where(rising, hi - lo, 1.0), 1.0)
    time = (below + first) + fast_clip(frac, 0.0, 1.0)
    time = np.where(position <= 0, 0.0, time)
    return np.where(resolved, time, np.inf), resolved


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    """The exact ``q`` quantile of ``values`` weighted by ``weights`` (None: no weight)."""
    mask = weights > 0
    if not mask.any():
        return None
    v, w = values[mask], weights[mask]
    # ndarray methods, not np.argsort & co.: the same work without their wrappers.
    order = v.argsort(kind="stable")
    cum = w[order].cumsum()
    index = int(cum.searchsorted(q * cum[-1], side="left"))
    return float(v[order][min(index, v.size - 1)])


def bucket_counts(values: np.ndarray, weights: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Cumulative weight per bucket upper bound ``le`` of ``bounds`` (finite, ascending),
    plus the +Inf bucket last: a Prometheus histogram's ``_bucket`` series after
    observing each value ``weight`` times (a value equal to a bound counts in it)."""
    index = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left")
    per_bucket = np.bincount(index, weights=weights, minlength=len(bounds) + 1)
    cumulative: np.ndarray = np.cumsum(per_bucket)
    return cumulative


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float:
    """PromQL ``histogram_quantile(q, ...)`` over one histogram (Prometheus'
    ``promql/quantile.go``): ``bounds`` the finite upper bounds, ascending; ``cumulative``
    the count at or below each, then the +Inf count. The rank ``q x total`` is found in
    the first bucket whose cumulative count reaches it and interpolated linearly between
    the bucket's lower bound (0 for the first bucket) and its upper bound; a rank in the
    +Inf bucket returns the highest finite bound. NaN without observations, -Inf / +Inf
    for ``q`` below 0 / above 1."""
    if len(cumulative) != len(bounds) + 1 or not bounds:
        raise ValueError("cumulative needs one count per finite bound plus the +Inf count")
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    total = float(cumulative[-1])
    if not total > 0:
        return math.nan
    rank = q * total
    b = next(i for i, count in enumerate(cumulative) if count >= rank)
    if b == len(bounds):
        return float(bounds[-1])
    if b == 0 and bounds[0] <= 0:
        return float(bounds[0])
    start = 0.0 if b == 0 else float(bounds[b - 1])
    below = 0.0 if b == 0 else float(cumulative[b - 1])
    in_bucket = float(cumulative[b]) - below
    if in_bucket <= 0:  # q = 0 over an empty first bucket: 0/0 in PromQL
        return math.nan
    return start + (float(bounds[b]) - start) * (rank - below) / in_bucket


def _bucket_quantile(
    values: np.ndarray, weights: np.ndarray, q: float, bounds: Sequence[float]
) -> float | None:
    """``histogram_quantile`` over ``values`` observed ``weights`` times each (None: no
    observation), the way Prometheus reads a window of an engine's histogram."""
    if not (weights > 0).any():
        return None
    value = histogram_quantile(q, bounds, bucket_counts(values, weights, bounds).tolist())
    return value if math.isfinite(value) else None


class _Grow:
    """A per-second table (rows = seconds) that grows by doubling."""

    def __init__(self, columns: Sequence[str], capacity: int = 4096):
        self.index = {name: i for i, name in enumerate(columns)}
        self.data = np.zeros((capacity, len(columns)))
        self.rows = 0
        # One row as packed doubles: ``struct`` writes a row of Python floats into the
        # table about twice as fast as numpy converts a list (the simulator's hot loop).
        self.row_format = struct.Struct(f"={len(columns)}d")

    def append(self, row: list[float]) -> None:
        if self.rows == self.data.shape[0]:
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        self.data[self.rows] = row
        self.rows += 1

    def next_row(self) -> int:
        """Claim the next row; its byte offset in ``data`` (write it with ``row_format``:
        ``row_format.pack_into(data.data, offset, *values)``, the same values as
        ``append``)."""
        if self.rows == self.data.shape[0]:
            self.data = np.concatenate([self.data, np.zeros_like(self.data)])
        offset = self.rows * self.row_format.size
        self.rows += 1
        return offset

    def col(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.rows if stop is None else min(stop, self.rows)
        return self.data[start:stop, self.index[name]]


@dataclass(frozen=True)
class PrefillPool:
    gpu_type: str
    link: str
    perf: InstancePerf
    link_gbps: float
    capacity_work_per_s: float  # per instance: compute, capped by the link


@dataclass(frozen=True)
class DecodePool:
    gpu_type: str
    perf: InstancePerf
    slo_capacity_tps: float  # routing weight: decode tokens/s at the TBT SLO


# vLLM's bucket bounds for its token-count histograms (1, 2, 5, 10, ... up to the
# context length; 1 M covers every model here), then +Inf.
# Mutable state of ``ServiceSim`` besides the queues, cohorts and counters.
_SNAPSHOT_SCALARS = (
    "queue_work",
    "queue_requests",
    "arrival_rate_work",
    "admit_requests",
    "admit_tokens",
    "in_decode",
    "prefill_instances",
)
_SNAPSHOT_LISTS = (
    "prefill_count",
    "decode_ready",
    "decode_draining",
)


class PrefillSecond(NamedTuple):
    """What steps 1 and 2 of a second (arrivals, prefill) hand on to the rest of it."""

    arrived: float
    admitted: float
    dropped: float
    admitted_work: float
    served_requests: float
    served_tokens: float
    served_output: float
    busy: float
    servers: float
    ggc_wait_s: float
    shares_slowdowns: tuple[float, ...]  # per prefill pool: its share, its link slowdown
    # The second's row reads these after it (so a replayed second need not set them).
    queue_requests: float
    prefill_work_in: float  # cumulative
    prefill_work_out: float


# The counters steps 1 and 2 change.
_PREFILL_COUNTERS = (
    "arrived",
    "dropped_no_endpoint",
    "dropped_timeout",
    "admitted",
    "prefilled",
    "prefill_work_in",
    "prefill_work_out",
)
# Those counters' values, as a tuple in that order.
_prefill_counter_values = operator.itemgetter(*_PREFILL_COUNTERS)


@dataclass(eq=False)
class PrefillTape:
    """Steps 1 and 2 (arrivals, prefill) of consecutive seconds from ``start``, recorded
    by ``ServiceSim.step`` while attached as ``ServiceSim.prefill_tape``.

    They depend only on the state the run starts from, the prefill counts and whether a
    decode instance is ready, not on how many: another run from that state with those
    prefill counts replays the seconds the tape holds (the same rows and state as
    simulating them) and records on where it ends. The caller attaches a tape only to
    runs from the state it was started at; a run whose prefill counts differ from the
    first's (or that has no decode instance ready where it had) neither replays nor
    records."""

    start: int
    seconds: list[tuple[PrefillSecond, tuple[Any, ...]]] = field(default_factory=list)
    key: tuple[float, int, bool] | None = None  # capacity, instances, decode ready


@dataclass(frozen=True)
class SimSnapshot:
    """The state of a ``ServiceSim`` at one second (``ServiceSim.snapshot``)."""

    t: int
    rows: int
    scalars: Mapping[str, float]
    lists: Mapping[str, list[float]]
    queue: tuple[tuple[float, ...], ...]
    admit_queue: tuple[tuple[float, ...], ...]
    decode: tuple[GenerationsState, ...]  # per decode pool: generations, cohorts, router
    cum: Mapping[str, float]


# --------------------------------------------------------------------------- one service


class ServiceSim:
    """The per-second fluid state of one service (see the module docstring)."""

    def _role_perfs(self, role: str) -> list[tuple[str, InstancePerf]]:
        """Instance performance on each allowed GPU type of a role, in the policy's
        ranking (``gpu_economics.ranked_gpu_types``: the first is what new instances
        run on); types missing from the cluster, or too small for the model, are noted."""
        policy, cluster = self.policy, self.cluster
        role_policy = policy.role(role)
        for gpu_type in role_policy.preferred_gpu_types():
            if gpu_type not in cluster.gpu_types:
                self.notes.append(
                    f"{policy.name}: {role} GPU type '{gpu_type}' is not in cluster {cluster.name}"
                )
        out: list[tuple[str, InstancePerf]] = []
        for gpu_type in ranked_gpu_types(policy, cluster, cast(Role, role)):
            perf = engine_perf(policy, cluster, role, gpu_type, self.config)
            if not perf.fits:
                self.notes.append(
                    f"{policy.name}: the model does not fit a {role} instance of "
                    f"{role_policy.gpus_per_instance} {gpu_type} GPUs (no capacity)"
                )
            out.append((gpu_type, perf))
        return out

    def __init__(
        self,
        policy: ServicePolicy,
        cluster: ClusterSpec,
        profile: LoadProfile,
        config: SimConfig | None = None,
    ):
        self.policy = policy
        self.cluster = cluster
        self.profile = profile
        self.config = config or SimConfig()
        # The engine's own latency histogram bounds (vLLM's; SGLang's TBT for SGLang).
        preset = policy.metrics.preset or policy.engine
        self.ttft_buckets = engine_latency_buckets(preset, "ttft")
        self.tbt_buckets = engine_latency_buckets(preset, "tbt")
        cfg = self.config
        model = policy.model
        kvb = float(model.kv_bytes_per_token)
        self.kv_bytes_per_token = kvb
        self.notes: list[str] = []

        # Work per prompt in compute-equivalent FLOPs: w_lin * S + w_att * S^2.
        fit_probe = None
        self.prefill_pools: list[PrefillPool] = []
        for gpu_type, perf in self._role_perfs("prefill"):
            fit_probe = fit_probe or perf
            work_per_token = float(perf.prefill_work(profile.prompt_mean)) / profile.prompt_mean
            for link in LINKS:
                gbps = (
                    cluster.network.rdma_gbps
                    if link == "rdma"
                    else cluster.network.cross_subgroup_gbps
                )
                link_tokens_per_s = gbps * 1e9 / 8.0 / kvb * cfg.max_link_utilisation
                cap = min(perf.prefill_capacity_work_per_s, link_tokens_per_s * work_per_token)
                self.prefill_pools.append(PrefillPool(gpu_type, link, perf, gbps, cap))
        assert fit_probe is not None or not self.prefill_pools
        probe = fit_probe or instance_perf(
            model, next(iter(cluster.gpu_types)), next(iter(cluster.gpu_types.values())), 1
        )
        eta_attention = probe.prefill_params["eta_attention"]
        self.work_linear = 2.0 * probe.params
        self.work_attention = 2.0 * kvb / eta_attention
        mean_ctx = profile.prompt_mean + profile.output_mean / 2.0
        self.decode_pools: list[DecodePool] = []
        for gpu_type, perf in self._role_perfs("decode"):
            slo_cap = perf.decode_capacity_tps(policy.slo.tbt_ms / 1000.0, mean_ctx)
            self.decode_pools.append(
                DecodePool(gpu_type, perf, max(slo_cap, 1e-6 if perf.fits else 0.0))
            )
        self.prefill_index = {(p.gpu_type, p.link): i for i, p in enumerate(self.prefill_pools)}
        self._idle_step_s = [
            p.perf.decode_step_scalar_s(1.0, 1.0, 1.0) if p.perf.fits else 0.0
            for p in self.decode_pools
        ]
        self._capacity = 0.0
        self._shares = [0.0] * len(self.prefill_pools)
        self._link_load: list[float | None] = [None] * len(self.prefill_pools)
        self._decode_ready_total = 0
        self._admit_weights: list[float] = []  # set with the counts (_derive_capacity)
        self._admit_weight_sum = 0.0
        self._admitting: list[int] = []
        self.decode_index = {p.gpu_type: i for i, p in enumerate(self.decode_pools)}

        # Per-request service-time statistics for the G/G/c term.
        mean_work = (
            self.work_linear * profile.prompt_mean + self.work_attention * profile.prompt_sq_mean
        )
        classes = profile.prompt_classes
        class_work = self.work_linear * classes + self.work_attention * classes**2
        self.mean_work = mean_work
        self.service_scv = float(np.var(class_work)) / max(float(np.mean(class_work)) ** 2, 1e-30)

        # Output-length survival and its integral (tokens generated up to x).
        survival = profile.output_survival
        self.out_grid = np.arange(survival.size, dtype=np.float64)
        self.out_survival = survival
        self.out_generated = np.concatenate(
            ([0.0], np.cumsum((survival[:-1] + survival[1:]) / 2.0))
        )
        self.out_max = float(survival.size - 1)
        self.out_p99 = profile.output_p99
        self.out_mean = profile.output_mean

        # Fleet counts (set by the fleet on every change).
        self.prefill_count = [0.0] * len(self.prefill_pools)
        self.prefill_instances = 0
        self.decode_ready = [0] * len(self.decode_pools)
        self.decode_draining = [0] * len(self.decode_pools)

        # Prefill queue: cohorts [requests, prompt tokens, work]; totals.
        self.queue: deque[list[float]] = deque()
        # The queue's cohorts after seconds replayed from ``prefill_tape`` (None: current).
        self._queue_from: tuple[tuple[float, ...], ...] | None = None
        self._prefill_tape: PrefillTape | None = None
        # The state the last replayed second left, set only when read (``_settle_replay``):
        # a run of replayed seconds sets it once, not every second.
        self._replayed: tuple[Any, ...] | None = None
        self._tape_key: tuple[float, int, bool] = (0.0, 0, False)
        self.queue_work = 0.0
        self.queue_requests = 0.0
        self.arrival_rate_work = 0.0
        # Decode admission queue: cohorts [requests, prompt tokens].
        self.admit_queue: deque[list[float]] = deque()
        self.admit_requests = 0.0
        self.admit_tokens = 0.0
        # Decode generations (clocks, cohorts, router) per pool.
        n_pools = len(self.decode_pools)
        self.decode_gens = [
            DecodeGenerations(
                pool.perf,
                slots=cfg.decode_generations,
                staleness=cfg.router_staleness_s,
                tolerance=cfg.generation_merge_tolerance,
                idle_step_s=idle,
                out_p99=self.out_p99,
                out_max=self.out_max,
                lengths=LengthCurves(self.out_grid, self.out_survival, self.out_generated),
            )
            for pool, idle in zip(self.decode_pools, self._idle_step_s, strict=True)
        ]
        self.slots = max(1, cfg.decode_generations)
        self.in_decode = 0.0

        # Cumulative counters.
        self.cum = {
            "arrived": 0.0,
            "dropped_no_endpoint": 0.0,
            "dropped_timeout": 0.0,
            "admitted": 0.0,
            "prefilled": 0.0,
            "decode_admitted": 0.0,
            "completed": 0.0,
            "prefill_work_in": 0.0,
            "prefill_work_out": 0.0,
            "admit_in": 0.0,
            "admit_out": 0.0,
        }
        columns = [
            "arrived",
            "admitted",
            "dropped",
            "cum_work_in",
            "cum_work_out",
            "work_in",
            "prefill_tokens",
            "prefill_capacity",
            "prefill_busy",
            "prefill_instances",
            "ggc_wait_s",
            "cum_admit_in",
            "cum_admit_out",
            "admit_in",
            "decode_tokens",
            "completed",
            "in_decode",
            "queue_requests",
            "admit_queue",
        ]
        for i in range(len(self.prefill_pools)):
            columns += [f"p{i}_share", f"p{i}_slowdown"]
        for q in range(n_pools):
            columns += [f"d{q}_{name}" for name in POOL_COLUMNS]
            for k in range(self.slots):
                columns += [f"d{q}g{k}_{name}" for name in SLOT_COLUMNS]
        self.series = _Grow(columns)
        # Column of each slot field, slots of every pool in order (pool q, slot k at
        # q * slots + k).
        self._slot_columns = {
            name: [
                self.series.index[f"d{q}g{k}_{name}"]
                for q in range(n_pools)
                for k in range(self.slots)
            ]
            for name in SLOT_COLUMNS
        }
        self._slot_columns_array = {
            name: np.asarray(columns, dtype=np.intp) for name, columns in self._slot_columns.items()
        }
        self._slot_field_cache: dict[tuple[str, ...], np.ndarray] = {}
        self.t = 0  # next second to simulate

    # ------------------------------------------------------------------ fleet input

    def set_counts(
        self,
        prefill: Mapping[tuple[str, str], float],
        decode_ready: Mapping[str, int],
        decode_draining: Mapping[str, int],
    ) -> None:
        """Instances per pool: prefill by (GPU type, link class), decode by GPU type."""
        self.prefill_count = [
            float(prefill.get((p.gpu_type, p.link), 0.0)) for p in self.prefill_pools
        ]
        self.prefill_instances = round(sum(self.prefill_count))
        self.decode_ready = [int(decode_ready.get(p.gpu_type, 0)) for p in self.decode_pools]
        self.decode_draining = [int(decode_draining.get(p.gpu_type, 0)) for p in self.decode_pools]
        for gens, ready, draining in zip(
            self.decode_gens, self.decode_ready, self.decode_draining, strict=True
        ):
            gens.set_counts(ready, draining, self.t)
        self._derive_capacity()

    def _derive_capacity(self) -> None:
        """What the counts imply for every second until they change (hot-loop cache)."""
        caps = [
            p.capacity_work_per_s * c
            for p, c in zip(self.prefill_pools, self.prefill_count, strict=True)
        ]
        self._capacity = sum(caps)
        self._shares = [c / self._capacity if self._capacity > 0 else 0.0 for c in caps]
        # served prompt tokens x this = the pool's link utilisation (None: no instance)
        self._link_load = [
            share * self.kv_bytes_per_token / (count * pool.link_gbps * 1e9 / 8.0)
            if count > 0
            else None
            for pool, share, count in zip(
                self.prefill_pools, self._shares, self.prefill_count, strict=True
            )
        ]
        self._decode_ready_total = sum(self.decode_ready)
        # The decode router's weight per pool (ready instances x tokens/s at the TBT SLO;
        # 0 for a pool with none ready or that the model does not fit), their sum, and
        # the pools that take admissions (a weight above 0).
        self._admit_weights = [
            ready * pool.slo_capacity_tps if ready > 0 and pool.perf.fits else 0.0
            for pool, ready in zip(self.decode_pools, self.decode_ready, strict=True)
        ]
        self._admit_weight_sum = sum(self._admit_weights)
        self._admitting = [q for q, weight in enumerate(self._admit_weights) if weight > 0]
        # What a prefill tape must have been recorded with to be replayed (PrefillTape).
        self._tape_key = (self._capacity, self.prefill_instances, self._decode_ready_total > 0)

    @property
    def prefill_tape(self) -> PrefillTape | None:
        """The tape steps 1 and 2 are replayed from and recorded on (``PrefillTape``)."""
        return self._prefill_tape

    @prefill_tape.setter
    def prefill_tape(self, tape: PrefillTape | None) -> None:
        self._settle_replay()
        self._prefill_tape = tape

    def decode_clock(self, gpu_type: str) -> float:
        """The pool's drain clock: tokens per sequence generated by its slowest draining
        generation (else its slowest busy one) since the start; a drain that began at
        clock ``c`` has had every sequence it held advance by ``decode_clock - c``."""
        index = self.decode_index.get(gpu_type)
        return self.decode_gens[index].clock if index is not None else 0.0

    # ------------------------------------------------------------------ one second

    def step(self) -> None:
        t = self.t
        cum = self.cum
        # PrefillSecond's fields, in its order, as locals: the rest of the second (the
        # simulator's innermost loop) reads most of them several times.
        (
            n_arr,
            admitted,
            dropped,
            admitted_work,
            served_n,
            served_tokens,
            served_output,
            busy,
            servers,
            ggc,
            shares_slowdowns,
            queue_requests,
            prefill_work_in,
            prefill_work_out,
        ) = self._prefill_second(t)
        capacity = self._capacity
        decode_ready_total = self._decode_ready_total
        decode_pools = self.decode_pools
        decode_gens = self.decode_gens
        admit_queue = self.admit_queue

        # 3. decode admission
        if served_n > 0:
            admit_queue.append([served_n, served_tokens, served_output])
            self.admit_requests += served_n
            self.admit_tokens += served_tokens
            cum["admit_in"] += served_n
        n_pools = len(decode_pools)
        admitted_to = [0.0] * n_pools
        room_of: list[list[float]] = [[]] * n_pools  # read only for the admitting pools
        prompt_of_admitted = output_of_admitted = 0.0
        for gens in decode_gens:
            if gens.used:  # a pool that never had an instance has nothing to prepare
                gens.prepare()  # orphaned sequences find instances, equal generations merge
        if self.admit_requests > 1e-12 and decode_ready_total > 0:
            mean_prompt = self.admit_tokens / self.admit_requests
            reserve = mean_prompt + self.out_mean
            slots = [0.0] * n_pools
            want = self.admit_requests
            weights = self._admit_weights
            weight_sum = self._admit_weight_sum
            # A pool without a weight would be given min(0, 0) = 0: it keeps its 0.
            for q in self._admitting:
                room = room_of[q] = decode_gens[q].room(reserve)
                slots[q] = sum(room)
                admitted_to[q] = min(slots[q], want * weights[q] / weight_sum)
            if weight_sum > 0:
                left = want - sum(admitted_to)
                if left > 1e-12:
                    room = [slots[q] - admitted_to[q] for q in range(n_pools)]
                    room_sum = sum(room)
                    if room_sum > 1e-12:
                        for q in range(n_pools):
                            admitted_to[q] += min(room[q], left * room[q] / room_sum)
            total_admit = sum(admitted_to)
            if total_admit > 1e-12:
                # Pop FIFO cohorts for the prompt tokens they carry.
                need = total_admit
                while need > 1e-12 and admit_queue:
                    head = admit_queue[0]
                    if head[0] <= need:
                        need -= head[0]
                        prompt_of_admitted += head[1]
                        output_of_admitted += head[2]
                        admit_queue.popleft()
                    else:
                        frac = need / head[0]
                        prompt_of_admitted += head[1] * frac
                        output_of_admitted += head[2] * frac
                        head[0] -= need
                        head[1] -= head[1] * frac
                        head[2] -= head[2] * frac
                        need = 0.0
                if need > 0.0:  # the queue held less than the slots (rounding): admit what it held
                    planned = total_admit
                    total_admit -= need
                    admitted_to = [a * total_admit / planned for a in admitted_to]
                self.admit_requests = max(0.0, self.admit_requests - total_admit)
                self.admit_tokens = max(0.0, self.admit_tokens - prompt_of_admitted)
                if not admit_queue:
                    self.admit_requests = self.admit_tokens = 0.0
                cum["admit_out"] += total_admit
                cum["decode_admitted"] += total_admit
                self.in_decode += total_admit
        admitted_total = max(sum(admitted_to), 1e-12)
        mean_admitted_prompt = prompt_of_admitted / admitted_total
        # The cohort's outputs follow the trace-wide length shape scaled to its own mean.
        mean_admitted_output = output_of_admitted / admitted_total
        length_scale = self.out_mean / max(mean_admitted_output, 1e-9)

        # 4. decode: the router spreads each pool's admissions over its generations,
        # then every generation runs one second; each pool appends its row values
        decode_tokens = 0.0
        completed = 0.0
        pool_rows: list[float] = []
        for q, gens in enumerate(decode_gens):
            admitted_q = admitted_to[q]
            if not gens.used and admitted_q <= 1e-12:
                # A pool that never had an instance: only its drain clock moves (the
                # same row ``advance`` would give, without building its totals).
                gens.idle_rows(admitted_q, pool_rows)
                continue
            to_slots = gens.route(admitted_q, room_of[q]) if admitted_q > 1e-12 else None
            if gens.used and gens.staleness:  # a current-load router keeps no reports
                gens.report()
            pool_tokens, pool_done = gens.advance(
                to_slots, admitted_q, mean_admitted_prompt, length_scale, pool_rows
            )
            completed += pool_done
            decode_tokens += pool_tokens
        cum["completed"] += completed
        self.in_decode = in_decode = max(0.0, self.in_decode - completed)

        series = self.series
        offset = series.next_row()  # before reading ``data``: it may grow
        series.row_format.pack_into(
            series.data.data,  # the array's memoryview: its buffer, faster to hand over
            offset,
            n_arr,
            admitted,
            dropped,
            prefill_work_in,
            prefill_work_out,
            admitted_work,
            served_tokens,
            capacity,
            busy,
            servers,
            ggc,
            cum["admit_in"],
            cum["admit_out"],
            served_n,
            decode_tokens,
            completed,
            in_decode,
            queue_requests,
            self.admit_requests,
            *shares_slowdowns,
            *pool_rows,
        )
        self.t = t + 1

    def _prefill_second(self, t: int) -> PrefillSecond:
        """Steps 1 and 2 of second ``t`` (arrivals, prefill), or their record on the
        attached ``prefill_tape`` (the same values and state)."""
        tape = self._prefill_tape
        if tape is None:
            return self._simulate_prefill(t)
        index = t - tape.start
        seconds = tape.seconds
        if tape.key == self._tape_key and 0 <= index < len(seconds):
            second, self._replayed = seconds[index]
            return second
        second = self._simulate_prefill(t)
        if index == len(seconds) and tape.key in (None, self._tape_key):
            tape.key = self._tape_key
            seconds.append((second, self._prefill_state()))
        return second

    def _prefill_state(self) -> tuple[Any, ...]:
        """What ``_simulate_prefill`` changes (its queue, counters and smoothed rate)."""
        return (
            tuple(map(tuple, self.queue)),
            self.queue_work,
            self.queue_requests,
            self.arrival_rate_work,
            _prefill_counter_values(self.cum),
        )

    def _set_prefill_state(self, state: tuple[Any, ...]) -> None:
        """Back to a ``_prefill_state``; the queue itself only when next read
        (``_prefill_queue``), as replayed seconds do not read it."""
        self._queue_from, self.queue_work, self.queue_requests, self.arrival_rate_work = state[:4]
        cum = self.cum
        for name, value in zip(_PREFILL_COUNTERS, state[4], strict=True):
            cum[name] = value

    def _settle_replay(self) -> None:
        """Set the state the replayed seconds left (before anything reads it)."""
        state = self._replayed
        if state is not None:
            self._replayed = None
            self._set_prefill_state(state)

    def _prefill_queue(self) -> deque[list[float]]:
        """The prefill queue, rebuilt after replayed seconds."""
        if self._queue_from is not None:
            self.queue = deque(list(cohort) for cohort in self._queue_from)
            self._queue_from = None
        return self.queue

    def _simulate_prefill(self, t: int) -> PrefillSecond:
        """Steps 1 and 2 of second ``t``: arrivals join the prefill queue (or are
        dropped), which is served FIFO at the pooled capacity; returns what the rest of
        the second reads."""
        self._settle_replay()
        cfg = self.config
        cum = self.cum
        queue = self._prefill_queue()
        n_arr, s_sum, s2_sum, out_sum = self.profile.bin(t)
        work_in = self.work_linear * s_sum + self.work_attention * s2_sum

        capacity = self._capacity
        decode_ready_total = self._decode_ready_total

        # 1. arrivals
        admitted = 0.0
        admitted_work = 0.0
        dropped = 0.0
        if n_arr > 0:
            cum["arrived"] += n_arr
            if capacity <= 0.0 or decode_ready_total == 0:
                dropped = n_arr
                cum["dropped_no_endpoint"] += n_arr
            elif self.queue_work / capacity > cfg.max_queue_wait_s:
                dropped = n_arr
                cum["dropped_timeout"] += n_arr
            else:
                admitted, admitted_work = n_arr, work_in
                queue.append([n_arr, s_sum, work_in, out_sum])
                self.queue_work += work_in
                self.queue_requests += n_arr
                cum["admitted"] += n_arr
                cum["prefill_work_in"] += work_in

        # 2. prefill, FIFO at the pooled capacity
        budget = capacity
        served_work = served_n = served_tokens = served_output = 0.0
        while budget > 0.0 and queue:
            head = queue[0]
            if head[2] <= budget:
                budget -= head[2]
                served_work += head[2]
                served_n += head[0]
                served_tokens += head[1]
                served_output += head[3]
                queue.popleft()
            else:
                frac = budget / head[2]
                take_n, take_tok, take_out = head[0] * frac, head[1] * frac, head[3] * frac
                head[0] -= take_n
                head[1] -= take_tok
                head[3] -= take_out
                head[2] -= budget
                served_work += budget
                served_n += take_n
                served_tokens += take_tok
                served_output += take_out
                budget = 0.0
        self.queue_work = max(0.0, self.queue_work - served_work)
        self.queue_requests = max(0.0, self.queue_requests - served_n)
        cum["prefill_work_out"] += served_work
        if not queue:
            self.queue_work = self.queue_requests = 0.0
            # Everything that arrived is served: say so exactly. Summed piece by piece,
            # the served total drifts a rounding below the arrived one, and a request
            # in a later second without arrivals (a synthetic day's sample at a low
            # rate) would then wait, in cohort_delays, for the next arrival's service.
            cum["prefill_work_out"] = cum["prefill_work_in"]
        cum["prefilled"] += served_n
        busy = served_work / capacity if capacity > 0 else 0.0
        alpha = 1.0 / max(cfg.load_smoothing_s, 1.0)
        self.arrival_rate_work += (admitted_work - self.arrival_rate_work) * alpha
        servers = float(self.prefill_instances)
        ggc = 0.0
        if capacity > 0 and servers > 0:
            per_instance = capacity / servers
            ggc = ggc_wait_s(
                self.arrival_rate_work / capacity,
                servers,
                self.mean_work / per_instance,
                cfg.arrival_scv + self.service_scv,
            )
        shares_slowdowns: list[float] = []
        max_rho = cfg.max_link_utilisation
        for share, link_load in zip(self._shares, self._link_load, strict=True):
            slowdown = (
                1.0 if link_load is None else 1.0 / (1.0 - min(served_tokens * link_load, max_rho))
            )
            shares_slowdowns += [share, slowdown]
        return PrefillSecond(
            arrived=n_arr,
            admitted=admitted,
            dropped=dropped,
            admitted_work=admitted_work,
            served_requests=served_n,
            served_tokens=served_tokens,
            served_output=served_output,
            busy=busy,
            servers=servers,
            ggc_wait_s=ggc,
            shares_slowdowns=tuple(shares_slowdowns),
            queue_requests=self.queue_requests,
            prefill_work_in=cum["prefill_work_in"],
            prefill_work_out=cum["prefill_work_out"],
        )

    # ------------------------------------------------------------------ state

    def snapshot(self) -> SimSnapshot:
        """Everything ``step`` changes, so a search can try counts and come back
        (``restore``); rows written after the snapshot are overwritten on the way."""
        self._settle_replay()
        return SimSnapshot(
            t=self.t,
            rows=self.series.rows,
            scalars={name: getattr(self, name) for name in _SNAPSHOT_SCALARS},
            lists={name: list(getattr(self, name)) for name in _SNAPSHOT_LISTS},
            queue=tuple(tuple(cohort) for cohort in self._prefill_queue()),
            admit_queue=tuple(tuple(cohort) for cohort in self.admit_queue),
            decode=tuple(gens.snapshot() for gens in self.decode_gens),
            cum=dict(self.cum),
        )

    def restore(self, snap: SimSnapshot) -> None:
        self._replayed = None  # the snapshot's state replaces it
        self.t = snap.t
        self.series.rows = snap.rows
        for name, value in snap.scalars.items():
            setattr(self, name, value)
        for name, values in snap.lists.items():
            setattr(self, name, list(values))
        self.queue = deque(list(c) for c in snap.queue)
        self._queue_from = None
        self.admit_queue = deque(list(c) for c in snap.admit_queue)
        for gens, state in zip(self.decode_gens, snap.decode, strict=True):
            gens.restore(state)
        self.cum = dict(snap.cum)
        self._derive_capacity()

    @property
    def in_flight(self) -> float:
        """Requests admitted and not yet completed (prefill queue, admission, decode)."""
        self._settle_replay()
        return self.queue_requests + self.admit_requests + self.in_decode

    def conservation(self) -> dict[str, float]:
        """Arrived = dropped + completed + in flight, as counts."""
        self._settle_replay()
        c = self.cum
        return {
            "arrived": c["arrived"],
            "dropped": c["dropped_no_endpoint"] + c["dropped_timeout"],
            "completed": c["completed"],
            "in_flight": self.in_flight,
        }

    # ------------------------------------------------------------------ metrics

    def scrape_s(self) -> int:
        """The second the metrics read now come from: the last scrape at or before now
        (scrapes every ``scrape_interval_s`` from ``scrape_offset_s``, in whole
        seconds), or now itself when ``prometheus_like`` is off."""
        if not self.config.prometheus_like:
            return self.t
        interval = self.config.scrape_interval_s
        offset = self.config.scrape_offset_s % interval
        if self.t < offset:
            return 0  # before the first scrape: the state at the start
        return min(self.t, int(math.floor((self.t - offset) / interval) * interval + offset))

    def _window(self, window_s: float, at_s: int | None) -> tuple[int, int]:
        """Seconds ``[start, end)`` of the window ending at ``at_s`` (default now)."""
        end = self.t if at_s is None else max(0, min(int(at_s), self.t))
        return max(0, end - round(window_s)), end

    def _gauge_rows(self, start: int, end: int, window_s: float) -> np.ndarray:
        """The seconds whose state a window's gauge readings average: every second
        (exact), or, as ``avg_over_time(g[window])`` at a scrape, the second before each
        scrape in ``(end - window_s, end]`` (a gauge sample is the state just then)."""
        if not self.config.prometheus_like:
            return np.arange(start, end)
        scrapes = np.arange(float(end), end - window_s, -self.config.scrape_interval_s)
        rows = np.floor(scrapes).astype(np.int64) - 1
        return rows[(rows >= start) & (rows < end)][::-1]

    def _quantile(
        self, values: np.ndarray, weights: np.ndarray, q: float, bounds: Sequence[float]
    ) -> float | None:
        """Exact weighted quantile, or ``histogram_quantile`` over vLLM's ``bounds``."""
        if self.config.prometheus_like:
            return _bucket_quantile(values, weights, q, bounds)
        return weighted_quantile(values, weights, q)

    def window_metrics(self, window_s: float, at_s: int | None = None) -> dict[str, float | None]:
        """The eight signals plus KV usage, queues and the mean TBT over the ``window_s``
        seconds before ``at_s`` (default now), as known at ``at_s`` (units as in
        ``reconciler.state.ServiceMetrics``). ``None`` where nothing was observed.

        With ``prometheus_like`` (a read at a scrape): rates over the window; TTFT and
        TBT by ``histogram_quantile`` over vLLM's buckets (the mean TBT, the
        histogram's sum over its count, is exact either way); GPU utilisation and SM
        activity averaged over the scraped samples in the window; KV usage the last
        sample, averaged over decode instances. Otherwise every value is exact."""
        start, end = self._window(window_s, at_s)
        if end <= start:
            return dict.fromkeys(METRIC_NAMES)
        s = self.series
        span = float(end - start)
        out: dict[str, float | None] = {
            "prefill_tps": float(s.col("prefill_tokens", start, end).sum()) / span,
            "decode_tps": float(s.col("decode_tokens", start, end).sum()) / span,
        }
        rows = self._gauge_rows(start, end, window_s)
        # Prefill counters: averaged over ready prefill instances, as DCGM + a mean would.
        instances = s.col("prefill_instances")[rows]
        busy = s.col("prefill_busy")[rows]
        probe = self.prefill_pools[0].perf if self.prefill_pools else None
        if probe is not None and instances.sum() > 0:
            w = instances / instances.sum()
            out["prefill_gpu_util"] = float(w @ probe.prefill_gpu_util(busy))
            out["prefill_sm_active"] = float(w @ probe.prefill_sm_active(busy))
        else:
            out["prefill_gpu_util"] = out["prefill_sm_active"] = None
        # Decode counters: per pool, weighted by GPUs.
        util_num = sm_num = kv_num = kv_den = gpu_den = 0.0
        kv_last = kv_last_instances = 0.0
        tbt_values: list[np.ndarray] = []
        tbt_weights: list[np.ndarray] = []
        for q, pool in enumerate(self.decode_pools):
            inst = s.col(f"d{q}_instances")[rows]
            kv = s.col(f"d{q}_kv")[rows]
            if inst.sum() <= 0:
                continue
            # Per generation: its instances share its load equally.
            util, sm = self._decode_activity(q, rows)
            util_num += float(util.sum())
            sm_num += float(sm.sum())
            gpu_den += float(inst.sum())
            tau, tokens = self._step_times(q, start, end)
            tbt_values.append(tau)
            tbt_weights.append(tokens)
            if not pool.perf.fits:
                # The weights leave no KV cache (capacity 0): such an engine cannot
                # serve, takes no admissions, and has no cache usage to report.
                continue
            kv_num += float(kv.sum())
            kv_den += float((inst * pool.perf.kv_capacity_tokens).sum())
            if inst[-1] > 0:  # each instance's gauge at the last sample: its share
                kv_last += float(kv[-1]) / pool.perf.kv_capacity_tokens
                kv_last_instances += float(inst[-1])
        out["decode_gpu_util"] = util_num / gpu_den if gpu_den > 0 else None
        out["decode_sm_active"] = sm_num / gpu_den if gpu_den > 0 else None
        if self.config.prometheus_like:
            # avg(vllm:kv_cache_usage_perc): the latest sample, a mean over instances
            out["decode_kv_usage"] = kv_last / kv_last_instances if kv_last_instances else None
        else:
            out["decode_kv_usage"] = kv_num / kv_den if kv_den > 0 else None
        quantile = self.policy.slo.quantile
        if tbt_values:
            # vLLM observes one inter-token gap per token: step times weighted by tokens.
            tbt = self._quantile(
                np.concatenate(tbt_values),
                np.concatenate(tbt_weights),
                quantile,
                self.tbt_buckets,
            )
            out["tbt"] = tbt * 1000.0 if tbt is not None else None
            # The histogram's sum over its count: exact, whatever its buckets.
            generated = float(sum(w.sum() for w in tbt_weights))
            gaps_s = sum(float(v @ w) for v, w in zip(tbt_values, tbt_weights, strict=True))
            out["tbt_mean"] = gaps_s / generated * 1000.0 if generated > 0 else None
        else:
            out["tbt"] = out["tbt_mean"] = None
        ttft = self._window_ttft_s(start, end, quantile)
        out["ttft"] = ttft * 1000.0 if ttft is not None else None
        # Waiting requests (vllm:num_requests_waiting summed over the role): the last
        # sample; the decode queue is the prompts done with prefill awaiting a slot.
        last = int(rows[-1]) if len(rows) else end - 1
        out["prefill_queue"] = float(s.col("queue_requests")[last])
        out["decode_queue"] = float(s.col("admit_queue")[last])
        # Requests decoding (vllm:num_requests_running summed over decode): the last
        # sample's sequences alive in every generation of every pool.
        rows_last = np.array([last])
        out["decode_running"] = float(
            sum(
                self._slot_block("alive", q, rows_last).sum() for q in range(len(self.decode_pools))
            )
        )
        return out

    def window_detail(
        self,
        window_s: float,
        quantiles: Sequence[float] = (0.5, 0.9),
        at_s: int | None = None,
    ) -> dict[str, float | None]:
        """What a planner reads beside the nine signals, over the ``window_s`` seconds
        before ``at_s`` (default now): ``requests_per_s`` (arrivals),
        ``mean_prompt_tokens`` and ``mean_output_tokens`` (of those arrivals), and
        ``ttft_pQ_ms`` / ``tbt_pQ_ms`` for each quantile (``p50`` for 0.5), computed as
        :meth:`window_metrics` computes them. ``None`` where nothing was observed. Kept
        apart from :meth:`window_metrics` so only callers that ask (external
        autoscalers, ``reconciler.sim.plugins``) pay for the extra quantiles."""
        labels = [f"p{q * 100:g}" for q in quantiles]
        out: dict[str, float | None] = dict.fromkeys(
            ["requests_per_s", "mean_prompt_tokens", "mean_output_tokens"]
            + [f"{kind}_{label}_ms" for label in labels for kind in ("ttft", "tbt")]
        )
        start, end = self._window(window_s, at_s)
        if end <= start:
            return out
        s = self.series
        out["requests_per_s"] = float(s.col("arrived", start, end).sum()) / float(end - start)
        profile = self.profile
        seconds = np.arange(start, end)
        seconds = (
            seconds % profile.horizon_s if profile.cyclic else seconds[seconds < len(profile.count)]
        )
        arrived = float(profile.count[seconds].sum())
        if arrived > 0:
            out["mean_prompt_tokens"] = float(profile.prompt_sum[seconds].sum()) / arrived
            out["mean_output_tokens"] = float(profile.output_sum[seconds].sum()) / arrived
        pools = range(len(self.decode_pools))
        steps = [self._step_times(q, start, end) for q in pools]
        tau = [step for step, _tokens in steps]
        tokens = [weight for _step, weight in steps]
        ttft_samples = self._window_ttft_samples(start, end)
        for q, label in zip(quantiles, labels, strict=True):
            ttft = (
                self._quantile(*ttft_samples, q, self.ttft_buckets)
                if ttft_samples is not None
                else None
            )
            out[f"ttft_{label}_ms"] = ttft * 1000.0 if ttft is not None else None
            # Step time weighted by the tokens generated at it, as window_metrics does.
            tbt = (
                self._quantile(np.concatenate(tau), np.concatenate(tokens), q, self.tbt_buckets)
                if tau
                else None
            )
            out[f"tbt_{label}_ms"] = tbt * 1000.0 if tbt is not None else None
        return out

    def window_lengths(
        self, window_s: float, at_s: int | None = None
    ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None:
        """Prompt- and output-length histograms of the requests that arrived over the
        ``window_s`` seconds before ``at_s`` (default now), as an engine exports them:
        cumulative counts per vLLM-style 1-2-5 bucket bound (``le``, up to ``+Inf``).
        From the profile's request sample (proportions are what a policy reads). None
        without requests."""
        sample = self.profile.sample
        if sample is None or sample.requests == 0:
            return None
        at = self.t if at_s is None else max(0, min(int(at_s), self.t))
        start, end = at - window_s, float(at)
        if self.profile.cyclic:
            horizon = float(self.profile.horizon_s)
            start, end = start % horizon, (end - 1e-9) % horizon + 1e-9
        lo, hi = np.searchsorted(sample.arrival_s, [start, end], side="left")
        if start > end:  # the window wraps around a cyclic profile
            picked = np.concatenate([np.arange(lo, sample.requests), np.arange(0, hi)])
        else:
            picked = np.arange(lo, hi)
        if picked.size == 0:
            return None
        bounds = np.asarray(ENGINE_LENGTH_BOUNDS)
        out = []
        for values in (sample.prompt_tokens[picked], sample.output_tokens[picked]):
            counts = np.bincount(
                np.searchsorted(bounds, values, side="left"), minlength=bounds.size
            )
            out.append(tuple(float(c) for c in np.cumsum(counts)[: bounds.size]))
        return ENGINE_LENGTH_BOUNDS, out[0], out[1]

    def utilisation_series(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Per second: GPU-utilisation and SM-activity counters summed over instances
        (ready prefill instances; decode instances including draining ones)."""
        s = self.series
        stop = self.t if stop is None else min(stop, self.t)
        busy = s.col("prefill_busy", start, stop)
        instances = s.col("prefill_instances", start, stop)
        out = {
            "prefill_util_sum": np.zeros(stop - start),
            "prefill_sm_sum": np.zeros(stop - start),
            "decode_util_sum": np.zeros(stop - start),
            "decode_sm_sum": np.zeros(stop - start),
        }
        if self.prefill_pools:
            perf = self.prefill_pools[0].perf
            out["prefill_util_sum"] = perf.prefill_gpu_util(busy) * instances
            out["prefill_sm_sum"] = perf.prefill_sm_active(busy) * instances
        for q in range(len(self.decode_pools)):
            util, sm = self._decode_activity(q, np.arange(start, stop))
            out["decode_util_sum"] += util
            out["decode_sm_sum"] += sm
        return out

    def _slot_field_columns(self, names: tuple[str, ...]) -> np.ndarray:
        """The columns of these slot fields, field by field (each every slot in order)."""
        columns = self._slot_field_cache.get(names)
        if columns is None:
            columns = np.concatenate([self._slot_columns_array[name] for name in names])
            self._slot_field_cache[names] = columns
        return columns

    def _slot_block(self, name: str, q: int, rows: np.ndarray | slice) -> np.ndarray:
        """Slot field ``name`` of decode pool ``q``'s slots in use: (slots, rows); ``rows``
        seconds, or a slice of them (the same block, read faster)."""
        used = max(1, self.decode_gens[q].used)
        columns = self._slot_columns_array[name][q * self.slots : q * self.slots + used]
        data = self.series.data
        block: np.ndarray = (
            data[rows, columns] if isinstance(rows, slice) else data[np.ix_(rows, columns)]
        ).T
        return block

    def _decode_activity(self, q: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GPU-utilisation and SM-activity counters of pool ``q`` summed over its
        instances at ``rows``: a generation's instances share its sequences equally, so
        the share running at least one is ``min(1, sequences / instances)``."""
        perf = self.decode_pools[q].perf
        inst = self._slot_block("instances", q, rows)
        alive = self._slot_block("alive", q, rows)
        active_fraction = np.where(inst > 0, np.minimum(1.0, alive / np.maximum(inst, 1e-12)), 0.0)
        batch_busy = np.where(alive > 0, alive / np.maximum(np.minimum(inst, alive), 1e-12), 0.0)
        util: np.ndarray = (perf.decode_gpu_util(active_fraction) * inst).sum(axis=0)
        sm: np.ndarray = (perf.decode_sm_active(batch_busy, active_fraction) * inst).sum(axis=0)
        return util, sm

    def _step_times(
        self, q: int, start: int, stop: int, flat: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pool ``q``'s decode step times in [start, stop) and the tokens generated at each
        (every generation's), flattened: the inter-token gaps vLLM observes (``flat``
        off: per generation slot (rows) and second)."""
        rows = slice(start, max(start, min(stop, self.series.rows)))
        tau = self._slot_block("tau", q, rows)
        tokens = self._slot_block("tokens", q, rows)
        return (tau.ravel(), tokens.ravel()) if flat else (tau, tokens)

    def _prefill_tables(self, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pool (rows) and prompt (columns): own prefill latency and unloaded KV transfer."""
        latency = np.stack([p.perf.prefill_latency_s(prompts) for p in self.prefill_pools])
        transfer = np.stack(
            [
                kv_transfer_s(prompts, self.kv_bytes_per_token, p.link_gbps)
                for p in self.prefill_pools
            ]
        )
        return latency, transfer

    def cohort_delays(self, seconds: np.ndarray, until: int | None = None) -> dict[str, np.ndarray]:
        """For arrival seconds ``seconds``: fluid prefill wait, G/G/c wait, prefill
        completion second, decode admission wait (inf = not yet resolved), as known at
        second ``until`` (default now: what happened later is not yet resolved)."""
        s = self.series
        until = self.t if until is None else min(until, self.t)
        last = max(until - 1, 0)
        cum_in = s.col("cum_work_in", 0, until)
        cum_out = s.col("cum_work_out", 0, until)
        work_in = s.col("work_in", 0, until)
        seconds = fast_clip(seconds, 0, last).astype(np.int64)
        # Work that arrived at a second is served from that second on (and admitted to
        # decode after it): the FIFO curves are searched from the earliest one.
        first = int(seconds.min()) if seconds.size else 0
        position = cum_in[seconds] - work_in[seconds] / 2.0
        depart, resolved = fifo_delay(position, cum_out, first)
        wait = np.where(resolved, np.maximum(0.0, depart - (seconds + 0.5)), np.inf)
        done_second = np.where(resolved, np.floor(np.minimum(depart, last)), 0).astype(np.int64)
        admit_in_cum = s.col("cum_admit_in", 0, until)
        admit_in = s.col("admit_in", 0, until)
        admit_out_cum = s.col("cum_admit_out", 0, until)
        admit_pos = admit_in_cum[done_second] - admit_in[done_second] / 2.0
        admit_time, admit_resolved = fifo_delay(admit_pos, admit_out_cum, first)
        admit_wait = np.where(
            admit_resolved, np.maximum(0.0, admit_time - (done_second + 0.5)), np.inf
        )
        admit_wait = np.where(resolved, admit_wait, np.inf)
        return {
            "wait_s": wait,
            "ggc_s": s.col("ggc_wait_s")[seconds],
            "depart_s": np.where(resolved, depart, np.inf),
            "done_second": done_second,
            "admit_wait_s": admit_wait,
        }

    def _after_prefill_s(self, seconds: np.ndarray) -> np.ndarray:
        """What a request's TTFT holds besides its prefill (its wait, work and KV
        transfer), by the second it was admitted to decode: its first token's step, and
        the time spent outside the instances (``SimConfig.ttft_outside_s``)."""
        return self._first_step_s(seconds) + self.config.ttft_outside_s

    def _first_step_s(self, seconds: np.ndarray) -> np.ndarray:
        """The first token's step in a second: the step time of the generation a request
        was admitted to, weighted by that second's admissions (none: the slowest)."""
        if seconds.size:
            first, last = int(seconds.min()), int(seconds.max())
            if last - first + 1 < seconds.size:  # requests share seconds: each second once
                return self._first_step_per_second(slice(first, last + 1))[seconds - first]
        return self._first_step_per_second(seconds)

    def _first_step_per_second(self, seconds: np.ndarray | slice) -> np.ndarray:
        """``_first_step_s`` of each second of ``seconds`` (an array, or a slice of them)."""
        size = seconds.stop - seconds.start if isinstance(seconds, slice) else seconds.size
        num = np.zeros(size)
        den = np.zeros(size)
        fallback = np.zeros(size)
        for q in range(len(self.decode_pools)):
            if not self.decode_gens[q].used:
                # A pool that never had an instance: every second of its slots is a
                # free slot's (no admissions, step 0), which adds exactly nothing here.
                continue
            admitted = self._slot_block("admitted", q, seconds)
            tau = self._slot_block("tau", q, seconds)
            num += (admitted * tau).sum(axis=0)
            den += admitted.sum(axis=0)
            fallback = np.maximum(fallback, tau.max(axis=0))
        return np.where(den > 0, num / np.maximum(den, 1e-12), fallback)

    def _window_ttft_s(self, start: int, end: int, quantile: float) -> float | None:
        """TTFT quantile (exact or from vLLM's buckets) of the requests whose prefill
        completed in [start, end), as known at ``end``."""
        samples = self._window_ttft_samples(start, end)
        if samples is None:
            return None
        return self._quantile(*samples, quantile, self.ttft_buckets)

    def _window_ttft_samples(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
        """TTFT in seconds and weight (requests) per (arrival second, pool, prompt class)
        of the requests whose prefill completed in [start, end), as known at ``end``;
        None without any. One still waiting for decode admission at ``end`` counts
        with the wait so far."""
        if not self.prefill_pools:
            return None
        first = max(0, start - int(self.config.max_queue_wait_s) - 30)
        seconds = np.arange(first, end)
        admitted = self.series.col("admitted", first, end)
        delays = self.cohort_delays(seconds, until=end)
        in_window = (delays["depart_s"] >= start) & (delays["depart_s"] < end) & (admitted > 0)
        if not in_window.any():
            return None
        secs = seconds[in_window]
        weights_n = admitted[in_window]
        admit_wait = np.where(
            np.isfinite(delays["admit_wait_s"][in_window]),
            delays["admit_wait_s"][in_window],
            np.maximum(0.0, end - (delays["done_second"][in_window] + 0.5)),
        )
        base = (
            delays["wait_s"][in_window]
            + delays["ggc_s"][in_window]
            + admit_wait
            + self._after_prefill_s(delays["done_second"][in_window])
        )
        latency, transfer = self._prefill_tables(self.profile.prompt_classes)
        values = []
        weights = []
        for p in range(len(self.prefill_pools)):
            share = self.series.col(f"p{p}_share")[secs]
            slow = self.series.col(f"p{p}_slowdown")[secs]
            v = base[:, None] + latency[p][None, :] + transfer[p][None, :] * slow[:, None]
            values.append(v.ravel())
            weights.append(np.repeat(weights_n * share, latency.shape[1]))
        return np.concatenate(values), np.concatenate(weights)

    # ------------------------------------------------------------------ outcomes

    def request_outcomes(self) -> RequestOutcomes:
        """Per-request TTFT/TBT attainment for the profile's request sample."""
        return request_outcomes(self)


@dataclass(frozen=True)
class RequestOutcomes:
    """Per-request results of one service over one run (fractions over all requests,
    dropped ones included as missing both SLOs).

    A request meets TTFT when its time to first token is within the SLO, and TBT when
    the SLO quantile of its own inter-token gaps is within the SLO (at most ``1 -
    quantile`` of its tokens came slower), so a decode step that stretches during a
    ramp fails the requests it slowed even if their mean gap looks fine. It meets both
    when it meets each, request by request. ``unattainable_share`` is the share that
    cannot meet TTFT even on an idle instance of the fastest allowed type; they still
    count as misses."""

    requests: float  # requests represented (sample x weight)
    dropped: float  # dropped at arrival, too long for the KV cache, or unfinished
    ttft_attainment: float
    tbt_attainment: float
    slo_attainment: float  # both SLOs, per request
    ttft_p50_ms: float | None
    ttft_quantile_ms: float | None  # at the SLO quantile, over completed requests
    tbt_p50_ms: float | None  # of each request's mean inter-token gap
    tbt_quantile_ms: float | None  # same, at the SLO quantile over requests
    completed_fraction: float
    tbt_token_quantile_ms: float | None = None  # SLO quantile over every generated token
    unattainable_share: float = 0.0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class PerRequest:
    """Per-request outcome arrays (probabilities where routing mixes over pools)."""

    arrival_s: np.ndarray
    ttft_ok: np.ndarray  # P(TTFT within the SLO)
    tbt_ok: np.ndarray  # P(SLO quantile of the inter-token gaps within the SLO)
    both_ok: np.ndarray  # P(both), times ``complete``
    complete: np.ndarray  # share of the request served to completion (0..1)
    unattainable: np.ndarray  # bool: misses TTFT even on an idle instance
    ttft_values: list[np.ndarray]  # per prefill pool
    ttft_weights: list[np.ndarray]
    tbt_values: list[np.ndarray]  # per decode pool: the mean gap
    tbt_weights: list[np.ndarray]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class PromptTables:
    """What each request's prompt costs on its own (``prompt_tables``), worked out once
    for requests that are judged many times: per prefill pool (rows) and request
    (columns) its own prefill latency and unloaded KV transfer, and per request its
    TTFT on an idle instance (``idle_ttft_s``)."""

    latency_s: np.ndarray
    transfer_s: np.ndarray
    idle_ttft_s: np.ndarray

    def head(self, count: int) -> PromptTables:
        """The tables of the first ``count`` requests (the same values)."""
        return PromptTables(
            self.latency_s[:, :count], self.transfer_s[:, :count], self.idle_ttft_s[:count]
        )


def prompt_tables(sim: ServiceSim, prompt: np.ndarray) -> PromptTables:
    """``PromptTables`` of these prompts on the service's prefill pools."""
    if not sim.prefill_pools:
        none = np.zeros((0, prompt.size))
        return PromptTables(none, none, np.full(prompt.size, np.inf))
    latency, transfer = sim._prefill_tables(prompt)
    after_prefill_s = (
        min((s for s in sim._idle_step_s if s > 0), default=0.0) + sim.config.ttft_outside_s
    )
    return PromptTables(latency, transfer, (latency + transfer).min(axis=0) + after_prefill_s)


def idle_ttft_s(sim: ServiceSim, prompt: np.ndarray) -> np.ndarray:
    """The TTFT of each prompt alone on an idle instance of the fastest allowed type and
    link (own prefill + unloaded KV transfer + one decode step at batch 1): what no
    amount of capacity can improve."""
    return prompt_tables(sim, prompt).idle_ttft_s


def slot_curves(sim: ServiceSim, tbt_slo_s: float, start: int = 0) -> SlotCurves:
    """Every decode slot's clock and slow-token curves from second ``start`` to now
    (``reconciler.sim.generations.SlotCurves``), slots of all pools in order."""
    end = max(sim.t, start + 1)
    names = ("dpsi", "tau", "gen", "to", "frac")
    # One gather of the five fields' columns (field by field, each every slot), then
    # each field's (slots, seconds) block.
    block = sim.series.data[start:end, sim._slot_field_columns(names)].T
    slots = block.shape[0] // len(names)
    columns = {name: block[i * slots : (i + 1) * slots] for i, name in enumerate(names)}
    return SlotCurves.build(columns, start, end, tbt_slo_s)


def per_request(
    sim: ServiceSim,
    arrival: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    *,
    unfinished_so_far: bool = False,
    tables: PromptTables | None = None,
    mean_gaps: bool = True,
) -> PerRequest:
    """Vectorised per-request latencies from the per-second state (module docstring).

    ``unfinished_so_far``: a request still decoding when the simulation stops is judged
    on the tokens it has generated so far (oracle-min's look at one window, whose
    future windows are sized to serve it); otherwise it counts as not completed.
    ``tables``: the requests' ``prompt_tables`` when the caller keeps them (the same
    outcomes as without). ``mean_gaps`` off (with ``unfinished_so_far``): the mean
    inter-token gaps (``tbt_values``) are not worked out and stay inf, which saves most
    of following the sequences (oracle-min's window judge reads none)."""
    slo = sim.policy.slo
    tbt_slo_s = slo.tbt_ms / 1000.0
    notes: list[str] = []
    n = arrival.size
    s = sim.series
    seconds = np.floor(arrival).astype(np.int64)
    arrived = s.col("arrived")[seconds]
    dropped_col = s.col("dropped")[seconds]
    # The share of a second's arrivals admitted. A synthetic profile's requests are a
    # sample of its process, not its binned arrivals: at a low rate most of them fall
    # in seconds where the bins had none, and such a second dropped nothing (counted
    # as dropped, a service at 0.1 requests/s kept 7% of its requests).
    served_share = np.where(arrived > 0, 1.0 - dropped_col / np.maximum(arrived, 1e-12), 1.0)

    delays = sim.cohort_delays(seconds)
    resolved = np.isfinite(delays["wait_s"]) & np.isfinite(delays["admit_wait_s"])
    base = np.where(resolved, delays["wait_s"] + delays["ggc_s"] + delays["admit_wait_s"], np.inf)
    done_second = delays["done_second"]
    base = base + sim._after_prefill_s(done_second)

    # Too long for any decode instance's KV cache (a real engine rejects these).
    kv_limit = max(
        (p.perf.kv_capacity_tokens for p in sim.decode_pools if p.perf.fits), default=0.0
    )
    too_long = prompt + output > kv_limit
    if too_long.any():
        notes.append(
            f"{int(too_long.sum() * sim.profile.sample_weight)} requests longer than the largest decode KV cache ({kv_limit:.0f} tokens)"
        )
    tables = prompt_tables(sim, prompt) if tables is None else tables
    unattainable = tables.idle_ttft_s > slo.ttft_ms / 1000.0

    ttft_ok = np.zeros(n)
    ttft_mean = np.zeros(n)
    ttft_values = []
    ttft_weights = []
    if sim.prefill_pools:
        latency, transfer = tables.latency_s, tables.transfer_s
        for p in range(len(sim.prefill_pools)):
            share = s.col(f"p{p}_share")[seconds]
            slow = s.col(f"p{p}_slowdown")[seconds]
            ttft_p = base + latency[p] + transfer[p] * slow
            ttft_ok += share * (ttft_p <= slo.ttft_ms / 1000.0)
            ttft_mean += share * np.where(np.isfinite(ttft_p), ttft_p, 0.0)
            ttft_values.append(ttft_p)
            ttft_weights.append(share * served_share)

    # Decode: a request's sequence starts on the generation it was admitted to (mixed
    # over the generations by their share of that second's admissions; in a second
    # without any, by ready instances) and follows it through merges and splits; its
    # gaps are that generation's step times, and it meets TBT when at most
    # (1 - quantile) of its tokens came slower than the SLO.
    decode_start = arrival + ttft_mean
    t_clamped = fast_clip(decode_start, 0.0, float(sim.t))
    start_second = fast_clip(np.floor(t_clamped), 0, max(sim.t - 1, 0)).astype(np.int64)
    slow_allowance = (1.0 - slo.quantile) * output + 1e-9
    n_pools = len(sim.decode_pools)
    tbt_ok = np.zeros(n)
    finished = np.zeros(n)
    tbt_values: list[np.ndarray]
    tbt_weights: list[np.ndarray]
    if not (n > 0 and n_pools > 0 and sim.t > 0):
        tbt_values = [np.full(n, np.inf) for _ in range(n_pools)]
        tbt_weights = [np.zeros(n) for _ in range(n_pools)]
    else:
        first = int(start_second.min())
        curves = slot_curves(sim, tbt_slo_s, first)
        data = sim.series.data
        used = np.array(
            [
                q * sim.slots + k
                for q, gens in enumerate(sim.decode_gens)
                for k in range(max(1, gens.used))
            ],
            dtype=np.int64,
        )
        # (slot in use, request): the admissions and ready instances of the second each
        # request's decode starts in, read in one gather.
        fields = sim._slot_field_columns(("admitted", "ready")).reshape(2, -1)[:, used]
        block = data[start_second[:, None], fields.ravel()].T
        admitted, ready = block[: used.size], block[used.size :]
        total = np.zeros(n)
        ready_total = np.zeros(n)
        for admitted_g, ready_g in zip(admitted, ready, strict=True):  # slot by slot, in order
            total += admitted_g
            ready_total += ready_g
        weight = np.where(
            total > 0,
            admitted / np.maximum(total, 1e-12),
            ready / np.maximum(ready_total, 1e-12),
        )
        # The branches slot by slot, each slot's requests in order.
        slot_index, request_index = (weight > 0).nonzero()
        pool_of_slot = np.arange(n_pools * sim.slots) // sim.slots
        chased = chase(
            curves,
            request_index,
            used[slot_index],
            weight[slot_index, request_index],
            t_clamped,
            output,
            slow_allowance,
            n,
            pool_of_slot,
            n_pools,
            so_far_only=unfinished_so_far and not mean_gaps,
        )
        if unfinished_so_far:
            tbt_ok = chased.within_so_far
            # The pools' weights added in order (np.sum over axis 0, without stacking).
            weight_total = chased.pool_weight[0]
            for pool_weight in chased.pool_weight[1:]:
                weight_total = weight_total + pool_weight
            finished = np.minimum(weight_total, 1.0)
        else:
            tbt_ok = chased.within_finished
            finished = chased.finished
        tbt_values = chased.pool_gap
        tbt_weights = [w * served_share for w in chased.pool_weight]

    complete = served_share * np.minimum(finished, 1.0) * resolved * ~too_long
    # Prefill and decode pools are chosen independently, so P(both) = P(TTFT) P(TBT)
    # for each request; the product is per request, never of the two rates.
    both = np.where(complete > 0, ttft_ok * tbt_ok * complete, 0.0)
    return PerRequest(
        arrival_s=arrival,
        ttft_ok=ttft_ok * complete,
        tbt_ok=tbt_ok * complete,
        both_ok=both,
        complete=complete,
        unattainable=unattainable,
        ttft_values=ttft_values,
        ttft_weights=ttft_weights,
        tbt_values=tbt_values,
        tbt_weights=tbt_weights,
        notes=tuple(notes),
    )


def token_gap_quantile_s(
    sim: ServiceSim, quantile: float, start: int = 0, stop: int | None = None
) -> float | None:
    """The ``quantile`` of the inter-token gap over every token generated in
    [start, stop), all decode pools together (weighted by tokens)."""
    return token_gap_quantiles_s(sim, quantile, start, (sim.t if stop is None else stop,))[0]


def token_gap_quantiles_s(
    sim: ServiceSim, quantile: float, start: int, stops: Sequence[int]
) -> list[float | None]:
    """``token_gap_quantile_s`` over [start, stop) for each of ``stops`` (the same
    values), reading the series once."""
    if not sim.decode_pools or not stops:
        return [None] * len(stops)
    # A pool that never had an instance generated no token (its gaps weigh nothing).
    steps = [
        sim._step_times(q, start, max(stops), flat=False)
        for q, gens in enumerate(sim.decode_gens)
        if gens.used
    ]
    if not steps:  # no token at all
        return [None] * len(stops)
    # Stops that cover the same seconds (oracle-min asks for the window's and the
    # trial's, often one) share one quantile.
    by_seconds: dict[int, float | None] = {}
    for stop in stops:
        seconds = max(0, min(stop, sim.series.rows) - start)
        if seconds not in by_seconds:
            values = np.concatenate([tau[:, :seconds].ravel() for tau, _tokens in steps])
            weights = np.concatenate([tokens[:, :seconds].ravel() for _tau, tokens in steps])
            by_seconds[seconds] = weighted_quantile(values, weights, quantile)
    return [by_seconds[max(0, min(stop, sim.series.rows) - start)] for stop in stops]


def judged_requests(sim: ServiceSim) -> np.ndarray:
    """Which of the profile's sampled requests a run is judged on: those that arrived
    after any warm-up (``LoadProfile.judged_from_s``) and before the run ended."""
    sample = sim.profile.sample
    if sample is None:
        return np.zeros(0, dtype=bool)
    keep: np.ndarray = (sample.arrival_s >= sim.profile.judged_from_s) & (sample.arrival_s < sim.t)
    return keep


def sampled_requests_end_s(sim: ServiceSim) -> float:
    """When the judged sampled requests are done in the per-request view, at the latest
    (0 without any): each one's decode starts after its fluid prefill wait, the G/G/c
    wait the fluid does not hold, its admission wait and its own prefill on the fastest
    pool, and takes its output at the TBT SLO's step (a request slower than that
    misses TBT whether it finishes or not). Under a saturated prefill the G/G/c wait is
    tens of seconds, so the fluid counters drain before this: a run stopped at their
    drain judged the last requests as never completed. Unresolved requests (never
    served) are left out."""
    sample = sim.profile.sample
    keep = judged_requests(sim)
    if sample is None or not keep.any():
        return 0.0
    arrival = sample.arrival_s[keep]
    delays = sim.cohort_delays(np.floor(arrival).astype(np.int64))
    waits = delays["wait_s"] + delays["ggc_s"] + delays["admit_wait_s"]
    idle_ttft = prompt_tables(sim, sample.prompt_tokens[keep].astype(np.float64)).idle_ttft_s
    step_s = max(sim.policy.slo.tbt_ms / 1000.0, max(sim._idle_step_s, default=0.0))
    ends = arrival + waits + idle_ttft + sample.output_tokens[keep] * step_s
    finite = ends[np.isfinite(ends)]
    return float(finite.max()) if finite.size else 0.0


def serve_in_flight(sim: ServiceSim, until_s: float, advance: Callable[[], None]) -> None:
    """Keep serving (the fleet as it is; ``advance`` moves the run on) until nothing is
    in flight and the sampled requests are done (``sampled_requests_end_s``), or
    ``until_s``: the tail every judged run ends with, so that its figures count the
    requests it served as completed."""
    while sim.t < until_s and sim.in_flight > 1e-6:
        advance()
    end_s = min(until_s, sampled_requests_end_s(sim))
    while sim.t < end_s:
        advance()


def request_outcomes(sim: ServiceSim) -> RequestOutcomes:
    """Per-request attainment over the profile's request sample (``per_request``), the
    requests ``judged_requests`` keeps."""
    profile = sim.profile
    sample = profile.sample
    slo = sim.policy.slo
    if sample is None or sample.requests == 0 or sim.t == 0:
        return RequestOutcomes(
            0.0, 0.0, 0.0, 0.0, 0.0, None, None, None, None, 0.0, notes=("no requests",)
        )
    keep = judged_requests(sim)
    if not keep.any():
        return RequestOutcomes(
            0.0, 0.0, 0.0, 0.0, 0.0, None, None, None, None, 0.0, notes=("no requests",)
        )
    weight = profile.sample_weight
    arrival = sample.arrival_s[keep]
    r = per_request(
        sim,
        arrival,
        sample.prompt_tokens[keep].astype(np.float64),
        sample.output_tokens[keep].astype(np.float64),
    )
    n = arrival.size
    notes = list(r.notes)

    def quantiles(
        values: list[np.ndarray], weights: list[np.ndarray]
    ) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        v = np.concatenate(values)
        w = np.concatenate(weights) * np.tile(r.complete > 0, len(values))
        finite = np.isfinite(v)
        v, w = v[finite], w[finite]
        p50 = weighted_quantile(v, w, 0.5)
        pq = weighted_quantile(v, w, slo.quantile)
        return (p50 * 1000 if p50 is not None else None), (pq * 1000 if pq is not None else None)

    ttft_p50, ttft_q = quantiles(r.ttft_values, r.ttft_weights)
    tbt_p50, tbt_q = quantiles(r.tbt_values, r.tbt_weights)
    token_q = token_gap_quantile_s(sim, slo.quantile, start=profile.judged_from_s)
    if r.complete.sum() == 0:
        notes.append(
            "no request completed: the fleet is too small (or has no ready prefill or decode instance)"
        )
    unattainable_share = float(r.unattainable.mean())
    if unattainable_share * n >= 1.0:  # at least one sampled request
        notes.append(
            f"{small_percent(unattainable_share)} of requests cannot meet the {slo.ttft_ms:g} ms TTFT "
            "even on an idle instance (counted as misses)"
        )
    return RequestOutcomes(
        requests=n * weight,
        dropped=float(n - r.complete.sum()) * weight,
        ttft_attainment=float(r.ttft_ok.mean()),
        tbt_attainment=float(r.tbt_ok.mean()),
        slo_attainment=float(r.both_ok.mean()),
        ttft_p50_ms=ttft_p50,
        ttft_quantile_ms=ttft_q,
        tbt_p50_ms=tbt_p50,
        tbt_quantile_ms=tbt_q,
        completed_fraction=float(r.complete.mean()),
        tbt_token_quantile_ms=token_q * 1000.0 if token_q is not None else None,
        unattainable_share=unattainable_share,
        notes=tuple(notes),
    )
