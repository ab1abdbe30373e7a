"""Decode pinning and the stale router (``reconciler.sim.generations``).

A decode request stays on the instances it started on until it finishes: new decode
instances start empty and take only new admissions, draining ones keep their sequences
and take none. Admissions are routed least-loaded first on the load the instances
reported a second ago (``SimConfig.router_staleness_s``; 0 is a perfect router)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired import DesiredState
from reconciler.placement.base import PlacementRequest
from reconciler.placement.greedy import GreedyPlacer
from reconciler.plan import Plan, diff_groups
from reconciler.sim.engine import LoadProfile, ServiceSim, SimConfig, per_request, synthetic_profile
from reconciler.sim.fleet import SimulatedFleet
from reconciler.sim.generations import water_fill
from reconciler.sim.workload import Workload
from reconciler.state import ROLES, Targets

SERVICE = "svc-b"  # decode on H20 (an 8 B model, TBT SLO 20 ms)
PREFILL = {("h800", "rdma"): 16.0}  # ample: decode alone decides


def _requests(arrivals: np.ndarray, prompt: int, output: int) -> LoadProfile:
    arrivals = np.sort(arrivals)
    return LoadProfile.from_workload(
        Workload(
            arrivals,
            np.full(arrivals.size, prompt, dtype=np.int64),
            np.full(arrivals.size, output, dtype=np.int64),
            "constructed",
        )
    )


def _steady(rps: float, seconds: int, prompt: int, output: int) -> LoadProfile:
    return _requests(np.arange(0.0, seconds, 1.0 / rps), prompt, output)


def _sim(state: DesiredState, profile: LoadProfile, **config: int | float) -> ServiceSim:
    policy = state.policies[SERVICE]
    return ServiceSim(policy, state.clusters[policy.cluster], profile, SimConfig(**config))  # type: ignore[arg-type]


def _run(sim: ServiceSim, until: int) -> None:
    while sim.t < until:
        sim.step()


@dataclass(frozen=True)
class Slot:
    gen: int
    ready: int
    instances: int
    batch: float  # running sequences per instance (after the second's admissions)
    step_ms: float
    admitted: float


def _slots(sim: ServiceSim, t: int, pool: int = 0) -> list[Slot]:
    """The live generations of a decode pool in second ``t``."""
    s = sim.series
    out = []
    for k in range(sim.slots):
        gen = int(s.col(f"d{pool}g{k}_gen")[t])
        if gen < 0:
            continue
        instances = int(s.col(f"d{pool}g{k}_instances")[t])
        out.append(
            Slot(
                gen,
                int(s.col(f"d{pool}g{k}_ready")[t]),
                instances,
                float(s.col(f"d{pool}g{k}_alive")[t]) / max(instances, 1),
                1000.0 * float(s.col(f"d{pool}g{k}_tau")[t]),
                float(s.col(f"d{pool}g{k}_admitted")[t]),
            )
        )
    return out


def _conserved(sim: ServiceSim) -> None:
    c = sim.conservation()
    assert c["arrived"] == pytest.approx(
        c["dropped"] + c["completed"] + c["in_flight"], rel=1e-9, abs=1e-6
    )


# --------------------------------------------------------------------------- pinning


def _scale_out_under_load(state: DesiredState, **config: int | float) -> ServiceSim:
    """Two decode instances running a big batch (a step well above the 20 ms SLO), then
    six more at t = 240."""
    sim = _sim(state, _steady(17, 600, prompt=1000, output=500), **config)
    sim.set_counts(PREFILL, {"h20": 2}, {})
    _run(sim, 240)
    sim.set_counts(PREFILL, {"h20": 8}, {})
    _run(sim, 330)
    return sim


def test_new_decode_instances_do_not_relieve_the_running_sequences(state: DesiredState) -> None:
    pinned = _scale_out_under_load(state)
    fluid = _scale_out_under_load(state, decode_generations=1)  # the fluid pool of old
    slo_ms = state.policies[SERVICE].slo.tbt_ms
    (before,) = _slots(pinned, 239)
    assert before.instances == 2 and before.step_ms > 2 * slo_ms
    # Pinned: the two old instances keep their batch and their slow step until their
    # sequences finish; the six new ones start empty and take the new admissions.
    for t in range(240, 245):
        old, new = sorted(_slots(pinned, t), key=lambda g: g.gen)
        assert (old.instances, new.instances) == (2, 6)
        assert old.step_ms > 1.5 * slo_ms and old.admitted == 0.0
        assert new.batch < old.batch / 5 and new.step_ms < slo_ms
        assert new.admitted > 0
    # The fluid pool spreads the same sequences over all eight at once.
    (relieved,) = _slots(fluid, 241)
    assert relieved.instances == 8 and relieved.step_ms < slo_ms
    # Once the old sequences are done the two generations have one load and merge.
    assert len(_slots(pinned, 320)) == 1
    # Per request: a sequence that started just before the scale-out stays slow
    # pinned; the fluid pool would have rescued it.
    sample = pinned.profile.sample
    assert sample is not None
    just_before = (sample.arrival_s >= 239.0) & (sample.arrival_s < 239.6)
    tbt_ok = {}
    for name, sim in (("pinned", pinned), ("fluid", fluid)):
        r = per_request(
            sim,
            sample.arrival_s[just_before],
            sample.prompt_tokens[just_before].astype(float),
            sample.output_tokens[just_before].astype(float),
        )
        tbt_ok[name] = float(r.tbt_ok.mean())
    assert tbt_ok["pinned"] < 0.1 < 0.9 < tbt_ok["fluid"]


def test_draining_instances_keep_their_sequences_and_take_no_new_ones(
    state: DesiredState,
) -> None:
    sim = _sim(state, _steady(12, 900, prompt=1000, output=500))
    sim.set_counts(PREFILL, {"h20": 8}, {})
    _run(sim, 300)
    (steady,) = _slots(sim, 299)
    # Scale in by three as the fleet does: they drain until the pool's clock has
    # advanced by the 99th-percentile output length.
    until = sim.decode_clock("h20") + sim.out_p99
    sim.set_counts(PREFILL, {"h20": 5}, {"h20": 3})
    drained: list[Slot] = []
    while sim.decode_clock("h20") < until:
        sim.step()
        slots = _slots(sim, sim.t - 1)
        (leaving,) = [g for g in slots if g.ready == 0]
        (staying,) = [g for g in slots if g.ready > 0]
        assert (leaving.instances, staying.instances) == (3, 5)
        assert leaving.admitted == 0.0
        drained.append(leaving)
        _conserved(sim)
    # At first the three carry their share of the batch (less the second's new
    # admissions, which went to the others); it runs down to nothing.
    admitted_per_instance = steady.admitted / steady.instances
    assert drained[0].batch == pytest.approx(steady.batch - admitted_per_instance, rel=0.05)
    assert drained[-1].batch < 0.01 * steady.batch
    assert all(a.batch >= b.batch for a, b in pairwise(drained))
    sim.set_counts(PREFILL, {"h20": 5}, {})  # the drain is over
    _run(sim, sim.t + 5)
    (left,) = _slots(sim, sim.t - 1)
    assert left.instances == 5
    _run(sim, 2000)
    _conserved(sim)
    assert sim.in_flight == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- conservation


def _plan(state: DesiredState, fleet: SimulatedFleet, prefill: int, decode: int) -> Plan:
    policy = state.policies[SERVICE]
    cluster = state.clusters[policy.cluster]
    current = fleet.observe(cluster, [policy]).fleet
    result = GreedyPlacer().place(
        PlacementRequest(
            cluster=cluster,
            policies={SERVICE: policy},
            current=current,
            targets={SERVICE: Targets(SERVICE, prefill, decode)},
        )
    )
    gpus = {(SERVICE, role): policy.role(role).gpus_per_instance for role in ROLES}
    return Plan(cluster.name, {}, result, diff_groups(current, result.groups, gpus), current)


@pytest.mark.parametrize("staleness", [0, 1])
def test_every_request_completes_once_or_is_dropped_through_scale_out_and_in(
    state: DesiredState, staleness: int
) -> None:
    """The shared prefill queue and pinned decode together, in the simulated fleet:
    decode scales out (new generations), in (drains split off) and out again."""
    profile = synthetic_profile("b", hours=0.25, peak_rps=10, seed=3, trough_ratio=1.0, bursts=())
    config = SimConfig(router_staleness_s=staleness)
    fleet = SimulatedFleet(
        state.clusters, {SERVICE: state.policies[SERVICE]}, {SERVICE: profile}, config
    )
    sim = fleet.sims[SERVICE]
    fleet.bootstrap(_plan(state, fleet, 4, 4).groups)
    most_generations = 0
    drained = False
    for until, prefill, decode in ((200, 4, 10), (400, 4, 5), (520, 4, 12), (900, 4, 3)):
        fleet.advance_to(until)
        fleet.apply(_plan(state, fleet, prefill, decode))
        for t in range(until, until + 150, 5):
            fleet.advance_to(t)
            _conserved(sim)
            slots = _slots(sim, sim.t - 1)
            most_generations = max(most_generations, len(slots))
            drained |= any(g.ready == 0 and g.instances > 0 for g in slots)
    assert most_generations >= 2 and drained
    fleet.advance_to(profile.horizon_s + 1800)
    c = sim.conservation()
    assert c["arrived"] == pytest.approx(profile.requests)
    assert c["in_flight"] == pytest.approx(0.0, abs=1e-6)
    outcome = sim.request_outcomes()
    # The per-request view (following each sequence through merges and splits) agrees
    # with the fluid counters on what completed.
    assert outcome.completed_fraction == pytest.approx(c["completed"] / c["arrived"], abs=0.02)


@settings(max_examples=12, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.integers(0, 8), st.integers(0, 3), st.booleans()), min_size=1, max_size=6
    ),
    slots=st.integers(1, 4),
    staleness=st.integers(0, 2),
    seed=st.integers(0, 100),
)
def test_any_sequence_of_count_changes_conserves_requests(
    state: DesiredState,
    changes: list[tuple[int, int, bool]],
    slots: int,
    staleness: int,
    seed: int,
) -> None:
    """Counts set directly, every 40 s: ``(ready, newly draining, drain ends early)``;
    drains end by the fleet's rule unless cut short. Whatever the order, with few slots
    or many: arrived = dropped + completed + in flight, every second, and all drain."""
    profile = synthetic_profile("b", hours=0.1, peak_rps=12, seed=seed, trough_ratio=1.0, bursts=())
    sim = _sim(state, profile, decode_generations=slots, router_staleness_s=staleness)
    ready, drains = 3, []  # drains: [until clock, count]
    sim.set_counts(PREFILL, {"h20": ready}, {})
    for target, retire, cut in changes:
        retire = min(retire, ready)
        if retire:
            drains.append([sim.decode_clock("h20") + sim.out_p99, retire])
            ready -= retire
        ready = target
        for _ in range(40):
            drains = [d for d in drains if sim.decode_clock("h20") < d[0]]
            if cut and drains:
                drains.pop(0)
            sim.set_counts(PREFILL, {"h20": ready}, {"h20": sum(c for _u, c in drains)})
            sim.step()
            _conserved(sim)
    sim.set_counts(PREFILL, {"h20": max(ready, 1)}, {})
    _run(sim, sim.t + 2400)
    _conserved(sim)
    assert sim.in_flight == pytest.approx(0.0, abs=1e-6)
    assert sim.decode_gens[0].live() <= slots


# --------------------------------------------------------------------------- router


def _burst_after_scale_out(state: DesiredState, staleness: int) -> ServiceSim:
    """Four loaded decode instances, four new (empty) ones at t = 200, and a burst of
    admissions over the two seconds that follow."""
    steady = np.arange(0.0, 300.0, 1 / 27.0)
    burst = np.arange(200.0, 202.0, 1 / 160.0)
    sim = _sim(
        state,
        _requests(np.concatenate([steady, burst]), prompt=500, output=500),
        router_staleness_s=staleness,
    )
    sim.set_counts(PREFILL, {"h20": 4}, {})
    _run(sim, 200)
    sim.set_counts(PREFILL, {"h20": 8}, {})
    _run(sim, 230)
    return sim


def _imbalance(sim: ServiceSim, start: int, stop: int) -> float:
    """The largest ratio of per-instance batch between ready generations."""
    worst = 1.0
    for t in range(start, stop):
        batches = [g.batch for g in _slots(sim, t) if g.ready > 0]
        worst = max(worst, max(batches) / max(min(batches), 1e-9))
    return worst


def test_a_stale_router_piles_a_burst_onto_the_instances_that_looked_emptiest(
    state: DesiredState,
) -> None:
    stale = _burst_after_scale_out(state, staleness=1)
    perfect = _burst_after_scale_out(state, staleness=0)
    # The second after the scale-out, the new instances still report empty: a stale
    # router sends them most of the burst again; a perfect one fills them to the
    # others' level and then spreads.
    assert _imbalance(stale, 201, 205) > 1.5
    assert _imbalance(perfect, 201, 205) < 1.02
    new_stale = [g for g in _slots(stale, 201) if g.gen > 0]
    old_stale = [g for g in _slots(stale, 201) if g.gen == 0]
    assert new_stale[0].admitted > 3 * old_stale[0].admitted
    assert new_stale[0].step_ms > 1.4 * old_stale[0].step_ms
    # A perfect router keeps them level, so they merge at once.
    assert len(_slots(perfect, 205)) == 1


@settings(max_examples=60, deadline=None)
@given(
    total=st.floats(0, 500),
    levels=st.lists(st.floats(0, 100), min_size=1, max_size=6),
    data=st.data(),
)
def test_water_filling_fills_the_least_loaded_first(
    total: float, levels: list[float], data: st.DataObject
) -> None:
    n = len(levels)
    weights = data.draw(st.lists(st.integers(0, 8).map(float), min_size=n, max_size=n))
    caps = data.draw(st.lists(st.floats(0, 200), min_size=n, max_size=n))
    out = water_fill(total, levels, weights, caps)
    usable = [i for i in range(n) if weights[i] > 0 and caps[i] > 1e-12]
    assert sum(out) == pytest.approx(min(total, sum(caps[i] for i in usable)), rel=1e-9, abs=1e-9)
    for i in range(n):
        assert -1e-9 <= out[i] <= (caps[i] if i in usable else 0.0) * (1 + 1e-9) + 1e-9
    # Every bin that got something and has room left ends at one level, at or below
    # the level of any bin that got nothing.
    after = {i: levels[i] + out[i] / weights[i] for i in usable}
    open_bins = [i for i in usable if out[i] > 1e-9 and out[i] < caps[i] * (1 - 1e-9)]
    if open_bins:
        level = after[open_bins[0]]
        for i in open_bins:
            assert after[i] == pytest.approx(level, rel=1e-6, abs=1e-6)
        for i in usable:
            if out[i] <= 1e-9 and caps[i] > 1e-6:
                assert levels[i] >= level - 1e-6


# --------------------------------------------------------------------------- state


def _several_generations(state: DesiredState) -> ServiceSim:
    sim = _sim(state, _steady(14, 900, prompt=800, output=400), router_staleness_s=1)
    sim.set_counts(PREFILL, {"h20": 3}, {})
    _run(sim, 120)
    sim.set_counts(PREFILL, {"h20": 6}, {})
    _run(sim, 122)
    sim.set_counts(PREFILL, {"h20": 9}, {})
    _run(sim, 124)
    sim.set_counts(PREFILL, {"h20": 7}, {"h20": 2})  # a drain split off the youngest
    _run(sim, 125)
    return sim


def _trajectory(sim: ServiceSim, seconds: int) -> tuple[np.ndarray, dict[str, float], float]:
    start = sim.series.rows
    _run(sim, sim.t + seconds)
    return sim.series.data[start : sim.series.rows].copy(), dict(sim.cum), sim.in_flight


def test_snapshot_and_restore_are_exact_with_several_generations_alive(
    state: DesiredState,
) -> None:
    sim = _several_generations(state)
    assert len(_slots(sim, sim.t - 1)) >= 3
    snap = sim.snapshot()
    first = _trajectory(sim, 200)
    # Elsewhere, as a search does: other counts, other generations...
    sim.restore(snap)
    sim.set_counts(PREFILL, {"h20": 12}, {})
    _trajectory(sim, 50)
    sim.set_counts(PREFILL, {"h20": 4}, {"h20": 3})
    _trajectory(sim, 30)
    # ... and back: the same future, to the bit.
    sim.restore(snap)
    again = _trajectory(sim, 200)
    assert np.array_equal(first[0], again[0])
    assert first[1] == again[1] and first[2] == again[2]


@settings(max_examples=8, deadline=None)
@given(
    ready_a=st.integers(1, 6),
    ready_b=st.integers(1, 6),
    shift=st.floats(0.0, 500.0),
    rps=st.floats(4.0, 20.0),
    staleness=st.integers(0, 1),
)
def test_merging_generations_of_equal_load_changes_nothing(
    state: DesiredState, ready_a: int, ready_b: int, shift: float, rps: float, staleness: int
) -> None:
    """Two generations with the same sequences per instance (each cohort of one is the
    other's scaled by their instance counts; their clocks apart by ``shift``) run the
    same future kept apart as merged: the merge re-bases the cohorts exactly."""
    sim = _sim(
        state,
        synthetic_profile("b", hours=0.2, peak_rps=rps, seed=1, trough_ratio=1.0, bursts=()),
        router_staleness_s=staleness,
        generation_merge_tolerance=-1.0,  # never merge on their own
    )
    sim.set_counts(PREFILL, {"h20": ready_a + ready_b}, {})
    _run(sim, 200)
    gens = sim.decode_gens[0]
    assert gens.live() == 1 and gens.gen[0] >= 0
    # Split slot 0 into two generations by hand (a, b instances) with shifted clocks.
    lo, hi = gens.head[0], gens.tail[0]
    share = ready_b / (ready_a + ready_b)
    gens._occupy(1, sim.t)
    gens.touched.clear()
    gens.psi[1] = gens.psi[0] + shift
    gens._set_cohorts(
        1,
        gens.entry[0][lo:hi] + shift,
        gens.count[0][lo:hi] * share,
        gens.prompt[0][lo:hi].copy(),
        gens.scale[0][lo:hi].copy(),
    )
    gens.count[0][lo:hi] *= 1.0 - share
    gens.ready[0], gens.ready[1] = ready_a, ready_b
    for name in ("alive_end", "kv_end"):
        values = getattr(gens, name)
        values[1], values[0] = values[0] * share, values[0] * (1.0 - share)
    gens.history[1] = list(gens.history[0])
    gens.batch_ran[1], gens.tau_ran[1] = gens.batch_ran[0], gens.tau_ran[0]
    gens.inst_ran[0], gens.inst_ran[1] = ready_a, ready_b
    snap = sim.snapshot()

    def run() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        start = sim.t
        _run(sim, start + 300)
        s = sim.series
        return (
            s.col("decode_tokens", start, sim.t),
            s.col("completed", start, sim.t),
            s.col("d0_alive", start, sim.t),
            sim.in_flight,
        )

    apart = run()
    assert sim.decode_gens[0].live() == 2
    sim.restore(snap)
    sim.decode_gens[0]._merge(1, 0)
    merged = run()
    assert sim.decode_gens[0].live() == 1
    for kept, joined in zip(apart[:3], merged[:3], strict=True):
        np.testing.assert_allclose(joined, kept, rtol=1e-9, atol=1e-9)
    assert merged[3] == pytest.approx(apart[3], rel=1e-9, abs=1e-9)
