"""Side-by-side evaluation of autoscaling policies on one trace in the simulated fleet.

:func:`evaluate` is pure (no I/O): it takes a desired state, a service, a workload and
policy names, and returns an :class:`EvaluationResult` with every figure the
``heteroscale simulate`` table, JSON and plot show. The pull-request what-if reuses it.

Each policy runs the production cycle against its own :class:`SimulatedFleet`, every
``interval_s`` seconds (the reconcile interval): metrics -> ``Autoscaler.decide`` ->
placement (only when the decision changes a count) -> ``diff_groups`` -> ``apply``.
Policies:

- ``heteroscale``: the coordinated decode-TPS policy (``reconciler.policy``);
- ``hpa-gpu-util``: one Kubernetes HPA per role on GPU utilisation;
- ``static-peak``: fixed counts for the trace's peak demand (highest 60-second average
  of prompt and output tokens/s) at the per-instance capacity below, as the policy lets
  a pair run (min/max, the ``pd_ratio`` bounds, whole groups: ``oracle.bounded_pair``),
  which the autoscalers it is compared with are held to;
- ``static-past-peak``: static peak sized on the load's warm-up instead
  (``LoadProfile.preceded_by``, ``--warm-up-hours``): the counts a team provisioning
  from the service's past would hold, with no hindsight of the traffic judged. Static
  peak knows the judged part's own peak, which no policy that reacts can; this is the
  static fleet with the information a reactive policy has. Needs a warm-up;
- ``static:P+D``: a fixed fleet of ``P`` prefill and ``D`` decode instances (static
  provisioning at a size of one's choosing, e.g. the GPU-hours another policy spent);
- ``oracle-min``: the lower bound (``reconciler.sim.oracle``): with the whole workload
  known, per window the fewest instances of each role with which the simulator's own
  model meets the SLO goal, held to the policy's bounds as static peak is; every
  policy's GPU-hours are also given as a multiple of
  its GPU-hours (``oracle_min_multiple``), the project's efficiency figure;
- ``schedule:PATH``: replays a CSV ``t_s,service,prefill,decode`` (counts hold from
  their ``t_s`` until the next row), so any external autoscaler can be scored; a file
  naming one other service is replayed for this one (with a note). Shown as
  ``schedule:FILENAME``. Read as a regular file of at most ``MAX_SCHEDULE_BYTES`` of
  UTF-8; a malformed row, or a service name holding a control or invisible character,
  is an ``EvaluationError`` naming its line;
- ``python:MODULE:CLASS``: an external autoscaler class asked every cycle
  (``reconciler.sim.plugins``). One that fails is reported as failed
  (``PolicyResult.failed``) and the other policies still run.

Per-instance capacity (static-peak): prefill tokens/s of the most
preferred GPU type at 85 % of its compute (headroom for arrival bursts inside a
minute), decode tokens/s at 70 % of the TBT SLO at the trace's mean context, both
from ``reconciler.perfmodel.instance``.

Every policy starts warm from the same state: the fleet at time 0 is what oracle-min's
search runs or has already started then (its most over the windows that begin within a
start-up: ``oracle.oracle_min_initial_counts``), searched in the policies' own
environment (their router; the bound itself routes by the current load), placed and
already serving, so no policy pays a cold start the others do not (``schedule:`` and
plugins included); per role at most static peak's count for the judged traffic
(``warm_start_counts``: on a trace where many prompts sit just under the reach of an
idle instance the bound buys near-idle instances for them, and starting every policy
there charged each for the bound's goal, held-mooncake-svc-a-x5 at both roles'
``max_instances``). Static provisioning is the one exception: its
constant counts are its own warm state. GPU-hours count every GPU an
instance holds from creation (start-up included) to the end of its drain, up to the
end of the trace; in-flight requests are then served to completion (up to
``SimConfig.drain_tail_s``) for the latency figures.

A load with a warm-up (``LoadProfile.preceded_by``) is run from the warm-up's start
(the warm state above is the warm-up's), and judged only after it: attainment on the
requests that arrive after it, GPU-hours, utilisation and the timeline over the
seconds after it. So a policy meets the judged traffic with the memory and the fleet
the warm-up left, as a service running for a while does. What needs no memory
(``needs_no_memory``: fixed counts, replayed schedules, oracle-min) runs on the judged
part alone, static peak sized for its peak.

Cost (``reconciler.cost``): ``cost_usd`` prices those GPU-hours, per GPU type, at the
cluster's ``cost_per_hour`` (in its ``currency``, USD unless the cluster file says
otherwise). ``usd_per_mtok`` divides it by the millions of output tokens served within
SLO: the output tokens of the requests that met both SLOs (TTFT and TBT, judged per
request as the attainment figures are) and were served to completion; where routing
mixes a request over pools, its tokens count with its probability of meeting both.
Both are None when a GPU type the run used has no price (``unpriced_gpu_types``
names it), and ``usd_per_mtok`` also when no token was served within SLO.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from reconciler.bounded_read import BoundedReadError, read_regular_file
from reconciler.cost import GpuPrices, cost_of_gpu_hours, per_million
from reconciler.desired.loader import DesiredState
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import PermanentError
from reconciler.placement.base import PlacementRequest, Placer
from reconciler.plan import Plan, diff_groups
from reconciler.policy.base import Autoscaler, Decision, DecisionInput, PolicyHistory
from reconciler.policy.gpu_economics import ranked_gpu_types
from reconciler.sim.engine import (
    LoadProfile,
    RequestOutcomes,
    ServiceSim,
    SimConfig,
    engine_perf,
    judged_requests,
    per_request,
    request_outcomes,
    serve_in_flight,
)
from reconciler.sim.fleet import SimulatedFleet
from reconciler.sim.oracle import (
    DEFAULT_WINDOW_S,
    OracleMinPlan,
    bounded_pair,
    inventory_excess,
    oracle_min_initial_counts,
    per_second_counts,
    plan_gpus_by_type,
    plan_oracle_min,
)
from reconciler.sim.plugins import PLUGIN_PREFIX, PluginAutoscaler, PluginError
from reconciler.sim.workload import Workload
from reconciler.state import ROLES, FleetState, ServiceFleet, ServiceMetrics, Targets
from reconciler.text_safety import cut, listed, visible

DEFAULT_POLICIES: tuple[str, ...] = (
    "heteroscale",
    "hpa-gpu-util",
    "hpa-decode-tps",
    "static-peak",
    "oracle-min",
)
PREFILL_HEADROOM = 0.85
DECODE_SLO_HEADROOM = 0.7
DEMAND_WINDOW_S = 60
# Decisions that hold the size because an input was unusable (``_run_policy`` says so
# when they are half of a run's or more).
HOLD_REASONS = ("metrics_missing", "decision_failed")


class EvaluationError(PermanentError):
    """The evaluation cannot run as asked (unknown service or policy, bad schedule).
    Its message names files and quotes values as given (a path on the command line, a
    schedule's service name): its control and invisible characters are shown escaped
    (``text_safety.visible``), so a file name cannot rewrite the terminal."""

    def __init__(self, message: str) -> None:
        super().__init__(visible(message))


# --------------------------------------------------------------------------- schedule policy


# More instances of one role than any fleet holds: a schedule or static fleet asking
# for more is wrong (and a count past 2**63 does not fit the replay's arrays).
MAX_REPLAYED_INSTANCES = 1_000_000


# The most text a schedule file may hold: a row every 30 s for a week is ~20,000 rows
# of ~25 bytes a service, so 32 MiB holds some 60 services' weeks (its rows are held as
# Python tuples while read, ~150 bytes each).
MAX_SCHEDULE_BYTES = 32 * 1024 * 1024
# The most names (services, header cells) an error lists, each cut to _LISTED_CHARS.
_LISTED_NAMES = 8
_LISTED_CHARS = 60


def _listed(names: Sequence[str]) -> str:
    """Names from a file as an error lists them: the first few, each cut."""
    return listed(names, lambda name: cut(name, _LISTED_CHARS), _LISTED_NAMES)


def _schedule_text(path: Path) -> str:
    """A schedule file's text: a regular file of at most :data:`MAX_SCHEDULE_BYTES`
    of UTF-8 (a FIFO is not waited on, a device not read for ever)."""
    try:
        raw = read_regular_file(path, MAX_SCHEDULE_BYTES)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: schedule file not found") from None
    except BoundedReadError as exc:
        raise EvaluationError(f"{path}: schedule file {exc.reason}") from None
    except OSError as exc:
        raise EvaluationError(f"{path}: schedule file cannot be read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvaluationError(
            f"{path}: schedule file is not UTF-8 text (byte {exc.start})"
        ) from None


class ScheduleAutoscaler:
    """Replays instance counts from a CSV ``t_s,service,prefill,decode``."""

    name = "schedule"

    def __init__(
        self,
        path: str,
        rows: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
        notes: Sequence[str] = (),
    ):
        self.path = path
        self.rows = dict(rows)  # service -> (t_s, prefill, decode), sorted by t_s
        self.notes = tuple(notes)

    @classmethod
    def from_csv(cls, path: str | Path) -> ScheduleAutoscaler:
        path = Path(path)
        text = _schedule_text(path)
        per_service: dict[str, list[tuple[float, int, int]]] = {}
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if header is None or [h.strip() for h in header] != [
                "t_s",
                "service",
                "prefill",
                "decode",
            ]:
                shown = "nothing" if header is None else _listed([repr(h) for h in header])
                raise EvaluationError(
                    f"{path}:1: header must be 't_s,service,prefill,decode' (got {shown})"
                )
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != 4:
                    raise EvaluationError(f"{path}:{line}: expected 4 fields, found {len(row)}")
                try:
                    t_s, prefill, decode = float(row[0]), int(row[2]), int(row[3])
                except ValueError:
                    raise EvaluationError(
                        f"{path}:{line}: t_s must be a number, prefill and decode integers"
                    ) from None
                if not (
                    0 <= prefill <= MAX_REPLAYED_INSTANCES
                    and 0 <= decode <= MAX_REPLAYED_INSTANCES
                    and math.isfinite(t_s)
                ):
                    raise EvaluationError(
                        f"{path}:{line}: counts must be 0 to {MAX_REPLAYED_INSTANCES:,} "
                        "and t_s must be finite"
                    )
                service = row[1].strip()
                if visible(service) != service:  # notes and errors quote it
                    raise EvaluationError(
                        f"{path}:{line}: service name '{visible(cut(service, _LISTED_CHARS))}' "
                        "holds a control or invisible character, which no service name does"
                    )
                per_service.setdefault(service, []).append((t_s, prefill, decode))
        except csv.Error as exc:
            raise EvaluationError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
        if not per_service:
            raise EvaluationError(f"{path}: schedule has no rows")
        rows = {}
        for service, entries in per_service.items():
            entries.sort(key=lambda e: e[0])
            rows[service] = (
                np.array([e[0] for e in entries]),
                np.array([e[1] for e in entries]),
                np.array([e[2] for e in entries]),
            )
        return cls(str(path), rows)

    def for_service(self, service: str) -> ScheduleAutoscaler:
        """This schedule for ``service``: a file that names only another service is
        taken as that service's schedule (with a note); one naming several others is
        an error."""
        if service in self.rows:
            return self
        if len(self.rows) == 1:
            ((other, rows),) = self.rows.items()
            return ScheduleAutoscaler(
                self.path,
                {service: rows},
                (
                    *self.notes,
                    f"{Path(self.path).name} names only service '{other}', not '{service}': "
                    f"its rows are replayed for '{service}'",
                ),
            )
        raise EvaluationError(
            f"{self.path}: no rows for service '{service}', and the schedule names "
            f"{len(self.rows)} other services ({_listed(sorted(self.rows))}), so none is "
            "taken in its place"
        )

    def counts_at(self, service: str, now_s: float) -> tuple[int, int]:
        if service not in self.rows:
            raise EvaluationError(
                f"{self.path}: no rows for service '{service}' (has: {_listed(sorted(self.rows))})"
            )
        t_s, prefill, decode = self.rows[service]
        index = max(0, int(np.searchsorted(t_s, now_s, side="right")) - 1)
        return int(prefill[index]), int(decode[index])

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, history, now_s = inputs.policy, inputs.history, inputs.now_s
        prefill, decode = self.counts_at(policy.name, now_s)
        return Decision(
            service=policy.name,
            prefill=prefill,
            decode=decode,
            reason="baseline",
            message=f"schedule {Path(self.path).name}: {prefill} prefill, {decode} decode at t={now_s:g} s",
            history=history,
        )


def policy_labels(names: Sequence[str]) -> dict[str, str]:
    """The name each policy is shown and keyed under: ``schedule:PATH`` as
    ``schedule:FILENAME`` (the whole spec where two file names would collide)."""
    short = {
        n: f"schedule:{Path(n.split(':', 1)[1]).name}" if n.startswith("schedule:") else n
        for n in names
    }
    taken = Counter(short.values())
    return {n: label if taken[label] == 1 else n for n, label in short.items()}


# --------------------------------------------------------------------------- capacities


@dataclass(frozen=True)
class Capacity:
    """Per-instance tokens/s of each role at SLO, on its first-ranked GPU type
    (``gpu_economics.ranked_gpu_types``)."""

    prefill_tps: float
    decode_tps: float
    prefill_gpu_type: str
    decode_gpu_type: str


def role_capacity(
    state: DesiredState,
    policy: ServicePolicy,
    profile: LoadProfile,
    config: SimConfig | None = None,
) -> Capacity:
    """Per-instance capacity of each role's first-ranked type, as the simulated
    engines deliver it (``config``'s engine speeds): what static peak is sized with,
    knowing the engines as a load test would."""
    config = config or SimConfig()
    cluster = state.clusters[policy.cluster]
    prefill_type = ranked_gpu_types(policy, cluster, "prefill")[0]
    decode_type = ranked_gpu_types(policy, cluster, "decode")[0]
    prefill = engine_perf(policy, cluster, "prefill", prefill_type, config)
    decode = engine_perf(policy, cluster, "decode", decode_type, config)
    # Attention makes long prompts dearer than their tokens: use the mix's mean work.
    mean_work = (
        2.0 * prefill.params * profile.prompt_mean
        + 2.0
        * prefill.kv_bytes_per_token
        * profile.prompt_sq_mean
        / (prefill.prefill_params["eta_attention"])
    )
    work_per_token = mean_work / profile.prompt_mean
    prefill_tps = PREFILL_HEADROOM * prefill.prefill_capacity_work_per_s / work_per_token
    mean_ctx = profile.prompt_mean + profile.output_mean / 2.0
    decode_tps = decode.decode_capacity_tps(
        DECODE_SLO_HEADROOM * policy.slo.tbt_ms / 1000.0, mean_ctx
    )
    if decode_tps <= 0:
        decode_tps = decode.decode_capacity_tps(policy.slo.tbt_ms / 1000.0, mean_ctx)
    return Capacity(max(prefill_tps, 1e-9), max(decode_tps, 1e-9), prefill_type, decode_type)


def peak_demand(profile: LoadProfile, window_s: int = DEMAND_WINDOW_S) -> tuple[float, float]:
    """The highest prompt and output tokens/s of the judged part (static peak's sizing:
    the peak of the traffic it is judged on, not of a warm-up)."""
    return _peaks(profile.judged(), window_s)


def past_peak_demand(profile: LoadProfile, window_s: int = DEMAND_WINDOW_S) -> tuple[float, float]:
    """The highest prompt and output tokens/s of the warm-up (``static-past-peak``'s
    sizing: the service's past when the judged part begins); ``EvaluationError`` when
    the load has none."""
    if not profile.judged_from_s:
        raise EvaluationError(f"{STATIC_PAST_PEAK_NEEDS_A_WARM_UP} (--warm-up-hours)")
    return _peaks(profile.warm_up(), window_s)


def counts_for_peaks(
    peak_prefill_tps: float, peak_decode_tps: float, capacity: Capacity
) -> tuple[int, int]:
    """Static provisioning's counts for peaks of prompt and output tokens/s."""
    return (
        max(1, math.ceil(peak_prefill_tps / capacity.prefill_tps)),
        max(1, math.ceil(peak_decode_tps / capacity.decode_tps)),
    )


def _peaks(profile: LoadProfile, window_s: int) -> tuple[float, float]:
    _t, prefill, decode = profile.demand_series(window_s)
    return float(prefill.max()), float(decode.max())


# --------------------------------------------------------------------------- autoscalers


STATIC_PREFIX = "static:"
STATIC_PAST_PEAK = "static-past-peak"
STATIC_PAST_PEAK_NEEDS_A_WARM_UP = (
    f"{STATIC_PAST_PEAK} sizes from the traffic before the judged part: give the load a warm-up"
)


def static_counts(name: str) -> tuple[int, int]:
    """The counts of a ``static:P+D`` policy name (``+``, not a comma: policy lists are
    comma-separated); ``EvaluationError`` naming it when they are not two whole
    numbers, 1 to ``MAX_REPLAYED_INSTANCES`` each."""
    text = name[len(STATIC_PREFIX) :]
    parts = text.split("+")
    if len(parts) == 2 and all(p.strip().isdecimal() for p in parts):
        prefill, decode = (int(p) for p in parts)
        if 1 <= prefill <= MAX_REPLAYED_INSTANCES and 1 <= decode <= MAX_REPLAYED_INSTANCES:
            return prefill, decode
    raise EvaluationError(
        f"'{name}': expected static:PREFILL+DECODE with two whole numbers from 1 to "
        f"{MAX_REPLAYED_INSTANCES:,}, e.g. static:12+16"
    )


def needs_no_memory(name: str) -> bool:
    """Fixed counts and replayed schedules: what they run at a moment does not depend
    on the traffic before it, so after a warm-up they run on the judged part alone (a
    schedule's times count from its start; static peak is sized for it)."""
    return name in ("static-peak", STATIC_PAST_PEAK) or name.startswith(
        (STATIC_PREFIX, "schedule:")
    )


def _unknown_policy(name: str, autoscalers: Iterable[str]) -> str:
    """Why ``name`` is no policy: the known ones, and the closest of them."""
    known = [*autoscalers, STATIC_PAST_PEAK, "oracle-min"]
    hint = difflib.get_close_matches(name, known, n=1)
    suffix = f"; did you mean '{hint[0]}'?" if hint else ""
    return (
        f"unknown autoscaler '{name}' (known: {', '.join(known)}, "
        f"static:P+D, schedule:PATH, {PLUGIN_PREFIX}MODULE:CLASS){suffix}"
    )


def policy_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one of :func:`evaluate`'s policies, found before any load
    is built (None when it can): an unknown name, ``static:P+D`` counts out of range, a
    ``schedule:PATH`` that cannot be read as a schedule, a ``python:`` spec that is not
    ``python:MODULE:CLASS`` (the module itself is imported when the policy runs: one
    that fails is that policy's failure, the others still run)."""
    from reconciler.policy import AUTOSCALERS

    try:
        if name.startswith(STATIC_PREFIX):
            static_counts(name)
        elif name.startswith("schedule:"):
            ScheduleAutoscaler.from_csv(name.split(":", 1)[1])
        elif name.startswith(PLUGIN_PREFIX):
            module, _, class_name = name[len(PLUGIN_PREFIX) :].rpartition(":")
            if not module or not class_name:
                return f"{name}: expected python:MODULE:CLASS, e.g. python:my_planner:Planner"
        elif name not in (*AUTOSCALERS, STATIC_PAST_PEAK, "oracle-min"):
            return _unknown_policy(name, AUTOSCALERS)
    except EvaluationError as exc:
        return str(exc)
    return None


def build_autoscaler(
    name: str,
    policy: ServicePolicy,
    profile: LoadProfile,
    capacity: Capacity,
    interval_s: float = 30.0,
    *,
    hpa_target: float | None = None,
) -> tuple[Autoscaler, str]:
    """An autoscaler by name (module docstring) and a one-line description.
    ``hpa_target`` is ``hpa-gpu-util``'s target utilisation (None: its default;
    :func:`evaluate` sweeps for one instead)."""
    if name.startswith("schedule:"):
        schedule = ScheduleAutoscaler.from_csv(name.split(":", 1)[1]).for_service(policy.name)
        return schedule, f"replays {schedule.path}"
    if name.startswith(PLUGIN_PREFIX):
        plugin = PluginAutoscaler(name, policy)
        return plugin, f"external autoscaler {plugin.class_name}, asked every cycle"
    try:
        from reconciler.policy import AUTOSCALERS, make_autoscaler
        from reconciler.policy.baselines import policy_tps_targets
    except ImportError as exc:  # pragma: no cover - the policy package ships with the product
        raise EvaluationError(f"autoscaler '{name}' needs reconciler.policy ({exc})") from exc
    if name.startswith(STATIC_PREFIX):
        prefill, decode = static_counts(name)
        return make_autoscaler("static-peak", prefill=prefill, decode=decode), (
            f"{prefill} prefill + {decode} decode, fixed"
        )
    if name in ("static-peak", STATIC_PAST_PEAK):
        past = name == STATIC_PAST_PEAK
        peak_prefill, peak_decode = past_peak_demand(profile) if past else peak_demand(profile)
        needed = counts_for_peaks(peak_prefill, peak_decode, capacity)
        # What runs: the pair as the policy lets it run, as every autoscaler's counts
        # are (min/max: a capacity near 0 asks for billions, a small peak for fewer than
        # the floor; the pd_ratio bounds and whole groups: a static deployment of the
        # same policy file is held to them as the planner is).
        prefill, decode, clamps = bounded_pair(policy, *needed)
        of = "the warm-up's " if past else ""
        bounded = (
            ""
            if (prefill, decode) == needed
            else f" (asked {needed[0]}+{needed[1]}, held to the policy: "
            f"{'; '.join(map(str, clamps))})"
        )
        return make_autoscaler("static-peak", prefill=prefill, decode=decode), (
            f"{prefill} prefill + {decode} decode for {of}peaks of {peak_prefill:.0f} "
            f"prompt and {peak_decode:.0f} output tokens/s{bounded}"
        )
    if name == "oracle-min":
        raise EvaluationError(
            "oracle-min is not an autoscaler: evaluate() computes it from the whole workload"
        )
    if name == "hpa-gpu-util" and hpa_target is not None:
        return make_autoscaler(name, target_utilisation=hpa_target), (
            f"target utilisation {hpa_target:g} (given)"
        )
    if name == "hpa-decode-tps":
        # The policy's own tokens/s targets where it sets them, else the capacity at SLO.
        own_prefill, own_decode = policy_tps_targets(policy)
        prefill_target = own_prefill if own_prefill is not None else capacity.prefill_tps
        decode_target = own_decode if own_decode is not None else capacity.decode_tps
        prefill_from = "policy" if own_prefill is not None else "capacity"
        decode_from = "policy" if own_decode is not None else "capacity"
        return make_autoscaler(
            name,
            prefill_tps_per_instance=prefill_target,
            decode_tps_per_instance=decode_target,
        ), (
            f"targets {prefill_target:.0f} prompt tokens/s per prefill instance ({prefill_from}), "
            f"{decode_target:.0f} output tokens/s per decode instance ({decode_from})"
        )
    if name not in AUTOSCALERS:
        raise EvaluationError(_unknown_policy(name, AUTOSCALERS))
    try:
        return make_autoscaler(name), ""
    except PermanentError as exc:
        raise EvaluationError(str(exc)) from exc


def initial_counts(
    autoscaler: Autoscaler,
    state: DesiredState,
    policy: ServicePolicy,
    profile: LoadProfile,
    config: SimConfig,
) -> tuple[int, int]:
    """Warm start (module docstring): oracle-min's counts at t = 0, for
    every policy but static provisioning, whose constant counts are its warm state."""
    if getattr(autoscaler, "name", "") == "static-peak":
        decision = autoscaler.decide(
            DecisionInput(
                policy, ServiceFleet(policy.name), ServiceMetrics(policy.name), PolicyHistory(), 0.0
            )
        )
        return decision.prefill, decision.decode
    capacity = role_capacity(state, policy, profile, config)
    return warm_start_counts(policy, state.clusters[policy.cluster], profile, config, capacity)


def with_attainment_goal(policy: ServicePolicy, goal: float) -> ServicePolicy:
    """``policy`` with another ``slo.attainment_goal`` (oracle-min's what-if bound).

    The bound sizes its windows one after another, each from the backlog the last one
    left, so a lower goal need not cost less (a window sized for fewer passes more
    backlog to the next): chat's first burst hour (bench_matrix's ``burst-chat-1``)
    costs 201.0 GPU-hours at 95%, 200.9 at 99% and 201.1 at 99.5%."""
    if not 0.0 < goal <= 1.0:  # NaN fails too
        raise EvaluationError(f"an attainment goal must lie in (0, 1], got {goal}")
    return policy.model_copy(
        update={"slo": policy.slo.model_copy(update={"attainment_goal": goal})}
    )


def warm_start_counts(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    profile: LoadProfile,
    config: SimConfig,
    capacity: Capacity,
    window_s: int = DEFAULT_WINDOW_S,
) -> tuple[int, int]:
    """The fleet every simulated policy starts from (module docstring): oracle-min's at
    t = 0, per role at most what static provisioning holds for the judged traffic's peak.

    Why the cap: the bound's goal is 99.5% of the attainable requests in every window, and
    where many prompts sit just under the reach of an idle instance it meets that with
    near-idle instances (the Mooncake trace on svc-a: 238 prefill and 506 decode at its
    peak, 128 and 256 from its first minute, where static peak runs 21 and 9). A warm
    state is the fleet a running service would have; one larger than the fleet sized for
    the whole day's peak is the bound's, and starting every policy in it charged each of
    them for it until its first scale-in."""
    oracle_prefill, oracle_decode = oracle_min_initial_counts(
        policy, cluster, profile, config, window_s
    )
    static_prefill, static_decode = counts_for_peaks(*peak_demand(profile), capacity)
    return min(oracle_prefill, static_prefill), min(oracle_decode, static_decode)


def default_placer(kind: str = "greedy") -> Placer:
    """The greedy (paper) placer, or CP-SAT (``cp-sat``, the command line's spelling)."""
    if kind == "cp-sat":
        from reconciler.placement.cpsat import CpSatPlacer

        return CpSatPlacer()
    from reconciler.placement.greedy import GreedyPlacer

    return GreedyPlacer()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PolicyResult:
    """The figures of one policy's run (see ``to_json`` for units)."""

    name: str
    description: str
    gpu_hours: float
    gpu_hours_prefill: float
    gpu_hours_decode: float
    mean_gpu_util_prefill: float
    mean_gpu_util_decode: float
    mean_sm_active_prefill: float
    mean_sm_active_decode: float
    ttft_attainment: float
    tbt_attainment: float
    slo_attainment: float
    ttft_quantile_ms: float | None
    tbt_quantile_ms: float | None
    requests: float
    dropped: float
    scaling_actions: int
    instance_changes: int
    pd_ratio_min: float | None
    pd_ratio_max: float | None
    peak_prefill_instances: int
    peak_decode_instances: int
    placement_shortfalls: int
    timeline: Mapping[str, np.ndarray] = field(repr=False)
    notes: tuple[str, ...] = ()
    failed: str | None = None  # why the policy could not run (then no figure is meaningful)
    unattainable_share: float = 0.0  # requests missing TTFT even on an idle instance
    tbt_token_quantile_ms: float | None = None  # SLO quantile over every token's gap
    oracle_min_multiple: float | None = None  # GPU-hours / oracle-min's GPU-hours
    # Cost (module docstring), in ``currency``; None when a type used has no price.
    gpu_hours_by_type: Mapping[str, float] = field(default_factory=dict)
    currency: str = "USD"
    cost_usd: float | None = None
    unpriced_gpu_types: tuple[str, ...] = ()
    output_tokens_within_slo: float = 0.0
    usd_per_mtok: float | None = None  # cost per million output tokens served within SLO
    # The (prefill, decode) instances the run started from: the shared warm start, or
    # static provisioning's own counts (module docstring). None for oracle-min, whose
    # plan is its own from the first window.
    start_instances: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        if self.failed is not None:
            return {
                "description": self.description,
                "failed": self.failed,
                "notes": list(self.notes),
            }
        out: dict[str, Any] = {
            "description": self.description,
            "failed": None,
            "gpu_hours": round(self.gpu_hours, 3),
            "gpu_hours_prefill": round(self.gpu_hours_prefill, 3),
            "gpu_hours_decode": round(self.gpu_hours_decode, 3),
            "gpu_hours_by_type": {t: round(h, 3) for t, h in self.gpu_hours_by_type.items()},
            "currency": self.currency,
            "cost_usd": _round_or_none(self.cost_usd),
            "usd_per_mtok": _round_or_none(self.usd_per_mtok, 4),
            "unpriced_gpu_types": list(self.unpriced_gpu_types),
            "output_tokens_within_slo": round(self.output_tokens_within_slo),
            "mean_gpu_util": {
                "prefill": round(self.mean_gpu_util_prefill, 4),
                "decode": round(self.mean_gpu_util_decode, 4),
            },
            "mean_sm_active": {
                "prefill": round(self.mean_sm_active_prefill, 4),
                "decode": round(self.mean_sm_active_decode, 4),
            },
            "ttft_attainment": round(self.ttft_attainment, 5),
            "tbt_attainment": round(self.tbt_attainment, 5),
            "slo_attainment": round(self.slo_attainment, 5),
            "gpu_hours_vs_oracle_min": _round_or_none(self.oracle_min_multiple, 4),
            "unattainable_share": round(self.unattainable_share, 5),
            "tbt_token_quantile_ms": _round_or_none(self.tbt_token_quantile_ms),
            "ttft_quantile_ms": _round_or_none(self.ttft_quantile_ms),
            "tbt_quantile_ms": _round_or_none(self.tbt_quantile_ms),
            "requests": round(self.requests),
            "dropped": round(self.dropped, 1),
            "scaling_actions": self.scaling_actions,
            "instance_changes": self.instance_changes,
            "pd_ratio": {
                "min": _round_or_none(self.pd_ratio_min, 4),
                "max": _round_or_none(self.pd_ratio_max, 4),
            },
            "peak_instances": {
                "prefill": self.peak_prefill_instances,
                "decode": self.peak_decode_instances,
            },
            "start_instances": None
            if self.start_instances is None
            else {"prefill": self.start_instances[0], "decode": self.start_instances[1]},
            "placement_shortfalls": self.placement_shortfalls,
            "notes": list(self.notes),
            "timeline": {
                k: [_round_or_none(float(x), 3) for x in v] for k, v in self.timeline.items()
            },
        }
        return out


def _failed_result(name: str, description: str, error: str) -> PolicyResult:
    """The result of a policy that could not run: every figure NaN or 0, no timeline."""
    nan = math.nan
    return PolicyResult(
        name=name,
        description=description,
        gpu_hours=nan,
        gpu_hours_prefill=nan,
        gpu_hours_decode=nan,
        mean_gpu_util_prefill=nan,
        mean_gpu_util_decode=nan,
        mean_sm_active_prefill=nan,
        mean_sm_active_decode=nan,
        ttft_attainment=nan,
        tbt_attainment=nan,
        slo_attainment=nan,
        ttft_quantile_ms=None,
        tbt_quantile_ms=None,
        requests=nan,
        dropped=nan,
        scaling_actions=0,
        instance_changes=0,
        pd_ratio_min=None,
        pd_ratio_max=None,
        peak_prefill_instances=0,
        peak_decode_instances=0,
        placement_shortfalls=0,
        timeline={},
        failed=error,
    )


def percent_text(share: float) -> str:
    """A share as the review's one-line comparisons print it (``0.953`` -> ``95.3%``)."""
    return f"{100 * share:.1f}%"


def compare_results(
    subject: str,
    before: PolicyResult,
    after: PolicyResult,
    goal_note: Callable[[float, float], str],
) -> str:
    """One line comparing two runs of a service: ``after``'s GPU-hours against
    ``before``'s (said of ``subject``), then each SLO's attainment with
    ``goal_note(before, after)`` appended (empty when the goal is no concern)."""
    parts: list[str] = []
    if before.gpu_hours > 0:
        change = (after.gpu_hours - before.gpu_hours) / before.gpu_hours
        if abs(change) < 0.0005:
            parts.append(f"{subject} uses the same GPU-hours ({after.gpu_hours:.1f})")
        else:
            word = "fewer" if change < 0 else "more"
            parts.append(
                f"{subject} uses {abs(100 * change):.1f}% {word} GPU-hours "
                f"({before.gpu_hours:.1f} -> {after.gpu_hours:.1f})"
            )
    for label, was, now in (
        ("TTFT", before.ttft_attainment, after.ttft_attainment),
        ("TBT", before.tbt_attainment, after.tbt_attainment),
    ):
        parts.append(
            f"{label} attainment {percent_text(was)} -> {percent_text(now)}{goal_note(was, now)}"
        )
    return "; ".join(parts)


def _round_or_none(value: float | None, digits: int = 2) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def slo_summary(policy: ServicePolicy) -> dict[str, float]:
    """The service's SLO as an evaluation reports it (``EvaluationResult.slo``)."""
    return {
        "ttft_ms": policy.slo.ttft_ms,
        "tbt_ms": policy.slo.tbt_ms,
        "quantile": policy.slo.quantile,
    }


@dataclass(frozen=True)
class EvaluationResult:
    service: str
    workload: str
    horizon_s: int
    requests: float
    slo: Mapping[str, float]
    policies: Mapping[str, PolicyResult]
    notes: tuple[str, ...] = ()
    currency: str = "USD"  # of every policy's cost figures

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "workload": self.workload,
            "horizon_s": self.horizon_s,
            "requests": round(self.requests),
            "slo": dict(self.slo),
            "currency": self.currency,
            "notes": list(self.notes),
            "policies": {name: result.to_json() for name, result in self.policies.items()},
        }


# --------------------------------------------------------------------------- evaluation

Progress = Callable[[str, float], None]


def evaluate(
    state: DesiredState,
    service: str,
    workload: Workload | LoadProfile,
    policies: Sequence[str] = DEFAULT_POLICIES,
    seed: int = 0,
    *,
    interval_s: float = 30.0,
    config: SimConfig | None = None,
    placer: Placer | None = None,
    progress: Progress | None = None,
    hpa_target: float | None = None,
    oracle_window_s: int = DEFAULT_WINDOW_S,
    oracle_goal: float | None = None,
) -> EvaluationResult:
    """Run each policy on the same load in its own simulated fleet (module docstring).
    ``hpa_target``: ``hpa-gpu-util``'s target utilisation; None sweeps for the
    cheapest one reaching the SLO goal (``reconciler.sim.sweep``). ``oracle_goal``:
    the share of each window's attainable requests oracle-min sizes for, in (0, 1]
    (None: the policy's ``slo.attainment_goal``); only the bound reads it, the shared
    warm start stays the policy's own."""
    if service not in state.policies:
        raise EvaluationError(
            f"unknown service '{service}' (known: {', '.join(sorted(state.policies))})"
        )
    if not policies:
        raise EvaluationError("no policies to evaluate")
    config = config or SimConfig()
    policy = state.policies[service]
    if policy.cluster not in state.clusters:
        raise EvaluationError(
            f"service '{service}' runs in cluster '{policy.cluster}', which is not defined"
        )
    profile = (
        workload
        if isinstance(workload, LoadProfile)
        else LoadProfile.from_workload(
            workload,
            length_classes=config.length_classes,
            sample_limit=config.request_sample_limit,
            seed=seed,
        )
    )
    # What only the simulated policies need (oracle-min has its own plan): the
    # placement model (made at the first of them: importing it takes a third of a
    # second) and the warm state.
    simulated = any(name != "oracle-min" for name in policies)
    capacity = role_capacity(state, policy, profile, config)
    results: dict[str, PolicyResult] = {}
    notes = list(profile.notes)
    if config.engines_note is not None:
        notes.append(config.engines_note)
    labels = policy_labels(policies)
    cluster = state.clusters[policy.cluster]
    judged = profile.judged()  # the profile itself when it has no warm-up
    oracle_plan: OracleMinPlan | None = None
    bound_policy = policy if oracle_goal is None else with_attainment_goal(policy, oracle_goal)
    if "oracle-min" in policies:
        # Knowing the whole workload, oracle-min needs no warm-up: it plans the judged
        # part alone.
        oracle_plan = plan_oracle_min(
            bound_policy, cluster, judged, config, window_s=oracle_window_s
        )
    # Every policy starts from oracle-min's state at t = 0 in the policies' own
    # environment, at most static peak's fleet (module docstring).
    warm = (
        warm_start_counts(policy, cluster, profile, config, capacity, oracle_window_s)
        if simulated
        else (0, 0)
    )
    judged_warm: tuple[int, int] | None = None  # the warm state of ``judged``, when asked
    for name in policies:
        if name == "oracle-min" and oracle_plan is not None:
            results[name] = oracle_min_result(
                bound_policy, judged, oracle_plan, config, prices=GpuPrices.of_cluster(cluster)
            )
            continue
        placer = placer or default_placer()
        if name == "hpa-gpu-util" and hpa_target is None:
            from reconciler.sim.sweep import choose_hpa_target  # sweep imports this module

            sweep = choose_hpa_target(
                state,
                service,
                profile,
                config=config,
                placer=placer,
                interval_s=interval_s,
                progress=progress,
                warm=warm,
            )
            results[name] = sweep.result
            continue
        label = labels[name]
        run_profile, run_warm = profile, warm
        if profile.judged_from_s and needs_no_memory(name):
            if judged_warm is None:
                judged_warm = warm_start_counts(
                    policy, cluster, judged, config, capacity, oracle_window_s
                )
            run_profile, run_warm = judged, judged_warm
        # An external autoscaler's failure is its own result; the others still run.
        # Sized on the whole load: static peak reads its judged part, static-past-peak
        # its warm-up.
        try:
            autoscaler, description = build_autoscaler(
                name, policy, profile, capacity, interval_s, hpa_target=hpa_target
            )
            run = _run_policy(
                state,
                policy,
                run_profile,
                label,
                autoscaler,
                description,
                capacity,
                config,
                placer,
                interval_s,
                progress,
                warm=run_warm,
            )
        except PluginError as exc:
            results[label] = _failed_result(label, f"external autoscaler {name}", str(exc))
            continue
        own_notes = tuple(getattr(autoscaler, "notes", ()))
        results[label] = replace(run, notes=(*own_notes, *run.notes)) if own_notes else run
    bound = results.get("oracle-min")
    if bound is not None and bound.gpu_hours > 0:
        results = {
            label: replace(r, oracle_min_multiple=r.gpu_hours / bound.gpu_hours)
            if r.failed is None
            else r
            for label, r in results.items()
        }
    return EvaluationResult(
        service=service,
        workload=profile.name,
        horizon_s=judged.horizon_s,
        requests=judged.requests,
        slo=slo_summary(policy),
        policies=results,
        notes=tuple(notes),
        currency=cluster.currency,
    )


def run_autoscaler(
    state: DesiredState,
    service: str,
    profile: LoadProfile,
    autoscaler: Autoscaler,
    *,
    name: str | None = None,
    description: str = "",
    config: SimConfig | None = None,
    placer: Placer | None = None,
    interval_s: float = 30.0,
    progress: Progress | None = None,
    warm: tuple[int, int] | None = None,
    on_fleet: Callable[[SimulatedFleet], None] | None = None,
) -> PolicyResult:
    """Run one ready-made autoscaler on ``profile`` in its own simulated fleet, exactly
    as :func:`evaluate` runs each named policy (same warm start, cycle and figures;
    ``warm`` gives the starting counts when the caller already knows them).
    For callers that build their own autoscaler, e.g. ``heteroscale tune``'s fixed
    prefill/decode splits. ``on_fleet`` receives the simulated fleet once built, for
    callers that read more of the run than the result carries (e.g. the KV links of
    ``benchmarks/bench_findings.py``)."""
    if service not in state.policies:
        raise EvaluationError(
            f"unknown service '{service}' (known: {', '.join(sorted(state.policies))})"
        )
    policy = state.policies[service]
    if policy.cluster not in state.clusters:
        raise EvaluationError(
            f"service '{service}' runs in cluster '{policy.cluster}', which is not defined"
        )
    return _run_policy(
        state,
        policy,
        profile,
        name or str(getattr(autoscaler, "name", "autoscaler")),
        autoscaler,
        description,
        role_capacity(state, policy, profile, config),
        config or SimConfig(),
        placer or default_placer(),
        interval_s,
        progress,
        warm=warm,
        on_fleet=on_fleet,
    )


def _place(
    state: DesiredState,
    policy: ServicePolicy,
    current: FleetState,
    prefill: int,
    decode: int,
    placer: Placer,
) -> tuple[Plan, int]:
    cluster = state.clusters[policy.cluster]
    targets = {policy.name: Targets(policy.name, prefill, decode)}
    request = PlacementRequest(
        cluster=cluster, policies={policy.name: policy}, current=current, targets=targets
    )
    result = placer.place(request)
    gpus = {(policy.name, role): policy.role(role).gpus_per_instance for role in ROLES}
    changes = diff_groups(current, result.groups, gpus)
    shortfall = sum(s.instances for s in result.shortfalls)
    plan = Plan(
        cluster=cluster.name, decisions={}, placement=result, changes=changes, current=current
    )
    return plan, shortfall


def _run_policy(
    state: DesiredState,
    policy: ServicePolicy,
    profile: LoadProfile,
    name: str,
    autoscaler: Autoscaler,
    description: str,
    capacity: Capacity,
    config: SimConfig,
    placer: Placer,
    interval_s: float,
    progress: Progress | None,
    warm: tuple[int, int] | None = None,
    on_fleet: Callable[[SimulatedFleet], None] | None = None,
) -> PolicyResult:
    service = policy.name
    cluster = state.clusters[policy.cluster]
    fleet = SimulatedFleet({cluster.name: cluster}, {service: policy}, {service: profile}, config)
    if on_fleet is not None:
        on_fleet(fleet)
    notes: list[str] = list(fleet.notes)
    if warm is None or getattr(autoscaler, "name", "") == "static-peak":
        warm = initial_counts(autoscaler, state, policy, profile, config)
    prefill0, decode0 = warm
    plan, shortfall = _place(
        state, policy, fleet.fleet_state(cluster.name), prefill0, decode0, placer
    )
    fleet.bootstrap(plan.groups)
    shortfalls = shortfall
    history = PolicyHistory()
    horizon = profile.horizon_s
    actions = 0
    changes = 0
    decision_times: list[float] = []
    ttft_ms: list[float] = []
    tbt_ms: list[float] = []
    holds = 0  # decisions that held the size for want of a usable input
    hold_message = ""
    # An autoscaler may run on its own sync period (the HPA syncs every 15 s); the
    # others run on the reconcile interval.
    own_interval = getattr(autoscaler, "interval_s", None)
    step = max(1.0, float(own_interval if own_interval else interval_s))
    now = 0.0
    while now < horizon:
        fleet.advance_to(now)
        metrics = fleet.fetch([policy], now)[service]
        view = fleet.fleet_state(cluster.name).service_fleet(service)
        decision = autoscaler.decide(DecisionInput(policy, view, metrics, history, now, cluster))
        history = decision.history
        if decision.reason in HOLD_REASONS:
            holds += 1
            hold_message = decision.message
        decision_times.append(now)
        ttft_ms.append(metrics.ttft.value if metrics.ttft else math.nan)
        tbt_ms.append(metrics.tbt.value if metrics.tbt else math.nan)
        if decision.changes(view):
            current = fleet.fleet_state(cluster.name)
            plan, shortfall = _place(
                state, policy, current, decision.prefill, decision.decode, placer
            )
            shortfalls += shortfall
            if plan.changes:
                fleet.apply(plan)
                actions += 1
                changes += sum(abs(c.after - c.before) for c in plan.changes)
        if progress is not None:
            progress(name, min(1.0, (now + step) / horizon))
        now += step
    fleet.advance_to(horizon)
    if decision_times and holds * 2 >= len(decision_times):
        # Said, or a policy that could not size (the paper's without a hand-set target)
        # reads as one that sized badly.
        notes.append(
            f"held its size at {holds} of {len(decision_times)} decisions, the last "
            f"because: {hold_message}"
        )
    sim = fleet.sims[service]
    counts = fleet.instance_counts(service)
    # Serve what is in flight (fleet frozen) for the latency figures.
    serve_in_flight(sim, horizon + int(config.drain_tail_s), lambda: fleet.advance_to(sim.t + 60))
    outcome = request_outcomes(sim)
    notes.extend(outcome.notes)
    if shortfalls:
        notes.append(
            f"placement could not place {shortfalls} instance-cycles (cluster full or constraints)"
        )
    timeline = _timeline(
        sim, counts, horizon, decision_times, ttft_ms, tbt_ms, start=profile.judged_from_s
    )
    return _result(
        name,
        description,
        sim,
        counts,
        horizon,
        policy,
        outcome,
        gpus_by_type=fleet.gpus_by_type(service),
        prices=GpuPrices.of_cluster(cluster),
        actions=actions,
        changes=changes,
        shortfalls=shortfalls,
        timeline=timeline,
        notes=notes,
        start_instances=(prefill0, decode0),
    )


def _result(
    name: str,
    description: str,
    sim: ServiceSim,
    counts: Mapping[str, np.ndarray],
    horizon: int,
    policy: ServicePolicy,
    outcome: RequestOutcomes,
    *,
    gpus_by_type: Mapping[str, np.ndarray],
    prices: GpuPrices,
    actions: int,
    changes: int,
    shortfalls: int,
    timeline: Mapping[str, np.ndarray],
    notes: Sequence[str],
    start_instances: tuple[int, int] | None = None,
) -> PolicyResult:
    """A run's figures from its simulator and its per-second instance counts (and GPUs
    per type, ``gpus_by_type``): the one accounting every policy and oracle-min share,
    over the judged seconds (from the profile's ``judged_from_s`` to ``horizon``);
    ``start_instances``: the fleet the run started from, where it had one."""
    judged = slice(sim.profile.judged_from_s, horizon)
    usage = _usage(sim, counts, judged, policy)
    gpu_hours_by_type = {
        gpu_type: float(gpus[judged].sum()) / 3600.0
        for gpu_type, gpus in sorted(gpus_by_type.items())
        if gpus[judged].any()
    }
    cost = cost_of_gpu_hours(gpu_hours_by_type, prices)
    tokens_within_slo = _output_tokens_within_slo(sim)
    if cost.amount is None:
        why = f"cost unknown: {cost.why_unknown()} (cost_per_hour in the cluster file)"
        notes = [*notes, why]
    active_prefill = counts["prefill_ready"][judged] + counts["prefill_starting"][judged]
    active_decode = counts["decode_ready"][judged] + counts["decode_starting"][judged]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(active_decode > 0, active_prefill / np.maximum(active_decode, 1), np.nan)
    finite_ratio = ratio[np.isfinite(ratio)]
    return PolicyResult(
        name=name,
        description=description,
        gpu_hours=usage["gpu_hours_prefill"] + usage["gpu_hours_decode"],
        gpu_hours_prefill=usage["gpu_hours_prefill"],
        gpu_hours_decode=usage["gpu_hours_decode"],
        mean_gpu_util_prefill=usage["util_prefill"],
        mean_gpu_util_decode=usage["util_decode"],
        mean_sm_active_prefill=usage["sm_prefill"],
        mean_sm_active_decode=usage["sm_decode"],
        ttft_attainment=outcome.ttft_attainment,
        tbt_attainment=outcome.tbt_attainment,
        slo_attainment=outcome.slo_attainment,
        ttft_quantile_ms=outcome.ttft_quantile_ms,
        tbt_quantile_ms=outcome.tbt_quantile_ms,
        requests=outcome.requests,
        dropped=outcome.dropped,
        scaling_actions=actions,
        instance_changes=changes,
        pd_ratio_min=float(finite_ratio.min()) if finite_ratio.size else None,
        pd_ratio_max=float(finite_ratio.max()) if finite_ratio.size else None,
        peak_prefill_instances=int(active_prefill.max()) if active_prefill.size else 0,
        peak_decode_instances=int(active_decode.max()) if active_decode.size else 0,
        placement_shortfalls=shortfalls,
        timeline=timeline,
        notes=tuple(notes),
        unattainable_share=outcome.unattainable_share,
        tbt_token_quantile_ms=outcome.tbt_token_quantile_ms,
        gpu_hours_by_type=gpu_hours_by_type,
        currency=cost.currency,
        cost_usd=cost.amount,
        unpriced_gpu_types=cost.unpriced_types,
        output_tokens_within_slo=tokens_within_slo,
        usd_per_mtok=per_million(cost.amount, tokens_within_slo),
        start_instances=start_instances,
    )


def _output_tokens_within_slo(sim: ServiceSim) -> float:
    """Output tokens of the requests that met both SLOs (module docstring), over the
    requests ``request_outcomes`` judges (``judged_requests``), scaled by its weight."""
    sample = sim.profile.sample
    if sample is None or sample.requests == 0 or sim.t == 0:
        return 0.0
    keep = judged_requests(sim)
    if not keep.any():
        return 0.0
    output = sample.output_tokens[keep].astype(np.float64)
    judged = per_request(
        sim, sample.arrival_s[keep], sample.prompt_tokens[keep].astype(np.float64), output
    )
    return float(judged.both_ok @ output) * sim.profile.sample_weight


def oracle_min_result(
    policy: ServicePolicy,
    profile: LoadProfile,
    plan: OracleMinPlan,
    config: SimConfig,
    *,
    prices: GpuPrices,
) -> PolicyResult:
    """oracle-min's figures, from the simulator run that follows its plan (the same
    outcome and GPU-hour accounting as every policy)."""
    sim = plan.sim
    horizon = profile.horizon_s
    # In-flight requests finish on the last window's counts.
    serve_in_flight(sim, horizon + int(config.drain_tail_s), sim.step)
    outcome = request_outcomes(sim)
    counts = per_second_counts(plan, policy, horizon)
    prefill = np.array([w.prefill for w in plan.windows])
    decode = np.array([w.decode for w in plan.windows])
    steps = np.abs(np.diff(prefill)) + np.abs(np.diff(decode))
    unmet = sum(not w.met for w in plan.windows)
    notes = list(outcome.notes)
    if unmet:
        notes.append(
            f"{unmet} of {len(plan.windows)} windows cannot meet the goal even at max_instances"
        )
    gpus_by_type = plan_gpus_by_type(plan, counts)
    notes += [e.note() for e in inventory_excess(gpus_by_type, sim.cluster.gpus_by_type)]
    starts = [float(w.start_s) for w in plan.windows]
    no_signal = [math.nan] * len(plan.windows)
    return _result(
        "oracle-min",
        f"fewest {plan.prefill_gpu_type} prefill and {plan.decode_gpu_type} decode instances "
        f"meeting {100 * policy.slo.attainment_goal:g}% of each {plan.window_s} s window's "
        f"attainable requests, workload known ({plan.trials} trial windows)",
        sim,
        counts,
        horizon,
        policy,
        outcome,
        gpus_by_type=gpus_by_type,
        prices=prices,
        actions=int((steps > 0).sum()),
        changes=int(steps.sum()),
        shortfalls=0,
        timeline=_timeline(sim, counts, horizon, starts, no_signal, no_signal),
        notes=notes,
    )


def _usage(
    sim: ServiceSim, counts: Mapping[str, np.ndarray], judged: slice, policy: ServicePolicy
) -> dict[str, float]:
    """GPU-hours and GPU-hour-weighted mean utilisation per role over the judged
    seconds."""
    util = sim.utilisation_series(judged.start, judged.stop)
    prefill_gpus = counts["prefill_gpus"][judged]
    decode_gpus = counts["decode_gpus"][judged]
    prefill_instances = np.maximum(prefill_gpus / policy.prefill.gpus_per_instance, 1e-12)
    decode_instances = np.maximum(decode_gpus / policy.decode.gpus_per_instance, 1e-12)
    # Utilisation summed over instances, divided by every allocated instance
    # (starting ones read 0 %), weighted by GPUs over time.
    prefill_util = util["prefill_util_sum"] / prefill_instances
    prefill_sm = util["prefill_sm_sum"] / prefill_instances
    decode_util = util["decode_util_sum"] / decode_instances
    decode_sm = util["decode_sm_sum"] / decode_instances

    def weighted(values: np.ndarray, weights: np.ndarray) -> float:
        total = float(weights.sum())
        return float(np.clip(values, 0, 1) @ weights / total) if total > 0 else 0.0

    return {
        "gpu_hours_prefill": float(prefill_gpus.sum()) / 3600.0,
        "gpu_hours_decode": float(decode_gpus.sum()) / 3600.0,
        "util_prefill": weighted(prefill_util, prefill_gpus),
        "util_decode": weighted(decode_util, decode_gpus),
        "sm_prefill": weighted(prefill_sm, prefill_gpus),
        "sm_decode": weighted(decode_sm, decode_gpus),
    }


def _timeline(
    sim: ServiceSim,
    counts: Mapping[str, np.ndarray],
    horizon: int,
    decision_times: Sequence[float],
    ttft_ms: Sequence[float],
    tbt_ms: Sequence[float],
    *,
    start: int = 0,
) -> dict[str, np.ndarray]:
    """Per-minute series for the plot and the JSON, over the judged seconds ``[start,
    horizon)``, minutes counted from ``start``."""
    span = horizon - start
    minutes = max(1, math.ceil(span / 60))
    pad = minutes * 60 - span

    def per_minute(values: np.ndarray, how: str = "mean") -> np.ndarray:
        v = np.concatenate([values[start:horizon], np.full(pad, np.nan)]).reshape(minutes, 60)
        out: np.ndarray = np.nanmean(v, axis=1) if how == "mean" else np.nanmax(v, axis=1)
        return out

    series = sim.series
    t_min = np.arange(minutes, dtype=float)
    decisions = np.asarray(decision_times)
    index = np.clip(
        np.searchsorted(decisions, start + t_min * 60.0 + 59.0, side="right") - 1,
        0,
        max(len(decisions) - 1, 0),
    )
    ttft = np.asarray(ttft_ms)[index] if len(ttft_ms) else np.full(minutes, np.nan)
    tbt = np.asarray(tbt_ms)[index] if len(tbt_ms) else np.full(minutes, np.nan)
    return {
        "t_min": t_min,
        "requests_per_s": per_minute(series.col("arrived", 0, horizon)),
        "prefill_tps": per_minute(series.col("prefill_tokens", 0, horizon)),
        "decode_tps": per_minute(series.col("decode_tokens", 0, horizon)),
        "prefill_instances": per_minute(
            counts["prefill_ready"] + counts["prefill_starting"], "max"
        ),
        "decode_instances": per_minute(counts["decode_ready"] + counts["decode_starting"], "max"),
        "ttft_ms": ttft,
        "tbt_ms": tbt,
    }


__all__ = [
    "DEFAULT_POLICIES",
    "Capacity",
    "EvaluationError",
    "EvaluationResult",
    "PolicyResult",
    "ScheduleAutoscaler",
    "build_autoscaler",
    "counts_for_peaks",
    "default_placer",
    "evaluate",
    "initial_counts",
    "peak_demand",
    "policy_labels",
    "role_capacity",
    "run_autoscaler",
    "warm_start_counts",
]
