"""The reconciler's state that outlives the process, as data and as JSON.

One ``DurableState`` per cluster: the last known good desired-state revision, each
service's ``PolicyHistory`` (stabilisation windows, cooldown, the dynamic P/D ratio
and its ``extra`` keys, the planner's memory) and the identity of the last applied
plan. Everything here is pure (no I/O); ``reconciler.apply.statestore`` keeps the
JSON in ConfigMaps.

The state is one main document (``encode_state``), and with ``memory_shards`` N > 0
the planner memories go into N more "memory shard" documents: a service's memory in
shard ``memory_shard_of(service, N)`` (a CRC-32 of its name, the same in every
process). The main document records N, and a reader reads the memories of every
shard it lists wherever they are (``attach_memories``), so a memory written under
another shard count is still found, then written where it belongs. With N = 0 the
memories stay in the main document (``encode``: versions 1 and 2 only had that).

The main document also records, per shard, how many memories its writer knew the
shard to hold (``memories_per_shard``; version 3 documents written before it have
none): an absent shard object reads as an empty one, so without it a deleted shard
lost its services' memories without a word. Heteroscale never deletes a shard (a
lowered count writes the old ones empty), so a shard recorded holding memories that
is absent was deleted by someone else, and its reader says so
(``reconciler.apply.statestore``). The record is what the shards held before the
writer's own round of shard writes (the state object is written first), so it lags
that round by one write: it never names a shard that did not hold memories. A record
that does not read is left out and said (``StoredDocument.problems``), never the
reason to refuse the document: it is advisory.

Every document carries ``schema`` and ``version`` (``READABLE_VERSIONS``,
``SHARD_READABLE_VERSIONS``): one of another schema or version is refused
(``StateFormatError``), never half-read; a memory shard that cannot be read loses
only its own services' memories. Non-finite floats (the forecaster's NaN "not yet")
are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the documents stay
strict JSON. Sizes are bounded: every time series is trimmed to the longest window
the schema allows (an hour) and a count cap; planner memories are stored compressed
(base64 of zlib'd JSON); each document holds as many memories as fit under
``MAX_STATE_BYTES``, service by service in name order, the others left out (counted;
those services' planners start afresh after a restart). Without any memory, a main
document over the limit raises ``StateTooLarge`` (the caller reports it and keeps the
old object). A state holds at most ``MAX_SERVICES`` services, the first in name order,
the others left out and named (``EncodedState.services_left_out``): the reader refuses
a document of more whole.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import types
import typing
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.desired.loader import DesiredState
from reconciler.desired.models import HOUR_S
from reconciler.plan import Plan
from reconciler.policy.base import PolicyHistory, Recommendation
from reconciler.policy.capacity import LatencyCorrection, LengthHistogram, RequestMix
from reconciler.policy.forecast import ForecastState
from reconciler.policy.planner import Backlog, KeptCapacity, PlannerMemory
from reconciler.strict_json import DuplicateKeyError, loads_unique
from reconciler.text_safety import cut, visible

SCHEMA = "heteroscale.io/reconciler-state"
VERSION = 3
# Version 1 stored each planner memory as a JSON object; 2 stores it compressed (a
# string, ``_pack``); 3 records ``memory_shards`` (0: the memories are in the main
# document, as in 1 and 2). All three are read.
READABLE_VERSIONS = (1, 2, 3)
# A memory shard: its own schema, so it can never be read as a main document.
SHARD_SCHEMA = "heteroscale.io/reconciler-memories"
SHARD_VERSION = 1
SHARD_READABLE_VERSIONS = (1,)
# A ConfigMap holds at most 1 MiB, metadata included; each document stays under this.
# A service's windows take about 0.5 KB; its planner memory, about 10 KB of JSON once
# it holds its headroom errors, is stored compressed (``_pack``): the 8-hour azure-x50
# day leaves 4,246 bytes per service in all, so 192 services keep theirs in one
# document (``benchmarks/bench_state.py``); the memory shards hold the rest.
MAX_STATE_BYTES = 800 * 1024
# Memory shards per cluster when nothing else is said (``--state-memory-shards``), and
# at most: every shard is an object RBAC must name, so the set stays finite.
DEFAULT_MEMORY_SHARDS = 8
MAX_MEMORY_SHARDS = 64
# Every window is at most an hour (``WindowSeconds``); one entry older than that is
# kept as the value in force at a window's start.
KEEP_S = float(HOUR_S)
MAX_ENTRIES = 1000  # per series: an hour at a 3.6 s cycle
MAX_SERVICES = 1000
# Per memory shard (shard k at index k), how many planner memories it holds; None
# where that is not known.
MemoriesPerShard = tuple[int | None, ...]


class StateFormatError(ValueError):
    """The stored document is not a state this version can read (corrupt, foreign
    schema or version, oversized). The message quotes what the document holds (a
    service name, a version, a histogram's bounds), which anyone who may edit the
    ConfigMap wrote: it is cut to ``MESSAGE_CHARS`` and its control and invisible
    characters shown escaped (``text_safety``), so it can neither flood nor forge the
    log line or ``status`` that reports it."""

    MESSAGE_CHARS = 500

    def __init__(self, message: str) -> None:
        super().__init__(visible(cut(message, self.MESSAGE_CHARS)))


class StateTooLarge(ValueError):
    """Even without planner memories the state exceeds ``MAX_STATE_BYTES``."""


@dataclass(frozen=True)
class Revision:
    """A desired-state revision: a Git commit, or a content hash in directory mode."""

    kind: str  # "git" | "content"
    id: str
    label: str = ""


@dataclass(frozen=True)
class AppliedPlan:
    """Which plan was last applied: a hash of its groups, the revision it came from."""

    id: str
    revision: str
    applied_at_s: float


@dataclass(frozen=True)
class DurableState:
    cluster: str
    saved_at_s: float
    writer: str = ""
    revision: Revision | None = None
    histories: Mapping[str, PolicyHistory] = field(default_factory=dict)
    last_plan: AppliedPlan | None = None


# ------------------------------------------------------------------- identities


def revision_of(state: DesiredState) -> Revision:
    """The Git commit the state was read from, else a hash of its parsed content."""
    if state.revision:
        return Revision("git", state.revision, state.source_label)
    content = {
        "files": {path: parsed.data for path, parsed in sorted(state.files.items())},
        "templates": dict(sorted(state.templates.items())),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode())
    return Revision("content", "sha256:" + digest.hexdigest(), state.source_label)


def plan_identity(plan: Plan) -> str:
    """A stable hash of what the plan makes the cluster look like (its groups)."""
    groups = sorted(
        (dataclasses.asdict(g) for g in plan.groups),
        key=lambda g: (g["service"], g["group_id"]),
    )
    return "sha256:" + hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()


def next_applied_plan(
    previous: AppliedPlan | None, identity: str, changed: bool, revision: str, now_s: float
) -> AppliedPlan:
    """The applied-plan record after a plan was applied: a new one (applied now) when
    the plan changed something, is another plan than the recorded one, or comes from
    another revision (a revision that changes only a pod template, or nothing at all,
    is applied too); else the recorded one, so its time stays when that plan was
    first applied."""
    if changed or previous is None or previous.id != identity or previous.revision != revision:
        return AppliedPlan(identity, revision, now_s)
    return previous


# ----------------------------------------------------------------- floats


def _f(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise StateFormatError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        # JSON integers are unbounded: a hand-edited 10**400 must be a format error,
        # not an OverflowError traceback.
        try:
            return float(value)
        except OverflowError:
            raise StateFormatError(f"{where}: a number too large for a float") from None
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    raise StateFormatError(f"{where}: expected a number, got {type(value).__name__}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateFormatError(f"{where}: expected an integer")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise StateFormatError(f"{where}: expected a list")
    if len(value) > MAX_ENTRIES * 4:
        raise StateFormatError(f"{where}: {len(value)} entries, more than any window keeps")
    return value


# ------------------------------------------------- planner memory (typed dataclasses)

# The planner memory is frozen dataclasses of floats, ints and tuples of them; each
# class is named here, so decoding never instantiates anything else.
STORABLE_PLANNER_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        PlannerMemory,
        ForecastState,
        LatencyCorrection,
        RequestMix,
        LengthHistogram,
        KeptCapacity,
        Backlog,
    )
}


def _encode_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__name__ not in STORABLE_PLANNER_TYPES:
            raise TypeError(f"cannot store a {type(value).__name__}")
        return {f.name: _encode_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return _f(value)
    raise TypeError(f"cannot store a {type(value).__name__}")


def _decode_typed(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode_typed(inner, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        items = _list(value, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise StateFormatError(f"{where}: expected {len(args)} items")
        return tuple(
            _decode_typed(a, v, f"{where}[{i}]")
            for i, (a, v) in enumerate(zip(args, items, strict=True))
        )
    if hint is float:
        return _num(value, where)
    if hint is int:
        return _int(value, where)
    if isinstance(hint, type) and hint.__name__ in STORABLE_PLANNER_TYPES:
        return _decode_dataclass(hint, value, where)
    raise StateFormatError(f"{where}: cannot read a {hint!r}")


def _decode_dataclass(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise StateFormatError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _decode_typed(hints[f.name], value[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # the class's own validation
        raise StateFormatError(f"{where}: {exc}") from None


# A planner memory is mostly floats printed in full, which compress about 2x; it is
# stored as base64 of zlib'd JSON. Reading one back is bounded, since a corrupt or
# hostile object could claim to unpack to any size: a memory is about 12 KB of JSON,
# this is hundreds of times that.
_UNPACKED_LIMIT = 4 * 1024 * 1024
# And every memory one read of a cluster's state unpacks (the main document's and
# every memory shard's it lists, which that document names: up to MAX_MEMORY_SHARDS),
# together: a thousand services' memories after a day at the default cycle are ~13 MB
# of JSON holding ~1.2 million numbers. The numbers are counted too: a hostile memory
# of "0," repeated packs a number into two bytes (an honest one takes ~12), and each
# costs a float object once read. With a limit per document only, 64 shards of four
# such memories each took 6 minutes and 25 GB to read.
_LOAD_UNPACKED_LIMIT = 32 * 1024 * 1024
_LOAD_NUMBERS = MAX_SERVICES * 4000


class _OverBudget(Exception):
    """Raised from within ``json.loads`` once the numbers a budget allows are read."""


class UnpackBudget:
    """What one read of a cluster's state may still unpack, its planner memories
    together (``_LOAD_UNPACKED_LIMIT`` bytes, ``_LOAD_NUMBERS`` numbers): the reader
    passes one to the main document's decode and every shard's."""

    def __init__(self) -> None:
        self.bytes_left = _LOAD_UNPACKED_LIMIT
        self.numbers_left = _LOAD_NUMBERS

    def unpack(self, value: Any, where: str) -> Any:
        """The memory's JSON object (a version-1 object as it is, bounded by its
        document's size; a packed string read back); ``StateFormatError`` for anything
        else, beyond ``_UNPACKED_LIMIT`` or beyond what is left."""
        if not isinstance(value, str):
            return value  # version 1, or a malformed value _decode_dataclass refuses
        limit = min(self.bytes_left, _UNPACKED_LIMIT)
        try:
            inflate = zlib.decompressobj()
            text = inflate.decompress(base64.b64decode(value, validate=True), limit + 1)
        except (ValueError, zlib.error) as exc:
            raise StateFormatError(f"{where}.planner: not a packed memory ({exc})") from None
        if len(text) > limit or inflate.unconsumed_tail or not inflate.eof:
            raise StateFormatError(
                f"{where}.planner: not a whole memory within the limit ({limit:,} bytes left)"
            )
        self.bytes_left -= len(text)

        def counted(parse: Callable[[str], float | int]) -> Callable[[str], float | int]:
            def number(literal: str) -> float | int:
                self.numbers_left -= 1
                if self.numbers_left < 0:
                    raise _OverBudget
                return parse(literal)

            return number

        try:
            return loads_unique(text, parse_int=counted(int), parse_float=counted(float))
        except _OverBudget:
            raise StateFormatError(
                f"{where}.planner: beyond the {_LOAD_NUMBERS:,} numbers the planner "
                "memories of one state may hold together"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise StateFormatError(f"{where}.planner: not a packed memory ({exc})") from None


def _pack(memory: dict[str, Any]) -> str:
    return base64.b64encode(zlib.compress(_dumps(memory).encode(), 6)).decode("ascii")


# ------------------------------------------------------------------- histories


def _trim(series: tuple[Any, ...], now_s: float) -> tuple[Any, ...]:
    """Entries within ``KEEP_S`` (plus the one in force at its start), at most
    ``MAX_ENTRIES``; every series is sorted by time, its first item."""
    first = 0
    for i, item in enumerate(series):
        if item[0] >= now_s - KEEP_S:
            first = max(0, i - 1)
            break
    else:
        first = max(0, len(series) - 1)
    return series[first:][-MAX_ENTRIES:]


def _encode_history(h: PolicyHistory, now_s: float) -> dict[str, Any]:
    """The history without its planner memory (``null``: ``encode_state`` places it)."""
    recs = _trim(tuple((r.at_s, r.prefill, r.decode) for r in h.recommendations), now_s)
    return {
        "recommendations": [[_f(at), p, d] for at, p, d in recs],
        "last_change_at_s": None if h.last_change_at_s is None else _f(h.last_change_at_s),
        "ttft_ms": [[_f(a), _f(v)] for a, v in _trim(h.ttft_ms, now_s)],
        "tbt_ms": [[_f(a), _f(v)] for a, v in _trim(h.tbt_ms, now_s)],
        "kv_usage": [[_f(a), _f(v)] for a, v in _trim(h.kv_usage, now_s)],
        "dynamic_ratio": None if h.dynamic_ratio is None else _f(h.dynamic_ratio),
        "extra": [[k, _f(v)] for k, v in h.extra[:MAX_ENTRIES]],
        "planner": None,
    }


def _pairs(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    out = []
    for i, item in enumerate(_list(value, where)):
        if not isinstance(item, list) or len(item) != 2:
            raise StateFormatError(f"{where}[{i}]: expected [at_s, value]")
        out.append((_num(item[0], f"{where}[{i}]"), _num(item[1], f"{where}[{i}]")))
    return tuple(out)


def _decode_history(value: Any, where: str, budget: UnpackBudget) -> PolicyHistory:
    if not isinstance(value, dict):
        raise StateFormatError(f"{where}: expected an object")
    recs = []
    for i, item in enumerate(_list(value.get("recommendations", []), f"{where}.recommendations")):
        if not isinstance(item, list) or len(item) != 3:
            raise StateFormatError(f"{where}.recommendations[{i}]: expected [at_s, p, d]")
        at = _num(item[0], f"{where}.recommendations[{i}]")
        recs.append(Recommendation(at, _int(item[1], where), _int(item[2], where)))
    extra = []
    for i, item in enumerate(_list(value.get("extra", []), f"{where}.extra")):
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
            raise StateFormatError(f"{where}.extra[{i}]: expected [key, value]")
        extra.append((item[0], _num(item[1], f"{where}.extra[{i}]")))
    last = value.get("last_change_at_s")
    ratio = value.get("dynamic_ratio")
    planner = value.get("planner")
    return PolicyHistory(
        recommendations=tuple(recs),
        last_change_at_s=None if last is None else _num(last, f"{where}.last_change_at_s"),
        ttft_ms=_pairs(value.get("ttft_ms", []), f"{where}.ttft_ms"),
        tbt_ms=_pairs(value.get("tbt_ms", []), f"{where}.tbt_ms"),
        kv_usage=_pairs(value.get("kv_usage", []), f"{where}.kv_usage"),
        dynamic_ratio=None if ratio is None else _num(ratio, f"{where}.dynamic_ratio"),
        extra=tuple(extra),
        planner=None
        if planner is None
        else _decode_dataclass(PlannerMemory, budget.unpack(planner, where), f"{where}.planner"),
    )


# ---------------------------------------------------------------- the documents


def memory_shard_of(service: str, memory_shards: int) -> int:
    """The memory shard holding ``service``'s planner memory: a CRC-32 of its name
    modulo the shard count, the same in every process (unlike ``hash``, salted per
    process)."""
    if memory_shards < 1:
        raise ValueError(f"memory_shards is {memory_shards}: no shard holds a memory")
    return zlib.crc32(service.encode()) % memory_shards


def valid_memory_shards(memory_shards: int) -> int:
    """``memory_shards`` if a shard count this format allows (0..``MAX_MEMORY_SHARDS``);
    ``ValueError`` naming the range otherwise."""
    if isinstance(memory_shards, bool) or not 0 <= memory_shards <= MAX_MEMORY_SHARDS:
        raise ValueError(f"memory_shards must be 0 to {MAX_MEMORY_SHARDS}, got {memory_shards!r}")
    return memory_shards


def _document(
    state: DurableState, memory_shards: int, memories_per_shard: MemoriesPerShard | None
) -> dict[str, Any]:
    now = state.saved_at_s
    recorded = {} if memories_per_shard is None else {"memories_per_shard": memories_per_shard}
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "cluster": state.cluster,
        "saved_at_s": _f(now),
        "writer": state.writer,
        "revision": None if state.revision is None else dataclasses.asdict(state.revision),
        "last_plan": None
        if state.last_plan is None
        else {
            **dataclasses.asdict(state.last_plan),
            "applied_at_s": _f(state.last_plan.applied_at_s),
        },
        "memory_shards": memory_shards,
        **recorded,
        "services": {name: _encode_history(h, now) for name, h in sorted(state.histories.items())},
    }


def _shard_document(cluster: str) -> dict[str, Any]:
    return {"schema": SHARD_SCHEMA, "version": SHARD_VERSION, "cluster": cluster, "memories": {}}


def empty_shard(cluster: str) -> str:
    """The text of a memory shard of ``cluster`` holding no memory (what an absent
    shard object stands for)."""
    return _dumps(_shard_document(cluster))


def _dumps(value: Any) -> str:
    # ASCII only (``ensure_ascii``): a text's length is its size in bytes.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class EncodedState:
    """A state as ``encode_state`` writes it: the main document, the memory shard
    documents (shard k at index k; none with 0 shards), how many services' planner
    memories were left out to stay under ``MAX_STATE_BYTES`` and which services were
    left out whole to stay within ``MAX_SERVICES``."""

    text: str
    shards: tuple[str, ...]
    dropped: int
    # The services past the first ``MAX_SERVICES`` in name order, left out whole (their
    # windows, cooldowns and memories): a reader refuses a document of more.
    services_left_out: tuple[str, ...] = ()
    # How many memories each shard document holds (shard k at index k).
    shard_memories: tuple[int, ...] = ()


def encode_state(
    state: DurableState,
    memory_shards: int,
    *,
    shards_wanted: bool = True,
    memories_per_shard: MemoriesPerShard | None = None,
) -> EncodedState:
    """The state's documents (module docstring). With ``memory_shards`` 0 the memories
    go into the main document, else each into its shard (``memory_shard_of``); either
    way a document takes them in name order while they fit. ``memories_per_shard``:
    what the main document records the shards to hold (one entry per shard, None where
    not known; None: nothing recorded). ``shards_wanted`` False:
    the main document only (no shard documents, nothing counted), for a writer with no
    shard to write, sparing the compression of every memory. Raises ``StateTooLarge``
    when the main document alone is over the limit, ``ValueError`` for a shard count
    outside 0..``MAX_MEMORY_SHARDS``. A state of more than ``MAX_SERVICES`` services
    keeps the first ``MAX_SERVICES`` in name order (``services_left_out`` names the
    others), so that what is written is what ``decode_document`` reads."""
    valid_memory_shards(memory_shards)
    if memories_per_shard is not None and len(memories_per_shard) != memory_shards:
        raise ValueError(
            f"memories_per_shard has {len(memories_per_shard)} entries for {memory_shards} shards"
        )
    state, services_left_out = _within_max_services(state)
    doc = _document(state, memory_shards, memories_per_shard)
    size = len(_dumps(doc))
    if size > MAX_STATE_BYTES:
        raise StateTooLarge(
            f"state of cluster {state.cluster} is {size} bytes without planner memories "
            f"(limit {MAX_STATE_BYTES})"
        )
    if memory_shards and not shards_wanted:
        return EncodedState(_dumps(doc), (), 0, services_left_out)
    memories = [
        (name, _pack(_encode_value(h.planner)))
        for name, h in sorted(state.histories.items())
        if isinstance(h.planner, PlannerMemory)
    ]
    dropped = 0
    if not memory_shards:
        for name, memory in memories:
            # It replaces the ``null`` the document holds (the serialisation of an
            # object is that of its members, so sizes add up exactly).
            grown = len(_dumps(memory)) - len("null")
            if size + grown <= MAX_STATE_BYTES:
                doc["services"][name]["planner"] = memory
                size += grown
            else:
                dropped += 1
        return EncodedState(_dumps(doc), (), dropped, services_left_out)
    shards = [_shard_document(state.cluster) for _ in range(memory_shards)]
    sizes = [len(_dumps(shard)) for shard in shards]
    for name, memory in memories:
        k = memory_shard_of(name, memory_shards)
        held = shards[k]["memories"]
        # A member "name":"memory", and a comma after the first.
        grown = len(_dumps(name)) + 1 + len(_dumps(memory)) + (1 if held else 0)
        if sizes[k] + grown <= MAX_STATE_BYTES:
            held[name] = memory
            sizes[k] += grown
        else:
            dropped += 1
    shard_texts = tuple(_dumps(shard) for shard in shards)
    held = tuple(len(shard["memories"]) for shard in shards)
    return EncodedState(_dumps(doc), shard_texts, dropped, services_left_out, held)


def _within_max_services(state: DurableState) -> tuple[DurableState, tuple[str, ...]]:
    """``state`` with at most ``MAX_SERVICES`` services, the first in name order (as
    the memories that fit are kept), and the names of those left out. The reader
    refuses a document of more whole, and nothing limits a cluster's policies: without
    this, every restart lost every service's windows and memories."""
    if len(state.histories) <= MAX_SERVICES:
        return state, ()
    names = sorted(state.histories)
    kept = {name: state.histories[name] for name in names[:MAX_SERVICES]}
    return dataclasses.replace(state, histories=kept), tuple(names[MAX_SERVICES:])


def encode(state: DurableState) -> tuple[str, int]:
    """One document holding the memories too (no memory shards), and how many
    services' planner memories were left out to fit."""
    encoded = encode_state(state, 0)
    return encoded.text, encoded.dropped


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or len(value) > 1024:
        raise StateFormatError(f"{where}: expected a short string")
    return value


def _parsed(text: str | bytes, schema: str, versions: tuple[int, ...]) -> dict[str, Any]:
    """The JSON object in ``text`` when it is a document of ``schema`` at one of
    ``versions`` within ``MAX_STATE_BYTES``; ``StateFormatError`` otherwise."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_STATE_BYTES:
        raise StateFormatError(f"{size} bytes, more than the limit of {MAX_STATE_BYTES}")
    try:
        doc = loads_unique(text)
    except DuplicateKeyError as exc:
        # The first of the two may be what another reader (an older reconciler, a
        # person) took: a state read two ways is none this reader can trust.
        raise StateFormatError(f"{exc}: read two ways") from None
    except (ValueError, RecursionError) as exc:
        raise StateFormatError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise StateFormatError(f"not a {schema} document")
    version = doc.get("version")
    # ``True == 1`` in Python: a boolean is no version, nor a float that equals one.
    if type(version) is not int or version not in versions:
        raise StateFormatError(
            f"schema version {doc.get('version')!r}; this reconciler reads versions "
            f"{', '.join(map(str, versions))}"
        )
    return doc


@dataclass(frozen=True)
class StoredDocument:
    """What a main document holds (``decode_stored``): the state (with the memories the
    document holds itself), how many memory shards it lists (0 before version 3), and
    how many memories it records each of them to hold (``memories_per_shard``, module
    docstring; None where the document records none, as one written before it)."""

    state: DurableState
    memory_shards: int
    memories_per_shard: MemoriesPerShard | None = None
    # What of the document was read as absent, and why: a ``memories_per_shard`` that
    # does not read (the record only tells a deleted shard from an empty one).
    problems: tuple[str, ...] = ()


def decode_stored(
    text: str | bytes, budget: UnpackBudget | None = None, *, cluster: str | None = None
) -> StoredDocument:
    """The main document ``text`` (``StoredDocument``; its memories unpacked within
    ``budget``: a new one by default); ``StateFormatError`` when it is not one this
    version reads (never any other exception), or, with ``cluster``, when it is another
    cluster's state (a copied or restored object: as ``decode_shard`` refuses a shard
    of another cluster, never its windows and memories for this one's services)."""
    doc = _parsed(text, SCHEMA, READABLE_VERSIONS)
    owner = _str(doc.get("cluster"), "cluster")
    if cluster is not None and owner != cluster:
        raise StateFormatError(f"holds the state of cluster {owner!r}, not {cluster!r}")
    memory_shards = 0
    recorded = None
    problems: tuple[str, ...] = ()
    if doc["version"] >= 3:
        memory_shards = _int(doc.get("memory_shards"), "memory_shards")
        if not 0 <= memory_shards <= MAX_MEMORY_SHARDS:
            raise StateFormatError(
                f"memory_shards: {memory_shards}, expected 0 to {MAX_MEMORY_SHARDS}"
            )
        if "memories_per_shard" in doc:
            # Advisory: it only tells a shard deleted outside heteroscale from an empty
            # one. One that does not read is left out and said, not a reason to lose
            # the windows, the last plan and every memory with the whole document.
            try:
                recorded = _memories_per_shard(doc["memories_per_shard"], memory_shards)
            except StateFormatError as exc:
                problems = (
                    f"{exc}: the state object's record of its memory shards is left out "
                    "(a shard deleted outside heteroscale goes unseen until the next write)",
                )
    services = doc.get("services", {})
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise StateFormatError("services: expected an object of services")
    revision = doc.get("revision")
    if revision is not None:
        if not isinstance(revision, dict) or revision.get("kind") not in ("git", "content"):
            raise StateFormatError("revision: expected {kind: git|content, id, label}")
        revision = Revision(
            revision["kind"],
            _str(revision.get("id"), "revision.id"),
            _str(revision.get("label", ""), "revision.label"),
        )
    last_plan = doc.get("last_plan")
    if last_plan is not None:
        if not isinstance(last_plan, dict):
            raise StateFormatError("last_plan: expected an object")
        last_plan = AppliedPlan(
            _str(last_plan.get("id"), "last_plan.id"),
            _str(last_plan.get("revision"), "last_plan.revision"),
            _num(last_plan.get("applied_at_s"), "last_plan.applied_at_s"),
        )
    budget = budget or UnpackBudget()
    state = DurableState(
        cluster=owner,
        saved_at_s=_num(doc.get("saved_at_s"), "saved_at_s"),
        writer=_str(doc.get("writer", ""), "writer"),
        revision=revision,
        histories={
            _str(name, "services"): _decode_history(h, f"services.{name}", budget)
            for name, h in services.items()
        },
        last_plan=last_plan,
    )
    return StoredDocument(state, memory_shards, recorded, problems)


def _memories_per_shard(value: Any, memory_shards: int) -> MemoriesPerShard:
    """``memories_per_shard`` as read: one entry per listed shard, each a count of
    memories a shard can hold or null (not known to its writer)."""
    where = "memories_per_shard"
    if not isinstance(value, list) or len(value) != memory_shards:
        raise StateFormatError(f"{where}: expected a list of {memory_shards} counts")
    out: list[int | None] = []
    for k, count in enumerate(value):
        if count is not None and not 0 <= _int(count, f"{where}[{k}]") <= MAX_SERVICES:
            raise StateFormatError(f"{where}[{k}]: {count}, expected 0 to {MAX_SERVICES}")
        out.append(count)
    return tuple(out)


def decode_document(
    text: str | bytes, budget: UnpackBudget | None = None, *, cluster: str | None = None
) -> tuple[DurableState, int]:
    """The state in the main document ``text`` and how many memory shards it lists
    (``decode_stored``, which says what it records of the shards too)."""
    stored = decode_stored(text, budget, cluster=cluster)
    return stored.state, stored.memory_shards


def decode(text: str | bytes) -> DurableState:
    """The state in the main document ``text`` (``decode_document``), without the
    memories its shards hold."""
    return decode_document(text)[0]


def decode_shard(
    text: str | bytes, cluster: str, shard: int, budget: UnpackBudget | None = None
) -> dict[str, PlannerMemory]:
    """The planner memories (service -> memory) in memory shard ``shard`` of
    ``cluster``'s state, unpacked within ``budget`` (the one the main document was
    read with: a new one by default); as strict and bounded as ``decode``: ``StateFormatError``
    naming the shard (and the service, for a memory it cannot read) when it is not a
    shard of that cluster this version reads, never any other exception."""
    where = f"memory shard {shard}"
    try:
        doc = _parsed(text, SHARD_SCHEMA, SHARD_READABLE_VERSIONS)
    except StateFormatError as exc:
        raise StateFormatError(f"{where}: {exc}") from None
    owner = _str(doc.get("cluster"), f"{where}: cluster")
    if owner != cluster:
        raise StateFormatError(f"{where}: holds memories of cluster {owner!r}, not {cluster!r}")
    memories = doc.get("memories")
    if not isinstance(memories, dict) or len(memories) > MAX_SERVICES:
        raise StateFormatError(f"{where}: memories: expected an object of services")
    out: dict[str, PlannerMemory] = {}
    budget = budget or UnpackBudget()
    for name, packed in memories.items():
        service = f"{where}: services.{_str(name, f'{where}: services')}"
        if not isinstance(packed, str):
            raise StateFormatError(f"{service}.planner: expected a packed memory")
        memory = budget.unpack(packed, service)
        out[name] = _decode_dataclass(PlannerMemory, memory, f"{service}.planner")
    return out


def attach_memories(
    state: DurableState,
    found: Mapping[int, Mapping[str, PlannerMemory]],
    memory_shards: int,
) -> DurableState:
    """``state`` with the memories read from its shards (``found``: shard -> service ->
    memory). Placement is not checked: a memory is taken from whichever shard holds it
    (written under another shard count), from the shard ``memory_shard_of`` names
    first, else the lowest-numbered. Memories of services ``state`` does not list (a
    service removed since) are left out."""
    histories = dict(state.histories)
    for name, history in state.histories.items():
        home = memory_shard_of(name, memory_shards) if memory_shards else -1
        for k in sorted(found, key=lambda k: (k != home, k)):
            memory = found[k].get(name)
            if memory is not None:
                histories[name] = dataclasses.replace(history, planner=memory)
                break
    return dataclasses.replace(state, histories=histories)


# ------------------------------------------------------------------- merging


def _union(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    by_time = {item[0]: item for item in a}
    by_time.update({item[0]: item for item in b})
    return tuple(by_time[t] for t in sorted(by_time))


def merge_history(stored: PolicyHistory, local: PolicyHistory) -> PolicyHistory:
    """What a replica taking over keeps: the windows' entries of both (the stored
    leader's and its own, planned as a standby), the latest change (a cooldown keeps
    running), and the leader's ratio, extra keys and planner memory."""
    recs = _union(
        tuple((r.at_s, r) for r in local.recommendations),
        tuple((r.at_s, r) for r in stored.recommendations),
    )
    changes = [t for t in (stored.last_change_at_s, local.last_change_at_s) if t is not None]
    return PolicyHistory(
        recommendations=tuple(r for _, r in recs),
        last_change_at_s=max(changes) if changes else None,
        ttft_ms=_union(local.ttft_ms, stored.ttft_ms),
        tbt_ms=_union(local.tbt_ms, stored.tbt_ms),
        kv_usage=_union(local.kv_usage, stored.kv_usage),
        dynamic_ratio=stored.dynamic_ratio
        if stored.dynamic_ratio is not None
        else local.dynamic_ratio,
        extra=stored.extra or local.extra,
        planner=stored.planner if stored.planner is not None else local.planner,
    )
