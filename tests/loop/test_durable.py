"""The durable state's JSON: round trips (hypothesis), trimming to the windows,
size bounds, and refusal of anything this version cannot read; the planner memories
in memory shards (placement by name, reading whatever shard holds a memory, a shard
that cannot be read losing only its own)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import typing
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from looptestkit import packed_memory_of_numbers

from reconciler.apply.statestore import configmap_name, memory_shard_names
from reconciler.desired import load_desired_state
from reconciler.durable import (
    DEFAULT_MEMORY_SHARDS,
    MAX_MEMORY_SHARDS,
    MAX_SERVICES,
    MAX_STATE_BYTES,
    SCHEMA,
    STORABLE_PLANNER_TYPES,
    AppliedPlan,
    DurableState,
    EncodedState,
    Revision,
    StateFormatError,
    StateTooLarge,
    UnpackBudget,
    attach_memories,
    decode,
    decode_document,
    decode_shard,
    decode_stored,
    encode,
    encode_state,
    memory_shard_of,
    merge_history,
    next_applied_plan,
)
from reconciler.policy.base import PolicyHistory, Recommendation
from reconciler.policy.capacity import LatencyCorrection, RequestMix
from reconciler.policy.forecast import ForecastState
from reconciler.policy.gpu_economics import perf_context
from reconciler.policy.planner import Backlog, KeptCapacity, PlannerMemory, plan_decide
from reconciler.state import LengthBuckets, RoleCount, Sample, ServiceFleet, ServiceMetrics
from reconciler.text_safety import visible

NOW = 100_000.0
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
times = st.floats(min_value=NOW - 3000, max_value=NOW)
counts = st.integers(min_value=0, max_value=10_000)


def _series(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.tuples(times, values), max_size=20).map(lambda xs: tuple(sorted(xs)))


histories = st.builds(
    PolicyHistory,
    recommendations=st.lists(st.builds(Recommendation, times, counts, counts), max_size=20).map(
        lambda xs: tuple(sorted(xs, key=lambda r: r.at_s))
    ),
    last_change_at_s=st.none() | times,
    ttft_ms=_series(finite),
    tbt_ms=_series(finite),
    kv_usage=_series(finite),
    dynamic_ratio=st.none() | finite,
    extra=st.lists(st.tuples(st.text(max_size=20), finite), max_size=8).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    services=st.dictionaries(st.text(min_size=1, max_size=30), histories, max_size=4),
    revision=st.none()
    | st.builds(Revision, st.sampled_from(["git", "content"]), st.text(max_size=64)),
)
def test_round_trip_keeps_every_history(
    services: dict[str, PolicyHistory], revision: Revision | None
) -> None:
    state = DurableState(
        "east", NOW, "replica-a", revision, services, AppliedPlan("sha256:x", "abc", NOW - 5)
    )
    text, dropped = encode(state)
    assert not dropped
    json.loads(text, parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity tokens
    assert decode(text) == state


def _planner_memory() -> PlannerMemory:
    mix = RequestMix.from_samples([100, 200, 4000], [50, 300, 800])
    forecast = ForecastState(
        samples=3,
        first_at_s=NOW - 60,
        last_at_s=NOW,
        last_value=12.5,
        pending=((NOW + 30, 0.0, 11.0),),
        errors=((0.1, -0.2), ()),
    )
    return PlannerMemory(
        prefill_demand=forecast,
        decode_demand=ForecastState(),  # NaN fields: "not yet"
        correction=LatencyCorrection(1.3, 0.9),
        mix=mix,
        mix_at_s=NOW - 10,
        prefill_kept=KeptCapacity(((NOW - 30, 100.0),), (0.05,)),
        prefill_backlog=Backlog(NOW - 30, 1.5e6, ((NOW - 90, 2.0e6), (NOW - 60, 1.8e6))),
        decode_backlog=Backlog(
            NOW - 30, 4.0e5, ((NOW - 60, 3.5e5),), ((NOW - 60, 310.0), (NOW - 30, 325.0))
        ),
        decode_ready_seen=12,
        decode_steady_since_s=NOW - 600,
        prefill_ready_seen=7,
        prefill_steady_since_s=NOW - 90,
        prefill_busy_readings=((NOW - 120, 1.62, 0.18), (NOW - 60, 1.71, 0.17)),
    )


def test_planner_memory_round_trips_including_nan_and_inf() -> None:
    memory = _planner_memory()
    assert math.isinf(memory.mix.prompt.bounds[-1]) and math.isnan(ForecastState().last_value)
    state = DurableState("east", NOW, histories={"svc": PolicyHistory(planner=memory)})
    text, dropped = encode(state)
    assert not dropped
    back = decode(text).histories["svc"].planner
    assert isinstance(back, PlannerMemory) and isinstance(back.mix, RequestMix)
    assert back.mix == memory.mix and back.correction == memory.correction
    assert back.prefill_kept == memory.prefill_kept and back.prefill_demand == memory.prefill_demand
    assert math.isnan(back.decode_demand.last_value)
    assert back.decode_backlog == memory.decode_backlog and back.decode_backlog.running
    assert back.prefill_busy_readings == memory.prefill_busy_readings
    assert (
        encode(DurableState("east", NOW, histories={"svc": PolicyHistory(planner=back)}))[0] == text
    )


def _dataclasses_in(hint: object) -> set[type]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return {hint}
    return {c for arg in typing.get_args(hint) for c in _dataclasses_in(arg)}


def test_every_type_the_planner_memory_holds_can_be_stored() -> None:
    """Every dataclass a field of the memory can hold, at any depth, is one the state
    stores: a field of a new type fails here, not at a cluster's first save."""
    found: set[type] = set()
    todo = [PlannerMemory]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.add(cls)
        for hint in typing.get_type_hints(cls).values():
            todo.extend(_dataclasses_in(hint))
    assert Backlog in found
    assert found <= set(STORABLE_PLANNER_TYPES.values())


def test_the_memory_a_planner_leaves_behind_round_trips() -> None:
    """Three cycles of the planner on metrics with both queues (what a vLLM preset
    reads): whatever it remembers is stored and read back unchanged."""
    state = load_desired_state(Path(__file__).resolve().parents[2])
    policy = state.policies["chat"]
    perf = perf_context(policy, state.clusters[policy.cluster])
    bounds = (128.0, 512.0, 2048.0, 8192.0, math.inf)
    history = PolicyHistory()
    for k, queued in enumerate((0.0, 40.0, 10.0)):
        now = NOW + 30 * k
        buckets = LengthBuckets(bounds, (100.0 * k, 300.0, 900.0, 1000.0, 1000.0 + k), now)
        metrics = ServiceMetrics(
            "chat",
            prefill_tps=Sample(120_000.0, now),
            decode_tps=Sample(20_000.0, now),
            ttft=Sample(800.0, now),
            tbt=Sample(30.0, now),
            prefill_queue=Sample(queued, now),
            decode_queue=Sample(queued / 2, now),
            prompt_tokens=buckets,
            output_tokens=buckets,
        )
        fleet = ServiceFleet("chat", RoleCount(12), RoleCount(16))
        history = plan_decide(policy, fleet, metrics, history, now, perf).history
    memory = history.planner
    assert isinstance(memory, PlannerMemory) and memory.prefill_backlog is not None
    text, dropped = encode(DurableState("east", NOW + 60, histories={"chat": history}))
    assert not dropped
    assert decode(text).histories["chat"].planner == memory


def test_series_are_trimmed_to_the_longest_window_keeping_the_one_in_force() -> None:
    recs = tuple(Recommendation(NOW - age, 1, age) for age in (7200, 5000, 3700, 3000, 10))
    state = DurableState("east", NOW, histories={"svc": PolicyHistory(recommendations=recs)})
    kept = decode(encode(state)[0]).histories["svc"].recommendations
    assert [r.decode for r in kept] == [3700, 3000, 10]


def test_oversized_state_keeps_the_planner_memories_that_fit_then_refuses() -> None:
    """Over the limit, planner memories are left out service by service (name order),
    never the windows; the text stays under the limit, and every memory kept reads
    back whole. Only a state too large without any memory is refused."""
    memory = _full_memory()
    one = len(encode(DurableState("east", NOW, histories={"s": PolicyHistory(planner=memory)}))[0])
    count = 3 * MAX_STATE_BYTES // one  # about three times what fits
    many = {f"svc-{i:04d}": PolicyHistory(planner=memory) for i in range(count)}
    text, dropped = encode(DurableState("east", NOW, histories=many))
    assert len(text.encode()) <= MAX_STATE_BYTES
    back = decode(text).histories
    kept = [name for name, h in sorted(back.items()) if h.planner is not None]
    assert len(kept) + dropped == count and 0 < len(kept) < count
    assert kept == sorted(many)[: len(kept)]  # the first names, in order
    assert all(back[name].planner == memory for name in kept)
    # One more memory would not have fitted.
    assert len(text.encode()) + one > MAX_STATE_BYTES
    huge = PolicyHistory(extra=tuple((f"k{i}" * 50, 1.0) for i in range(1000)))
    with pytest.raises(StateTooLarge):
        encode(DurableState("east", NOW, histories={f"s{i}": huge for i in range(40)}))


def _full_memory() -> PlannerMemory:
    """The largest a planner's memory grows: an hour of headroom errors per role, the
    forecaster's ten, a whole day's curve, with values as irregular as a real
    memory's (they compress as much)."""
    rng = random.Random(7)
    memory = _planner_memory()
    demand = replace(
        memory.prefill_demand,
        day_mean=tuple(rng.uniform(1e4, 1e5) for _ in range(96)),
        day_count=(30.0,) * 96,
        errors=(tuple(rng.uniform(-0.3, 0.3) for _ in range(10)),),
    )
    kept = KeptCapacity(
        tuple((NOW - 30 * i, rng.uniform(1e4, 1e5)) for i in range(20)),
        tuple(rng.uniform(-0.3, 0.5) for _ in range(120)),
    )
    return replace(
        memory,
        prefill_demand=demand,
        decode_demand=demand,
        prefill_kept=kept,
        decode_kept=kept,
    )


def test_a_platform_sized_cluster_keeps_every_planner_memory() -> None:
    """A hundred services, each memory at its largest, fit with all their memories
    (stored compressed: about 7 KB each)."""
    histories = {f"svc-{i}": PolicyHistory(planner=_full_memory()) for i in range(100)}
    text, dropped = encode(DurableState("east", NOW, histories=histories))
    assert dropped == 0, len(text)
    assert all(h.planner == _full_memory() for h in decode(text).histories.values())


def test_a_version_1_document_is_still_read() -> None:
    """Version 1 stored each planner memory as a plain JSON object."""
    memory = _full_memory()
    doc = json.loads(
        encode(DurableState("east", NOW, histories={"svc": PolicyHistory(planner=memory)}))[0]
    )
    doc["version"] = 1
    doc["services"]["svc"]["planner"] = json.loads(
        zlib.decompress(base64.b64decode(doc["services"]["svc"]["planner"]))
    )
    assert decode(json.dumps(doc)).histories["svc"].planner == memory


@pytest.mark.parametrize(
    "packed, why",
    [
        ("not base64!", "not a packed memory"),
        (base64.b64encode(b"not zlib").decode(), "not a packed memory"),
        (
            base64.b64encode(zlib.compress(b'{"mix_at_s": 1.0, "mix_at_s": 2.0}')).decode(),
            "key 'mix_at_s' appears twice",
        ),
        (base64.b64encode(zlib.compress(b"[1, 2")).decode(), "not a packed memory"),
        # A bomb: 64 MB of zeros in a few tens of kilobytes.
        (base64.b64encode(zlib.compress(b"0" * (64 << 20), 9)).decode(), "within the limit"),
    ],
)
def test_a_corrupt_packed_memory_is_refused(packed: str, why: str) -> None:
    doc = json.loads(
        encode(
            DurableState("east", NOW, histories={"svc": PolicyHistory(planner=_planner_memory())})
        )[0]
    )
    doc["services"]["svc"]["planner"] = packed
    with pytest.raises(StateFormatError, match=why):
        decode(json.dumps(doc))


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not JSON"),
        ("[]", "not a heteroscale.io"),
        ('{"schema": "other", "version": 1}', "not a heteroscale.io"),
        ('{"schema": "heteroscale.io/reconciler-state", "version": 4}', "schema version 4"),
        # ``True == 1`` and ``1.0 == 1`` in Python: neither is a version.
        ('{"schema": "heteroscale.io/reconciler-state", "version": true}', "schema version True"),
        ('{"schema": "heteroscale.io/reconciler-state", "version": 1.0}', "schema version 1.0"),
        # Two readers could take either of a key written twice: the windows, or none.
        (
            '{"schema": "heteroscale.io/reconciler-state", "version": 3, "cluster": "east",'
            ' "memory_shards": 0, "services": {"svc": {}}, "services": {}}',
            "key 'services' appears twice in one object: read two ways",
        ),
        (
            '{"schema": "heteroscale.io/reconciler-state", "version": 3, "cluster": "west",'
            ' "cluster": "east", "memory_shards": 0, "services": {}}',
            "key 'cluster' appears twice",
        ),
        ("x" * (MAX_STATE_BYTES + 1), "more than the limit"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_unreadable_documents_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(StateFormatError, match=why):
        decode(text)


def test_a_state_document_of_another_cluster_is_refused_as_a_shard_of_one_is() -> None:
    """A ConfigMap copied or restored under another cluster's name: read as that
    cluster's, its windows, cooldown, applied plan and memories went to the services of
    the same names there."""
    history = PolicyHistory(recommendations=(Recommendation(NOW, 40, 80),), last_change_at_s=NOW)
    text = encode(DurableState("west", NOW, histories={"svc": history}))[0]
    with pytest.raises(StateFormatError, match="holds the state of cluster 'west', not 'east'"):
        decode_document(text, cluster="east")
    assert decode_document(text, cluster="west")[0].histories == {"svc": history}


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_mutated_document_is_read_or_refused_never_a_crash(data: st.DataObject) -> None:
    state = DurableState(
        "east",
        NOW,
        revision=Revision("git", "abc"),
        histories={
            "svc": PolicyHistory(
                recommendations=(Recommendation(NOW, 1, 2),), planner=_planner_memory()
            )
        },
    )
    doc = json.loads(encode(state)[0])
    svc = doc["services"]["svc"]
    # Mutated inside: the memory as version 1 stored it (an object), read alike.
    svc["planner"] = json.loads(zlib.decompress(base64.b64decode(svc["planner"])))
    junk = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=5)
        | st.lists(st.integers(), max_size=3)
    )
    target = data.draw(st.sampled_from([doc, svc, svc["planner"], svc["planner"]["mix"]["prompt"]]))
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(junk)
    with contextlib.suppress(StateFormatError):
        decode(json.dumps(doc))


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ({"schema": SCHEMA, "version": "v" * 500_000}, "schema version 'vvv"),
        (
            {
                "schema": SCHEMA,
                "version": 3,
                "memory_shards": 0,
                "cluster": "c",
                "saved_at_s": 1.0,
                "services": {"\x1b[2J\nFAKE LOG LINE": {"ttft_ms": "x"}},
            },
            "services.\\x1b[2J\\nFAKE LOG LINE.ttft_ms: expected a list",
        ),
        (
            {
                "schema": SCHEMA,
                "version": 1,
                "cluster": "c",
                "saved_at_s": 1.0,
                "services": {
                    "s": {
                        "planner": {
                            "mix": {
                                "prompt": {
                                    "bounds": [4000.0 - i for i in range(4000)],
                                    "counts": [1.0] * 4000,
                                },
                                "output": {"bounds": [1.0], "counts": [1.0]},
                            }
                        }
                    }
                },
            },
            "services.s.planner.mix.prompt: bucket bounds must increase: (4000.0, 3999.0",
        ),
    ],
)
def test_a_refusal_quotes_the_document_escaped_and_cut(
    document: dict[str, object], names: str
) -> None:
    """A refusal is logged and shown by ``status``, and quotes what anyone who may edit
    the ConfigMap wrote: a 500 KB version, a service name carrying a terminal escape
    and a line break (a forged log line), a histogram's 4,000 bounds. Each message is
    cut and shows those characters escaped, and still names the part refused."""
    with pytest.raises(StateFormatError) as refused:
        decode_document(json.dumps(document))
    message = str(refused.value)
    assert message.startswith(names), message[:200]
    assert len(message) <= StateFormatError.MESSAGE_CHARS
    assert visible(message) == message  # nothing left to escape


def test_a_takeover_merges_the_windows_and_keeps_the_latest_change() -> None:
    stored = PolicyHistory(
        (Recommendation(1.0, 4, 8), Recommendation(31.0, 4, 8)), 1.0, dynamic_ratio=0.5
    )
    local = PolicyHistory((Recommendation(31.0, 1, 2), Recommendation(61.0, 1, 2)), 40.0)
    merged = merge_history(stored, local)
    assert [r.at_s for r in merged.recommendations] == [1.0, 31.0, 61.0]
    assert merged.recommendations[1].decode == 8  # the leader's entry wins a tie
    assert merged.last_change_at_s == 40.0 and merged.dynamic_ratio == 0.5


def test_configmap_names_are_valid_and_distinct() -> None:
    assert configmap_name("prod-east") == "heteroscale-state-prod-east"
    odd = [configmap_name(n) for n in ("Prod_East", "prod.east", "prod-east-")]
    assert len(set(odd)) == 3
    assert all(len(n) <= 253 and n.replace("-", "").isalnum() and n == n.lower() for n in odd)


def test_the_applied_plan_record_moves_with_a_change_another_plan_or_revision() -> None:
    recorded = AppliedPlan("sha256:p", "rev-a", 100.0)
    assert next_applied_plan(None, "sha256:p", False, "rev-a", 200.0) == AppliedPlan(
        "sha256:p", "rev-a", 200.0
    )
    # Nothing changed, same plan and revision: it was applied at 100 and still is.
    assert next_applied_plan(recorded, "sha256:p", False, "rev-a", 200.0) is recorded
    for plan_id, changed, revision in (
        ("sha256:p", True, "rev-a"),  # a change
        ("sha256:q", False, "rev-a"),  # another plan
        ("sha256:p", False, "rev-b"),  # another revision (e.g. only an image moved)
    ):
        assert next_applied_plan(recorded, plan_id, changed, revision, 200.0) == AppliedPlan(
            plan_id, revision, 200.0
        )


# ------------------------------------------------------------------ memory shards


def _read_back(encoded: EncodedState, cluster: str = "east") -> DurableState:
    """What a reader makes of the documents: the main one, then every shard it lists."""
    state, shards = decode_document(encoded.text)
    assert shards == len(encoded.shards)
    found = {k: decode_shard(text, cluster, k) for k, text in enumerate(encoded.shards)}
    return attach_memories(state, found, shards)


def _memory(seen: int, at_s: float) -> PlannerMemory:
    return replace(_planner_memory(), decode_ready_seen=seen, mix_at_s=at_s)


@settings(max_examples=150, deadline=None)
@given(
    services=st.dictionaries(
        st.text(min_size=1, max_size=30),
        st.tuples(histories, st.none() | st.builds(_memory, counts, times)),
        max_size=12,
    ),
    shards=st.integers(min_value=0, max_value=MAX_MEMORY_SHARDS),
)
def test_round_trip_with_memory_shards_keeps_every_history_and_memory(
    services: dict[str, tuple[PolicyHistory, PlannerMemory | None]], shards: int
) -> None:
    state = DurableState(
        "east",
        NOW,
        "replica-a",
        Revision("git", "abc"),
        {name: replace(h, planner=m) for name, (h, m) in services.items()},
    )
    encoded = encode_state(state, shards)
    assert not encoded.dropped and len(encoded.shards) == shards
    for text in (encoded.text, *encoded.shards):
        json.loads(text, parse_constant=pytest.fail)  # strict JSON
    if shards:  # the main document holds no memory, each shard only its own services'
        assert all(h["planner"] is None for h in json.loads(encoded.text)["services"].values())
        for k, text in enumerate(encoded.shards):
            assert all(memory_shard_of(n, shards) == k for n in json.loads(text)["memories"])
    back = _read_back(encoded)
    # Memories hold NaN ("not yet"), never equal to itself: compared as written.
    assert encode_state(back, shards) == encoded
    assert {n: replace(h, planner=None) for n, h in back.histories.items()} == {
        n: replace(h, planner=None) for n, h in state.histories.items()
    }
    assert {n for n, h in back.histories.items() if h.planner} == {
        n for n, (_, m) in services.items() if m
    }


def test_a_service_lands_in_the_same_shard_in_every_process() -> None:
    """The shard is a CRC-32 of the name, not Python's ``hash`` (salted per process):
    another interpreter, with another hash seed, places every service alike."""
    names = ["chat", "summarize", "svc-0007", "Ünïcode-svc", "a" * 200]
    code = (
        "import json, sys\n"
        "from reconciler.durable import memory_shard_of\n"
        f"print(json.dumps([memory_shard_of(n, k) for n in {names!r} for k in (1, 8, 64)]))"
    )
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        here = [memory_shard_of(n, k) for n in names for k in (1, 8, 64)]
        assert json.loads(other.stdout) == here
    assert memory_shard_of("chat", 8) == zlib.crc32(b"chat") % 8


def test_a_version_2_document_is_still_read_with_its_memories_inline() -> None:
    memory = _full_memory()
    doc = json.loads(
        encode(DurableState("east", NOW, histories={"svc": PolicyHistory(planner=memory)}))[0]
    )
    assert doc["version"] == 3 and doc["memory_shards"] == 0
    doc["version"] = 2
    del doc["memory_shards"]
    state, shards = decode_document(json.dumps(doc))
    assert shards == 0 and state.histories["svc"].planner == memory


def test_the_main_document_records_how_many_memories_each_shard_holds() -> None:
    """What the writer gives as the shards' counts is recorded in the main document
    and read back (None where the writer did not know); the shard documents it encodes
    say how many memories each holds, what a writer records after writing them."""
    histories = {f"svc-{i}": PolicyHistory(planner=_memory(i, NOW)) for i in range(5)}
    state = DurableState("east", NOW, histories=histories)
    encoded = encode_state(state, 4, memories_per_shard=(2, None, 0, 1))
    stored = decode_stored(encoded.text)
    assert stored.memories_per_shard == (2, None, 0, 1)
    assert stored.memory_shards == 4 and stored.state == decode(encoded.text)
    assert encoded.shard_memories == tuple(
        sum(memory_shard_of(name, 4) == k for name in histories) for k in range(4)
    )
    # Not given (a writer that knows nothing of its shards, and every document written
    # before the record existed): none recorded, nothing else changes.
    plain = encode_state(state, 4)
    assert "memories_per_shard" not in json.loads(plain.text)
    assert decode_stored(plain.text).memories_per_shard is None
    assert decode(plain.text) == decode(encoded.text)
    with pytest.raises(ValueError, match="3 entries for 4 shards"):
        encode_state(state, 4, memories_per_shard=(1, 1, 1))


@pytest.mark.parametrize(
    "recorded", [[1, 2, 3], [1, 2, 3, -1], [1, 2, 3, True], [0, 0, 0, MAX_SERVICES + 1], "4"]
)
def test_a_record_of_the_shards_that_does_not_read_is_left_out_and_said(recorded: object) -> None:
    """The record only tells a deleted shard from an empty one: one that does not read
    is read as not recorded and said, the rest of the document as it is (refused, it
    lost the windows, the last plan and every memory over an advisory key)."""
    state = DurableState("east", NOW, "me", None, {"svc": PolicyHistory(planner=_full_memory())})
    doc = json.loads(encode_state(state, 4).text)
    doc["memories_per_shard"] = recorded
    stored = decode_stored(json.dumps(doc))
    assert stored.memories_per_shard is None
    assert stored.state.histories.keys() == {"svc"}
    (problem,) = stored.problems
    assert problem.startswith("memories_per_shard") and "left out" in problem
    assert decode_stored(encode_state(state, 4).text).problems == ()


def test_a_memory_in_another_shard_than_its_hashs_is_read() -> None:
    """After the shard count changed (or a shard was copied), a memory is found in
    whichever shard the document lists; where two shards hold one, the one its name
    maps to wins."""
    memory, older = _full_memory(), _memory(1, NOW - 900)
    state = DurableState("east", NOW, histories={"svc": PolicyHistory(planner=memory)})
    encoded = encode_state(state, 4)
    home = memory_shard_of("svc", 4)
    elsewhere = (home + 1) % 4
    docs = [json.loads(text) for text in encoded.shards]
    docs[elsewhere]["memories"] = docs[home]["memories"]
    docs[home]["memories"] = {}
    moved = EncodedState(encoded.text, tuple(json.dumps(d) for d in docs), 0)
    assert _read_back(moved).histories["svc"].planner == memory
    # Written under 3 shards, read as listed by a document written under 4.
    three = encode_state(state, 3)
    found = {k: decode_shard(text, "east", k) for k, text in enumerate(three.shards)}
    assert attach_memories(decode(encoded.text), found, 4).histories["svc"].planner == memory
    # Two copies: the home shard's is taken.
    both = {home: {"svc": memory}, elsewhere: {"svc": older}}
    assert attach_memories(decode(encoded.text), both, 4).histories["svc"].planner == memory
    # A memory of a service the state no longer lists is left out.
    gone = attach_memories(decode(encoded.text), {0: {"removed": older}}, 4)
    assert set(gone.histories) == {"svc"}


def _corrupt_memory(packed: str) -> str:
    return _shard_of({"svc-x": packed})


def _shard_of(memories: dict[str, str]) -> str:
    return json.dumps(
        {
            "schema": "heteroscale.io/reconciler-memories",
            "version": 1,
            "cluster": "east",
            "memories": memories,
        }
    )


# Each memory within its own limit (4 MiB unpacked), together beyond a read's (32 MiB).
_THREE_MIB_OF_BLANKS = base64.b64encode(zlib.compress(b" " * (3 << 20) + b"{}", 9)).decode()


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "memory shard 2: not JSON"),
        ("x" * (MAX_STATE_BYTES + 1), "memory shard 2: .* more than the limit"),
        ("[" * 100_000, "memory shard 2: not JSON"),
        # A main document is not a shard, nor is a shard of a newer version.
        (
            encode(DurableState("east", NOW))[0],
            "memory shard 2: not a heteroscale.io/reconciler-memories document",
        ),
        (
            '{"schema": "heteroscale.io/reconciler-memories", "version": 2}',
            "memory shard 2: schema version 2",
        ),
        (
            '{"schema": "heteroscale.io/reconciler-memories", "version": 1, "cluster": "east",'
            ' "memories": {}, "memories": {}}',
            "memory shard 2: key 'memories' appears twice",
        ),
        (
            '{"schema": "heteroscale.io/reconciler-memories", "version": 1, "cluster": "west",'
            ' "memories": {}}',
            "memory shard 2: holds memories of cluster 'west', not 'east'",
        ),
        (
            '{"schema": "heteroscale.io/reconciler-memories", "version": 1, "cluster": "east",'
            ' "memories": []}',
            "memory shard 2: memories: expected an object",
        ),
        (_corrupt_memory("not base64!"), r"memory shard 2: services.svc-x.planner: not a packed"),
        (
            _corrupt_memory(base64.b64encode(b"not zlib").decode()),
            r"memory shard 2: services.svc-x.planner: not a packed",
        ),
        (
            _corrupt_memory(base64.b64encode(zlib.compress(b"0" * (64 << 20), 9)).decode()),
            r"memory shard 2: services.svc-x.planner: not a whole memory within the limit",
        ),
        (
            # Ten memories of 3 MiB + 2 bytes leave 32 MiB - 30 MiB - 20 bytes for the 11th.
            _shard_of({f"svc-{i}": _THREE_MIB_OF_BLANKS for i in range(11)}),
            r"memory shard 2: services.svc-10.planner: not a whole memory within the limit "
            r"\(2,097,132 bytes left\)",
        ),
        (
            _corrupt_memory(base64.b64encode(zlib.compress(b'{"mix_at_s": "x"}')).decode()),
            r"memory shard 2: services.svc-x.planner.mix_at_s: expected a number",
        ),
        (
            json.dumps(
                {
                    "schema": "heteroscale.io/reconciler-memories",
                    "version": 1,
                    "cluster": "east",
                    "memories": {"svc-x": {"mix_at_s": 1.0}},
                }
            ),
            r"memory shard 2: services.svc-x.planner: expected a packed memory",
        ),
    ],
)
def test_a_corrupt_oversized_or_foreign_shard_is_refused_and_the_others_still_load(
    text: str, why: str
) -> None:
    histories = {f"svc-{i}": PolicyHistory(planner=_full_memory()) for i in range(24)}
    encoded = encode_state(DurableState("east", NOW, histories=histories), 4)
    with pytest.raises(StateFormatError, match=why):
        decode_shard(text, "east", 2)
    # What a reader does: every other shard read, the refused one's services afresh.
    found = {k: decode_shard(t, "east", k) for k, t in enumerate(encoded.shards) if k != 2}
    back = attach_memories(decode(encoded.text), found, 4)
    lost = {n for n in histories if memory_shard_of(n, 4) == 2}
    assert lost and len(lost) < len(histories)
    assert all((back.histories[n].planner is None) == (n in lost) for n in histories)
    assert all(back.histories[n].planner == _full_memory() for n in histories if n not in lost)


def test_one_read_unpacks_a_bounded_count_of_numbers_over_all_its_shards() -> None:
    """The state object names the shards to read (up to 64), and a memory of "0,"
    repeated packs 1.5 million numbers into a few KB: one read (one budget, passed to
    every shard's decode) unpacks at most ``_LOAD_NUMBERS`` of them together. The
    shards past it are refused with the reason; a reader loses only their services'
    memories."""
    budget = UnpackBudget()
    memory = packed_memory_of_numbers(1_500_000)
    for k in range(2):
        (read,) = decode_shard(_shard_of({f"svc-{k}": memory}), "east", k, budget).values()
        assert sum(map(len, read.prefill_demand.errors)) == 1_500_000
    for k in (2, 3):
        with pytest.raises(
            StateFormatError,
            match=f"memory shard {k}: services.svc-{k}.planner: beyond the 4,000,000 numbers",
        ):
            decode_shard(_shard_of({f"svc-{k}": memory}), "east", k, budget)
    # A read of its own has the whole budget.
    assert decode_shard(_shard_of({"svc-3": memory}), "east", 3)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_mutated_shard_is_read_or_refused_never_a_crash(data: st.DataObject) -> None:
    encoded = encode_state(
        DurableState("east", NOW, histories={"svc": PolicyHistory(planner=_planner_memory())}), 1
    )
    doc = json.loads(encoded.shards[0])
    memories = doc["memories"]
    memories["svc"] = json.loads(zlib.decompress(base64.b64decode(memories["svc"])))
    junk = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.lists(st.integers())
    target = data.draw(st.sampled_from([doc, memories, memories["svc"]]))
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(junk)
    if isinstance(memories.get("svc"), dict):  # packed again, as shards store memories
        raw = json.dumps(memories["svc"]).encode()
        memories["svc"] = base64.b64encode(zlib.compress(raw)).decode()
    with contextlib.suppress(StateFormatError):
        decode_shard(json.dumps(doc), "east", 0)


def test_a_full_shard_keeps_the_memories_that_fit_in_name_order_and_counts_the_rest() -> None:
    """Each shard takes its own services' memories in name order while it stays under
    the limit; the others are dropped and counted, as in one document."""
    memory = _full_memory()
    one = len(
        encode_state(
            DurableState("east", NOW, histories={"s": PolicyHistory(planner=memory)}), 1
        ).shards[0]
    )
    count = 5 * MAX_STATE_BYTES // one  # about two and a half times what two shards hold
    many = {f"svc-{i:04d}": PolicyHistory(planner=memory) for i in range(count)}
    encoded = encode_state(DurableState("east", NOW, histories=many), 2)
    assert all(len(text.encode()) <= MAX_STATE_BYTES for text in encoded.shards)
    back = _read_back(encoded).histories
    kept = {n for n, h in back.items() if h.planner is not None}
    assert len(kept) + encoded.dropped == count and 0 < len(kept) < count
    for k, text in enumerate(encoded.shards):
        own = sorted(n for n in many if memory_shard_of(n, 2) == k)
        held = sorted(n for n in kept if memory_shard_of(n, 2) == k)
        assert held == own[: len(held)] and len(held) < len(own)  # the first names
        assert len(text.encode()) + one > MAX_STATE_BYTES  # the next would not fit
    assert all(back[n].planner == memory for n in kept)
    # The main document holds every service's windows, whatever its shard dropped.
    assert set(back) == set(many)


def test_the_default_shards_keep_a_thousand_services_memories() -> None:
    """A thousand services (the most a state holds), each memory at its largest: every
    memory kept with the default shard count, none with the memories inline."""
    histories = {f"svc-{i:04d}": PolicyHistory(planner=_full_memory()) for i in range(1000)}
    state = DurableState("east", NOW, histories=histories)
    assert encode_state(state, DEFAULT_MEMORY_SHARDS).dropped == 0
    assert encode_state(state, 0).dropped > 800


@pytest.mark.parametrize("shards", [0, DEFAULT_MEMORY_SHARDS])
def test_a_state_of_more_services_than_a_reader_takes_keeps_the_first_and_names_the_rest(
    shards: int,
) -> None:
    """The reader refuses a document of more than ``MAX_SERVICES`` services whole, and
    nothing limits the policies of a cluster: the writer wrote one every cycle, and
    every restart lost every service's windows and memories. It keeps the first
    ``MAX_SERVICES`` in name order (the others' windows and memories left out, named),
    so what it writes reads back."""
    memory = _planner_memory()
    histories = {
        f"svc-{i:04d}": PolicyHistory(recommendations=(Recommendation(NOW, 1, 2),), planner=memory)
        for i in range(MAX_SERVICES + 2)
    }
    encoded = encode_state(DurableState("east", NOW, histories=histories), shards)
    assert encoded.services_left_out == (f"svc-{MAX_SERVICES:04d}", f"svc-{MAX_SERVICES + 1:04d}")
    back = _read_back(encoded).histories
    assert sorted(back) == sorted(histories)[:MAX_SERVICES]
    # The memories of the services kept: in the document, or counted as dropped.
    assert sum(h.planner is not None for h in back.values()) + encoded.dropped == MAX_SERVICES
    assert shards == 0 or not encoded.dropped


@pytest.mark.parametrize("shards", ["8", "-1", "65", "true"])
def test_a_document_listing_an_impossible_shard_count_is_refused(shards: str) -> None:
    doc = json.loads(encode(DurableState("east", NOW))[0])
    doc["memory_shards"] = json.loads(shards)
    if shards == "8":
        assert decode_document(json.dumps(doc))[1] == 8
        return
    with pytest.raises(StateFormatError, match="memory_shards"):
        decode_document(json.dumps(doc))
    with pytest.raises(ValueError, match="memory_shards must be 0 to 64"):
        encode_state(DurableState("east", NOW), json.loads(shards))


def test_memory_shard_names_derive_from_the_state_objects_and_stay_valid() -> None:
    assert memory_shard_names("prod-east", 3) == (
        "heteroscale-state-prod-east-memories-0",
        "heteroscale-state-prod-east-memories-1",
        "heteroscale-state-prod-east-memories-2",
    )
    clusters = ["prod-east", "Prod_East", "x" * 235, "x" * 300, "east-memories-0", "east"]
    names = [n for c in clusters for n in (configmap_name(c), *memory_shard_names(c, 64))]
    assert len(set(names)) == len(names)  # no shard is another cluster's object
    assert all(len(n) <= 253 and n.replace("-", "").isalnum() and n == n.lower() for n in names)
    assert memory_shard_names("x" * 300, 1)[0].startswith(configmap_name("x" * 300)[:200])


def test_a_hand_edited_integer_too_large_for_a_float_is_a_format_error() -> None:
    from reconciler.durable import DurableState, StateFormatError, decode, encode
    from reconciler.policy.base import PolicyHistory

    stored = DurableState(
        cluster="c", saved_at_s=5.0, histories={"chat": PolicyHistory(last_change_at_s=1.0)}
    )
    document = json.loads(encode(stored)[0])
    document["services"]["chat"]["last_change_at_s"] = 10**400
    with pytest.raises(StateFormatError, match="too large"):
        decode(json.dumps(document))
