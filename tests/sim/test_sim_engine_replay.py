"""Coming back to a state and reading it faster: snapshot/restore, the prefill tape, and
the judging shortcuts oracle-min uses give the same numbers as the plain way."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired import DesiredState
from reconciler.sim.engine import (
    LoadProfile,
    PrefillTape,
    ServiceSim,
    SimSnapshot,
    _Grow,
    fifo_delay,
    per_request,
    prompt_tables,
    synthetic_profile,
    token_gap_quantile_s,
    token_gap_quantiles_s,
)
from reconciler.sim.oracle import _steps_within

SERVICE = "svc-b"
PREFILL = ("h800", "rdma")
START_S, STOP_S = 240, 316  # a trial: one 60 s window and what follows it


@pytest.fixture(scope="module")
def load() -> LoadProfile:
    return synthetic_profile("b", hours=0.15, peak_rps=30, seed=5, sample_limit=20_000)


def warm(state: DesiredState, load: LoadProfile) -> ServiceSim:
    """A service run to ``START_S`` on counts that change on the way (new generations)."""
    policy = state.policies[SERVICE]
    sim = ServiceSim(policy, state.clusters[policy.cluster], load)
    for until, prefill, decode in ((100, 6, 10), (180, 8, 14), (START_S, 7, 12)):
        sim.set_counts({PREFILL: prefill}, {"h20": decode}, {})
        while sim.t < until:
            sim.step()
    return sim


def trial(sim: ServiceSim, prefill: int, decode: int, stop: int = STOP_S) -> None:
    sim.set_counts({PREFILL: prefill}, {"h20": decode}, {})
    while sim.t < stop:
        sim.step()


def state_of(sim: ServiceSim) -> tuple[object, ...]:
    """Everything a run leaves (the snapshot and the rows written), comparable with ==."""
    snap: SimSnapshot = sim.snapshot()
    decode = [
        (g.scalars, repr(g.lists), [tuple(a.tolist()) for c in g.cohorts for a in c])
        for g in snap.decode
    ]
    return (
        snap.t,
        snap.rows,
        dict(snap.scalars),
        {k: list(v) for k, v in snap.lists.items()},
        snap.queue,
        snap.admit_queue,
        dict(snap.cum),
        decode,
        sim.series.data[: snap.rows].tobytes(),
    )


def outcomes(sim: ServiceSim, load: LoadProfile) -> tuple[bytes, ...]:
    sample = load.sample
    assert sample is not None
    keep = (sample.arrival_s >= START_S) & (sample.arrival_s < START_S + 60)
    r = per_request(
        sim,
        sample.arrival_s[keep],
        sample.prompt_tokens[keep].astype(np.float64),
        sample.output_tokens[keep].astype(np.float64),
        unfinished_so_far=True,
    )
    return (r.ttft_ok.tobytes(), r.tbt_ok.tobytes(), r.both_ok.tobytes(), r.complete.tobytes())


def test_a_trial_from_a_snapshot_equals_one_from_scratch(
    state: DesiredState, load: LoadProfile
) -> None:
    sim = warm(state, load)
    base = sim.snapshot()
    trial(sim, 9, 10)
    first = (state_of(sim), outcomes(sim, load))
    trial_after_other = warm(state, load)
    trial(trial_after_other, 9, 10)
    assert (state_of(trial_after_other), outcomes(trial_after_other, load)) == first
    # Another trial in between, then back: the same again.
    sim.restore(base)
    trial(sim, 7, 16)
    sim.restore(base)
    trial(sim, 9, 10)
    assert (state_of(sim), outcomes(sim, load)) == first


@pytest.mark.parametrize("decode", [8, 12, 20])
def test_a_prefill_tape_replays_what_simulating_gives(
    state: DesiredState, load: LoadProfile, decode: int
) -> None:
    plain = warm(state, load)
    base = plain.snapshot()
    trial(plain, 7, decode)
    expected = (state_of(plain), outcomes(plain, load))
    # The tape is recorded by a trial with another decode count (and a shorter one, so
    # the replay runs off its end and records on), then replayed.
    taped = warm(state, load)
    tape = PrefillTape(START_S)
    taped.prefill_tape = tape
    trial(taped, 7, 15, stop=STOP_S - 20)
    assert len(tape.seconds) == STOP_S - 20 - START_S
    taped.restore(base)
    trial(taped, 7, decode)
    assert len(tape.seconds) == STOP_S - START_S
    taped.prefill_tape = None
    assert (state_of(taped), outcomes(taped, load)) == expected


def test_a_prefill_tape_is_neither_replayed_nor_extended_with_other_prefill_counts(
    state: DesiredState, load: LoadProfile
) -> None:
    sim = warm(state, load)
    base = sim.snapshot()
    tape = PrefillTape(START_S)
    sim.prefill_tape = tape
    trial(sim, 7, 12, stop=START_S + 30)
    recorded = list(tape.seconds)
    sim.restore(base)
    trial(sim, 9, 12)
    assert tape.seconds == recorded
    sim.prefill_tape = None
    plain = warm(state, load)
    trial(plain, 9, 12)
    assert state_of(sim) == state_of(plain)


def test_a_snapshot_taken_while_replaying_holds_the_prefill_queue(
    state: DesiredState, load: LoadProfile
) -> None:
    # Under prefill overload the queue holds cohorts, which replayed seconds only note.
    sim = warm(state, load)
    base = sim.snapshot()
    sim.prefill_tape = PrefillTape(START_S)
    trial(sim, 2, 12)
    sim.restore(base)
    trial(sim, 2, 14, stop=START_S + 45)
    during = sim.snapshot()
    sim.prefill_tape = None
    plain = warm(state, load)
    trial(plain, 2, 14, stop=START_S + 45)
    assert during.queue == plain.snapshot().queue and during.queue
    assert dict(during.scalars) == dict(plain.snapshot().scalars)


def test_fifo_delay_from_a_later_second_gives_the_same_answer() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        seconds = int(rng.integers(2, 60))
        served = np.cumsum(rng.choice([0.0, 0.5, 1.0, 7.0], size=seconds))
        position = np.concatenate(
            (rng.uniform(-1.0, served[-1] * 1.2, size=20), served[rng.integers(0, seconds, 5)])
        )
        whole = fifo_delay(position, served)
        for first in (0, 1, seconds // 2, seconds - 1, seconds + 3):
            part = fifo_delay(position, served, first)
            assert part[0].tobytes() == whole[0].tobytes()
            assert part[1].tolist() == whole[1].tolist()


def judged_window(
    state: DesiredState, load: LoadProfile
) -> tuple[ServiceSim, np.ndarray, np.ndarray, np.ndarray]:
    """A warm simulator after one trial, and the sampled requests of the minute from
    ``START_S`` (arrival, prompt and output tokens) that the judging tests replay."""
    sim = warm(state, load)
    trial(sim, 7, 12)
    sample = load.sample
    assert sample is not None
    lo, hi = np.searchsorted(sample.arrival_s, [START_S, START_S + 60])
    arrival = sample.arrival_s[lo:hi]
    prompt = sample.prompt_tokens[lo:hi].astype(np.float64)
    output = sample.output_tokens[lo:hi].astype(np.float64)
    return sim, arrival, prompt, output


def test_judging_shortcuts_give_the_same_numbers(state: DesiredState, load: LoadProfile) -> None:
    sim, arrival, prompt, output = judged_window(state, load)
    tables = prompt_tables(sim, prompt)
    for count in (len(arrival), len(arrival) // 2):
        plain = per_request(sim, arrival[:count], prompt[:count], output[:count])
        kept = per_request(
            sim, arrival[:count], prompt[:count], output[:count], tables=tables.head(count)
        )
        for name in ("ttft_ok", "tbt_ok", "both_ok", "complete", "unattainable"):
            assert getattr(kept, name).tobytes() == getattr(plain, name).tobytes()
        for values, same in zip(kept.ttft_values, plain.ttft_values, strict=True):
            assert values.tobytes() == same.tobytes()
    stops = (START_S + 30, START_S + 60, sim.t, sim.t + 5, START_S)
    assert token_gap_quantiles_s(sim, 1.0, START_S, stops) == [
        token_gap_quantile_s(sim, 1.0, START_S, stop) for stop in stops
    ]
    # A request's first step, from each second once or from each request.
    seconds = np.floor(arrival).astype(np.int64) + 3
    per_second = sim._first_step_s(seconds)
    assert per_second.tobytes() == sim._first_step_per_second(seconds).tobytes()


@settings(max_examples=60, deadline=None)
@given(
    columns=st.integers(1, 40),
    rows=st.lists(st.lists(st.floats(allow_nan=False), min_size=40, max_size=40), max_size=12),
)
def test_rows_packed_in_place_equal_rows_appended(columns: int, rows: list[list[float]]) -> None:
    """The simulator packs each second's row into its table (``next_row``); the table
    holds the same bytes as appending the row as a list, across its growth too."""
    names = [f"c{i}" for i in range(columns)]
    appended, packed = _Grow(names, capacity=2), _Grow(names, capacity=2)
    for row in rows:
        appended.append(row[:columns])
        offset = packed.next_row()
        packed.row_format.pack_into(packed.data.data, offset, *row[:columns])
    assert packed.rows == appended.rows == len(rows)
    assert packed.data[: packed.rows].tobytes() == appended.data[: appended.rows].tobytes()


def test_a_run_read_while_replaying_reads_as_simulated(
    state: DesiredState, load: LoadProfile
) -> None:
    """Replayed seconds set the prefill state only when it is read: what a reader sees
    in between (requests in flight, the counters) is what simulating them leaves."""
    plain = warm(state, load)
    taped = warm(state, load)
    base = taped.snapshot()
    tape = PrefillTape(START_S)
    taped.prefill_tape = tape
    trial(taped, 7, 15)
    taped.restore(base)
    taped.set_counts({PREFILL: 7}, {"h20": 12}, {})
    plain.set_counts({PREFILL: 7}, {"h20": 12}, {})
    for stop in (START_S + 1, START_S + 20, START_S + 21, STOP_S):
        while taped.t < stop:
            taped.step()
            plain.step()
        assert taped.conservation() == plain.conservation()
        assert taped.in_flight == plain.in_flight
    taped.prefill_tape = None
    assert state_of(taped) == state_of(plain)


def test_judging_without_mean_gaps_gives_the_same_numbers(
    state: DesiredState, load: LoadProfile
) -> None:
    # oracle-min's judge asks per_request for no mean gaps (mean_gaps=False): the
    # sequences are followed for the so-far sums only, every figure it reads the same.
    sim, arrival, prompt, output = judged_window(state, load)
    for count in (len(arrival), len(arrival) // 2, 1):
        args = (sim, arrival[:count], prompt[:count], output[:count])
        plain = per_request(*args, unfinished_so_far=True)
        lean = per_request(*args, unfinished_so_far=True, mean_gaps=False)
        for name in ("ttft_ok", "tbt_ok", "both_ok", "complete", "unattainable"):
            assert getattr(lean, name).tobytes() == getattr(plain, name).tobytes()
        for name in ("ttft_values", "ttft_weights", "tbt_weights"):
            for values, same in zip(getattr(lean, name), getattr(plain, name), strict=True):
                assert values.tobytes() == same.tobytes()


def test_steps_within_agrees_with_the_longest_gap(state: DesiredState, load: LoadProfile) -> None:
    # oracle-min skips token_gap_quantiles_s when every step with tokens is within the
    # limit (_steps_within): then the longest gap is within it too.
    sim = warm(state, load)
    trial(sim, 7, 9)
    for stop in (START_S + 1, START_S + 30, START_S + 60, sim.t, sim.t + 5):
        longest = token_gap_quantile_s(sim, 1.0, START_S, stop)
        steps: set[float] = {0.0, 1.0}
        for q in range(len(sim.decode_pools)):
            tau, tokens = sim._step_times(q, START_S, stop)
            steps |= set(tau[tokens > 0].tolist())
        for step in sorted(steps):
            for limit in (step, float(np.nextafter(step, -np.inf))):
                within = _steps_within(sim, START_S, stop, limit)
                if within:
                    assert longest is None or longest <= limit
                # Within exactly when the slowest step with tokens is.
                assert within == all(s <= limit for s in steps - {0.0, 1.0})
