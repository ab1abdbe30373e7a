"""Decode generations: a decode pool split into sub-pools whose sequences stay put.

A decode request runs on the instance it was admitted to until it finishes. The fluid
model keeps that by splitting each decode pool (one per GPU type) into *generations*:
groups of instances with one per-instance load, each with its own decode clock ``psi``
and its own cohorts, hence its own batch and step time. A generation is born empty when
instances become ready (all instances ready in one second form one generation) and
takes only new admissions; the instances that start draining are split off (a share of
every cohort, the generation's per-instance load being equal, so the split is exact)
into a generation that gets no admissions and keeps its sequences until they finish.

Admissions reach the generations through a router that fills the least loaded first
(water-filling on sequences per instance) as the instances last reported their load,
``staleness`` seconds ago (0: the current load, a perfect router); the admissions of
the second itself are counted as they are placed. A real instance refuses what it has
no room for, so no generation is given more than its free batch and KV cache.

Generations whose per-instance batch and KV cache agree within ``tolerance`` (relative)
are merged: the cohorts of one are re-based onto the other's clock (``psi_0 += psi_a -
psi_b``, so every cohort keeps the tokens it has generated) and the merged generation
runs on from the same state. That keeps the number of live generations small; at most
``slots`` exist per pool, and when a new one needs room the two closest are merged
anyway (with ``slots = 1`` the pool is the fluid pool of old: new instances relieve its
running sequences at once).

The per-second rows (``SLOT_COLUMNS`` per slot) record each slot's clock advance, step
time, tokens, load and admissions, and the moves between slots at each second's start
(``to``/``frac``: a share ``frac`` of the slot's sequences went to slot ``to``; 1 for a
merge), from which :func:`chase` follows each request's sequence through merges and
splits to its last token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from reconciler.perfmodel.instance import InstancePerf

# numpy's C interpolation, and the ufunc behind np.clip, without their Python wrappers
# (hot loops on tiny arrays; the same results).
try:
    from numpy._core.multiarray import interp as _c_interp  # numpy >= 2
    from numpy._core.multiarray import interp_complex as _c_interp_pair
    from numpy._core.umath import clip as fast_clip  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import interp as _c_interp  # type: ignore[no-redef]
    from numpy.core.multiarray import interp_complex as _c_interp_pair  # type: ignore[no-redef]
    from numpy.core.umath import clip as fast_clip  # type: ignore[no-redef]

_sum = np.add.reduce  # ndarray.sum without its Python wrapper (the same sum)
add, subtract, multiply, divide = np.add, np.subtract, np.multiply, np.divide
# interp on complex values: the real and imaginary curves interpolated in one call.
_interp_pair = cast(Callable[..., np.ndarray], _c_interp_pair)

EPS = 1e-12
# The engine's per-second columns of a decode pool (``d{q}_`` + name), before its slots'
# (``SLOT_COLUMNS`` per slot): what ``DecodeGenerations.advance`` appends for the pool.
POOL_COLUMNS = (
    "tau",  # step time, weighted by tokens
    "alive",  # running sequences
    "kv",  # cached tokens
    "psi",  # the pool's drain clock
    "admitted",  # sequences admitted in the second
    "instances",  # ready + draining
    "tokens",  # decode tokens generated
    "generations",  # live generations
)
# DecodeGenerations.advance keeps scratch arrays for at most this many cohorts (at most
# 256 sizes of 5 arrays, 2.6 MB).
_SCRATCH_KEPT = 256
# The row values (``SLOT_COLUMNS``) of a free slot that nothing moved from.
_FREE_SLOT_ROW = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0)
SLOT_COLUMNS = (
    "dpsi",  # decode clock advance in the second (tokens per running sequence)
    "tau",  # step time (the idle step when nothing runs)
    "tokens",  # decode tokens generated
    "alive",  # running sequences in the second (after its admissions)
    "admitted",  # sequences admitted in the second
    "ready",  # instances taking admissions
    "instances",  # ready + draining
    "gen",  # the generation's id (-1: slot free)
    "to",  # at the second's start a share of this slot's sequences moved to slot `to`
    "frac",  # that share (1: the whole generation, a merge)
)


@dataclass(frozen=True)
class LengthCurves:
    """The output-length distribution every cohort follows (scaled to its own mean), at
    integer lengths ``grid`` = 0 .. max: the survival ``P(L > x)`` and the tokens
    generated per sequence ``E[min(L, x)]``, linear between them."""

    grid: np.ndarray
    survival: np.ndarray
    generated: np.ndarray


def water_fill(
    total: float, levels: Sequence[float], weights: Sequence[float], caps: Sequence[float]
) -> list[float]:
    """Split ``total`` over bins of ``weights`` instances at per-instance ``levels``,
    filling the lowest first so that the bins that receive anything end at one level
    (``a_i = clip(w_i (lam - l_i), 0, cap_i)``, ``sum a_i = total``), none above its cap."""
    n = len(levels)
    out = [0.0] * n
    live = [i for i in range(n) if weights[i] > 0 and caps[i] > EPS]
    if total <= EPS or not live:
        return out
    if len(live) == 1:  # the common case, ahead of the sum (its two answers in one)
        cap = caps[live[0]]
        out[live[0]] = cap if cap <= total else total
        return out
    if sum(caps[i] for i in live) <= total:
        for i in live:
            out[i] = caps[i]
        return out

    def filled(lam: float) -> float:
        return sum(min(max(weights[i] * (lam - levels[i]), 0.0), caps[i]) for i in live)

    points = sorted({levels[i] for i in live} | {levels[i] + caps[i] / weights[i] for i in live})
    lo_point, lo_value = points[0], 0.0
    lam = points[-1]
    for point in points[1:]:
        value = filled(point)
        if value >= total:
            span = value - lo_value
            lam = lo_point + (point - lo_point) * ((total - lo_value) / span if span > 0 else 1.0)
            break
        lo_point, lo_value = point, value
    for i in live:
        out[i] = min(max(weights[i] * (lam - levels[i]), 0.0), caps[i])
    placed = sum(out)
    if placed > 0:  # rounding: place exactly the total
        out = [a * total / placed for a in out]
    return out


@dataclass(frozen=True)
class GenerationsState:
    """A copy of one pool's generations (``DecodeGenerations.snapshot``)."""

    scalars: tuple[float, int]
    lists: dict[str, list[Any]]
    cohorts: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]


class DecodeGenerations:
    """The generations of one decode pool (module docstring)."""

    _LISTS = (
        "gen",
        "ready",
        "draining",
        "psi",
        "born",
        "alive_end",
        "kv_end",
        "batch_ran",
        "tau_ran",
        "inst_ran",
    )

    def __init__(
        self,
        perf: InstancePerf,
        *,
        slots: int,
        staleness: int,
        tolerance: float,
        idle_step_s: float,
        out_p99: float,
        out_max: float,
        lengths: LengthCurves,
    ):
        self.perf = perf
        self.slots = max(1, int(slots))
        self.staleness = max(0, int(staleness))
        self.tolerance = tolerance
        self.idle_step_s = idle_step_s
        self.out_p99 = out_p99
        self.out_max = out_max
        self.lengths = lengths
        # survival + i * generated: one complex interpolation gives both curves, the same
        # bits as two real ones on this unit-spaced grid (numpy divides by the spacing in
        # one, multiplies by its inverse in the other: both exact at 1).
        if not np.array_equal(lengths.grid, np.arange(lengths.grid.size, dtype=np.float64)):
            raise ValueError("LengthCurves.grid must be the integers 0 .. max")
        self._curve_pair = np.empty(lengths.grid.size, dtype=np.complex128)
        self._curve_pair.real = lengths.survival
        self._curve_pair.imag = lengths.generated
        # advance()'s scalar operand of the cohort arithmetic, as a 0-d array: numpy
        # combines one with an array faster than a Python float, which it converts on
        # every call (the same float64 value, so the same bits).
        self._scalar = np.zeros(())
        # ... and the 0-d array its dot products and sums are written into (numpy makes
        # and converts a scalar for each otherwise; the same value).
        self._total = np.zeros(())
        # advance()'s scratch arrays by number of cohorts (``_new_scratch``).
        self._scratch: dict[int, tuple[np.ndarray, ...]] = {}
        # What every ``advance`` reads (the idle clock advance, the length curves), at once.
        self._advance_constants = (
            1.0 / idle_step_s if idle_step_s > 0 else 0.0,
            lengths.grid,
            lengths.survival,
            self._curve_pair,
            out_max,
        )
        k = self.slots
        self.gen = [-1] * k  # generation id per slot, -1 free
        self.ready = [0] * k
        self.draining = [0] * k
        self.drains: list[list[list[float]]] = [[] for _ in range(k)]  # [until clock, count]
        self.psi = [0.0] * k
        self.born = [0] * k
        self.alive_end = [0.0] * k
        self.kv_end = [0.0] * k
        # Per instance, the batch each generation ran in the last second (after that
        # second's admissions) and its step time, on ``inst_ran`` instances (-1: not
        # yet run).
        self.batch_ran = [0.0] * k
        self.tau_ran = [0.0] * k
        self.inst_ran = [-1] * k
        # Per-instance running sequences as reported in the last `staleness` seconds,
        # oldest first (the router reads the oldest).
        self.history: list[list[float]] = [[0.0] * self.staleness for _ in range(k)]
        self.entry = [np.zeros(256) for _ in range(k)]
        self.count = [np.zeros(256) for _ in range(k)]
        self.prompt = [np.zeros(256) for _ in range(k)]
        self.scale = [np.ones(256) for _ in range(k)]
        self.head = [0] * k
        self.tail = [0] * k
        self.clock = 0.0  # the pool's drain clock (``ServiceSim.decode_clock``)
        self.next_id = 0
        # Changes at the coming second's start: slot -> role ("born", "split", "source",
        # "target"), and slot -> (to, frac) moves written into that second's row.
        self.touched: dict[int, str] = {}
        self.moves: dict[int, tuple[int, float]] = {}
        self.used = 0  # slots ever used (a bound for readers of the rows)
        self._free_rows = [list(_FREE_SLOT_ROW) * m for m in range(k + 1)]  # rows of m unused slots

    # ------------------------------------------------------------------ counts

    @property
    def ready_total(self) -> int:
        return sum(self.ready)

    @property
    def draining_total(self) -> int:
        return sum(self.draining)

    def live(self) -> int:
        return len(self.gen) - self.gen.count(-1)

    def _instances(self, k: int) -> int:
        return self.ready[k] + self.draining[k]

    def _load(self, k: int) -> float:
        inst = self._instances(k)
        return self.alive_end[k] / inst if inst > 0 else 0.0

    def set_counts(self, ready: int, draining: int, t: int) -> None:
        """Reconcile with the fleet's counts: drains that ended (the fleet's rule: the
        pool clock reached ``until``, so the earliest first), drains that started (the
        youngest generations' instances first, as the fleet retires the newest), ready
        instances that went without draining (the least loaded first), and new ready
        instances (a new, empty generation)."""
        cur_ready, cur_draining = self.ready_total, self.draining_total
        expected = sum(
            int(c) for drains in self.drains for until, c in drains if self.clock >= until
        )
        finished = min(expected, cur_draining)
        started = draining - cur_draining + finished
        if started < 0:
            finished -= started
            started = 0
        self._release(min(finished, cur_draining))
        begun = min(started, cur_ready)
        if begun > 0:
            self._start_drains(begun, t)
        if started > begun:  # draining instances never seen ready: an empty draining group
            self._add(0, started - begun, t)
        delta = ready - self.ready_total
        if delta < 0:
            self._remove_ready(-delta)
        elif delta > 0:
            self._add(delta, 0, t)

    def _release(self, m: int) -> None:
        while m > 0:
            best: tuple[float, int, int] | None = None
            for k, drains in enumerate(self.drains):
                for i, (until, _c) in enumerate(drains):
                    if best is None or until < best[0]:
                        best = (until, k, i)
            if best is None:
                return
            _until, k, i = best
            entry = self.drains[k][i]
            take = min(m, int(entry[1]))
            entry[1] -= take
            self.draining[k] -= take
            m -= take
            if entry[1] <= 0:
                del self.drains[k][i]

    def _start_drains(self, c: int, t: int) -> None:
        until = self.clock + self.out_p99  # as the fleet computes it
        order = sorted(
            (k for k in range(self.slots) if self.gen[k] >= 0 and self.ready[k] > 0),
            key=lambda k: (-self.born[k], -k),
        )
        for k in order:
            if c <= 0:
                break
            if self.gen[k] < 0 or self.ready[k] == 0:  # merged away to make room
                continue
            take = min(c, self.ready[k])
            c -= take
            total = self._instances(k)
            if take == self.ready[k] and self.draining[k] == 0:  # the whole generation
                self.ready[k] = 0
                self.drains[k].append([until, take])
                self.draining[k] = take
                continue
            role = self.touched.get(k)
            m: int | None = None
            if role == "split":
                m = self.moves[k][0]
            elif role is None:
                m = self._free_slot(protect={k})
            if m is None:  # no slot: the drained instances keep a fluid share of theirs
                self.ready[k] -= take
                self.drains[k].append([until, take])
                self.draining[k] += take
                continue
            f = take / total
            lo, hi = self.head[k], self.tail[k]
            if role == "split":  # a second drain from k at this second: same draining group
                size = hi - lo
                self.count[m][:size] += self.count[k][lo:hi] * f
                self.drains[m][0][1] += take
                self.draining[m] += take
                frac = self.moves[k][1]
                self.moves[k] = (m, frac + (1.0 - frac) * f)
            else:
                self._occupy(m, t)
                self.psi[m] = self.psi[k]
                self._set_cohorts(
                    m,
                    self.entry[k][lo:hi].copy(),
                    self.count[k][lo:hi] * f,
                    self.prompt[k][lo:hi].copy(),
                    self.scale[k][lo:hi].copy(),
                )
                self.drains[m] = [[until, take]]
                self.draining[m] = take
                self.history[m] = list(self.history[k])
                self.moves[k] = (m, f)
                self.touched[k] = "split"
            self.count[k][lo:hi] *= 1.0 - f
            self.inst_ran[k] = self.inst_ran[m] = -1
            self.alive_end[m] += self.alive_end[k] * f
            self.kv_end[m] += self.kv_end[k] * f
            self.alive_end[k] *= 1.0 - f
            self.kv_end[k] *= 1.0 - f
            self.ready[k] -= take

    def _remove_ready(self, c: int) -> None:
        """Ready instances gone without draining (counts set directly): their sequences
        stay with their generation, served by the instances left."""
        order = sorted(
            (k for k in range(self.slots) if self.ready[k] > 0),
            key=lambda k: (self._load(k), -self.born[k], -k),
        )
        for k in order:
            if c <= 0:
                break
            take = min(c, self.ready[k])
            self.ready[k] -= take
            c -= take

    def _add(self, ready: int, draining: int, t: int) -> None:
        """New instances: an empty generation (joining one born at this second)."""
        for k in range(self.slots):
            if (
                self.touched.get(k) == "born"
                and self.born[k] == t
                and self.tail[k] == self.head[k]
                and (self.ready[k] > 0) == (ready > 0)
                and (self.draining[k] > 0) == (draining > 0)
            ):
                self.ready[k] += ready
                self._add_drain(k, draining)
                return
        m = self._free_slot(protect=set())
        if m is None:  # no slot: they join the least loaded generation (a fluid pool)
            live = [k for k in range(self.slots) if self.gen[k] >= 0]
            k = min(live, key=lambda j: (self.ready[j] == 0, self._load(j)))
            self.ready[k] += ready
            self._add_drain(k, draining)
            return
        self._occupy(m, t)
        self.ready[m] = ready
        self._add_drain(m, draining)

    def _add_drain(self, k: int, draining: int) -> None:
        if draining > 0:
            self.drains[k].append([self.clock + self.out_p99, draining])
            self.draining[k] += draining

    def _occupy(self, m: int, t: int) -> None:
        self.gen[m] = self.next_id
        self.next_id += 1
        self.born[m] = t
        self.ready[m] = self.draining[m] = 0
        self.drains[m] = []
        self.psi[m] = 0.0
        self.alive_end[m] = self.kv_end[m] = 0.0
        self.batch_ran[m] = self.tau_ran[m] = 0.0
        self.inst_ran[m] = -1
        self.history[m] = [0.0] * self.staleness
        self.head[m] = self.tail[m] = 0
        self.touched[m] = "born"
        self.used = max(self.used, m + 1)

    def _free(self, k: int) -> None:
        self.gen[k] = -1
        self.inst_ran[k] = -1
        self.ready[k] = self.draining[k] = 0
        self.drains[k] = []
        self.alive_end[k] = self.kv_end[k] = 0.0
        self.head[k] = self.tail[k] = 0

    def _free_slot(self, protect: set[int]) -> int | None:
        """A free slot, or one freed by merging the two closest generations (ready ones
        by per-instance load, else draining ones by drain end); None with one slot."""
        for k in range(self.slots):
            if self.gen[k] < 0 and k not in self.touched:
                return k

        def mergeable(k: int) -> bool:
            return self.gen[k] >= 0 and k not in protect and self.touched.get(k) in (None, "target")

        pure = [k for k in range(self.slots) if mergeable(k) and self.ready[k] > 0]
        pure = [k for k in pure if self.draining[k] == 0]
        best: tuple[float, int, int] | None = None
        for i, a in enumerate(pure):
            for b in pure[i + 1 :]:
                gap = self._distance(a, b, strict=False)
                if best is None or gap < best[0]:
                    best = (gap, a, b)
        if best is None:
            idle = [k for k in range(self.slots) if mergeable(k) and self.ready[k] == 0]
            for i, a in enumerate(idle):
                for b in idle[i + 1 :]:
                    gap = abs(self._drain_end(a) - self._drain_end(b))
                    if best is None or gap < best[0]:
                        best = (gap, a, b)
        if best is None:
            return None
        _gap, a, b = best
        if self.touched.get(b) == "target":  # the source must be untouched
            a, b = b, a
        if self.touched.get(b) == "target":
            return None
        self._merge(b, a)
        return b

    def _drain_end(self, k: int) -> float:
        return min((until for until, _c in self.drains[k]), default=self.clock)

    def _distance(self, a: int, b: int, strict: bool = True) -> float:
        """How far apart two generations were in the last second they ran: per-instance
        batch (after that second's admissions) and step time (which the KV cache also
        sets), relative. When either has not run on its current instances: inf, or
        (``strict`` off) how far apart their running sequences per instance are now."""
        if self.inst_ran[a] != self._instances(a) or self.inst_ran[b] != self._instances(b):
            if strict:
                return float("inf")
            la, lb = self._load(a), self._load(b)
            return abs(la - lb) / max(la, lb, 1e-9)
        la, lb = self.batch_ran[a], self.batch_ran[b]
        ta, tb = self.tau_ran[a], self.tau_ran[b]
        return max(abs(la - lb) / max(la, lb, 1e-9), abs(ta - tb) / max(ta, tb, 1e-12))

    def _set_cohorts(
        self, k: int, entry: np.ndarray, count: np.ndarray, prompt: np.ndarray, scale: np.ndarray
    ) -> None:
        size = max(256, 2 * entry.size)
        for arrays, values, fill in (
            (self.entry, entry, 0.0),
            (self.count, count, 0.0),
            (self.prompt, prompt, 0.0),
            (self.scale, scale, 1.0),
        ):
            grown = np.full(size, fill)
            grown[: values.size] = values
            arrays[k] = grown
        self.head[k], self.tail[k] = 0, entry.size

    def _merge(self, b: int, a: int) -> None:
        """Move generation ``b`` into ``a``: its cohorts re-based onto ``a``'s clock (each
        keeps the tokens it has generated), its instances, drains and load added."""
        lo_a, hi_a, lo_b, hi_b = self.head[a], self.tail[a], self.head[b], self.tail[b]
        if hi_b > lo_b:
            entry = np.concatenate(
                (self.entry[a][lo_a:hi_a], self.entry[b][lo_b:hi_b] + (self.psi[a] - self.psi[b]))
            )
            order = np.argsort(entry, kind="stable")
            self._set_cohorts(
                a,
                entry[order],
                np.concatenate((self.count[a][lo_a:hi_a], self.count[b][lo_b:hi_b]))[order],
                np.concatenate((self.prompt[a][lo_a:hi_a], self.prompt[b][lo_b:hi_b]))[order],
                np.concatenate((self.scale[a][lo_a:hi_a], self.scale[b][lo_b:hi_b]))[order],
            )
        ia, ib = self._instances(a), self._instances(b)
        if ia + ib > 0:
            self.history[a] = [
                (ia * x + ib * y) / (ia + ib)
                for x, y in zip(self.history[a], self.history[b], strict=True)
            ]
        self.ready[a] += self.ready[b]
        self.draining[a] += self.draining[b]
        self.drains[a] = self.drains[a] + self.drains[b]
        self.alive_end[a] += self.alive_end[b]
        self.kv_end[a] += self.kv_end[b]
        self.born[a] = max(self.born[a], self.born[b])
        self.inst_ran[a] = -1
        self._free(b)
        self.moves[b] = (a, 1.0)
        self.touched[b] = "source"
        self.touched.setdefault(a, "target")

    # ------------------------------------------------------------------ one second

    def prepare(self) -> None:
        """At a second's start: generations left without instances hand their sequences
        to the least loaded generation that has instances (none: they wait), and
        generations of equal per-instance load merge."""
        used = range(self.used)
        gen, ready, draining, touched = self.gen, self.ready, self.draining, self.touched
        pure = 0
        for k in used:
            if gen[k] < 0:
                continue
            if ready[k] + draining[k] == 0:
                if k in touched:
                    continue
                targets = [
                    j
                    for j in used
                    if j != k
                    and gen[j] >= 0
                    and ready[j] + draining[j] > 0
                    and touched.get(j) in (None, "target")
                ]
                if targets:
                    self._merge(k, min(targets, key=lambda j: (ready[j] == 0, self._load(j))))
                elif self.tail[k] == self.head[k] or self.alive_end[k] <= EPS:
                    self._free(k)
            elif draining[k] == 0:
                pure += 1
        if self.tolerance < 0 or pure < 2:
            return
        merged = True
        while merged:
            merged = False
            candidates = [
                k
                for k in used
                if gen[k] >= 0
                and ready[k] > 0
                and draining[k] == 0
                and touched.get(k) in (None, "target")
            ]
            for i, a in enumerate(candidates):
                for b in candidates[i + 1 :]:
                    if self._distance(a, b) <= self.tolerance:
                        if touched.get(b) == "target":
                            a, b = b, a
                        if touched.get(b) == "target":
                            continue
                        self._merge(b, a)
                        merged = True
                        break
                if merged:
                    break

    def room(self, reserve: float) -> list[float]:
        """Sequences each slot in use can admit now: free batch and KV cache of its ready
        instances (draining ones keep their share of the generation's load)."""
        max_batch, kv_capacity = self.perf.max_batch, self.perf.kv_capacity_tokens
        gen, ready_of, draining, alive_end, kv_end = (
            self.gen,
            self.ready,
            self.draining,
            self.alive_end,
            self.kv_end,
        )
        out = [0.0] * self.used
        for k in range(self.used):
            ready = ready_of[k]
            if ready == 0 or gen[k] < 0:
                continue
            own = ready / (ready + draining[k])
            free_batch = max_batch * ready - alive_end[k] * own
            free_kv = (kv_capacity * ready - kv_end[k] * own) / reserve
            out[k] = max(0.0, min(free_batch, free_kv))
        return out

    def route(self, total: float, room: Sequence[float]) -> list[float]:
        """The router: ``total`` admissions water-filled over the ready instances by the
        load they reported ``staleness`` seconds ago, none beyond a slot's room (per
        slot in use)."""
        used = self.used
        ready = self.ready
        takers = taker = 0
        for k in range(used):
            if ready[k] > 0 and room[k] > EPS:
                takers += 1
                taker = k
        if takers == 1 and total > EPS:  # water_fill's common case, without its inputs
            out = [0.0] * used
            cap = room[taker]
            out[taker] = cap if cap <= total else total
            return out
        if self.staleness:
            levels = [h[0] for h in self.history[:used]]
        else:
            levels = [self._load(k) for k in range(used)]
        return water_fill(total, levels, [float(r) for r in ready[:used]], room)

    def report(self) -> None:
        """Every instance reports its load at this second's start (after routing)."""
        if self.staleness:
            gen, ready, draining, alive_end = self.gen, self.ready, self.draining, self.alive_end
            for k in range(self.used):
                if gen[k] >= 0:
                    history = self.history[k]
                    history.pop(0)
                    instances = ready[k] + draining[k]  # _load(k), inlined (hot)
                    history.append(alive_end[k] / instances if instances > 0 else 0.0)

    def idle_rows(self, admitted: float, row: list[float]) -> None:
        """A second of a pool that never had an instance (``used`` 0): its drain clock
        moves as ``advance`` moves it, and ``row`` gets the row values ``advance``
        would append, those of an idle pool."""
        self.clock += 1.0 / self.idle_step_s if self.idle_step_s > 0 else 0.0
        row += (self.idle_step_s, 0.0, 0.0, self.clock, admitted, 0.0, 0.0, 0.0)
        row += self._free_rows[self.slots]

    def advance(
        self,
        admitted: Sequence[float] | None,
        admitted_total: float,
        prompt_mean: float,
        length_scale: float,
        row: list[float],
    ) -> tuple[float, float]:
        """Admit (``admitted`` per slot in use, None: nothing; ``admitted_total``: the
        pool's admissions, for its row), then run one second of decode on every
        generation. Appends the pool's row values to ``row``: the engine's pool columns
        (``POOL_COLUMNS``), then ``SLOT_COLUMNS`` per slot. Returns the pool's tokens
        generated and sequences completed."""
        idle_dpsi, grid, survival, curve_pair, out_max = self._advance_constants
        if self.used == 0:  # a pool that never had an instance
            self.idle_rows(admitted_total, row)
            return 0.0, 0.0
        step_time = self.perf.decode_step_scalar_s
        scalar, total, scratch = self._scalar, self._total, self._scratch
        tokens_total = completed_total = alive_total = kv_total = 0.0
        instances_total = tau_tokens = busiest = 0.0
        live = 0
        slot_row: list[float] = []
        inf = math.inf
        clock_step = clock_any = inf
        moves = self.moves
        # The per-slot lists, read once (attribute lookups add up in this loop).
        gens, ready_of, draining_of = self.gen, self.ready, self.draining
        psi_of, head_of, tail_of = self.psi, self.head, self.tail
        entry_of, count_of, prompt_of, scale_of = self.entry, self.count, self.prompt, self.scale
        alive_end, kv_end = self.alive_end, self.kv_end
        batch_ran, tau_ran, inst_ran = self.batch_ran, self.tau_ran, self.inst_ran
        for k in range(self.used):
            gid = gens[k]
            move = moves.get(k) if moves else None
            if gid < 0:
                slot_row += (
                    _FREE_SLOT_ROW
                    if move is None
                    else (*_FREE_SLOT_ROW[:8], float(move[0]), move[1])
                )
                continue
            live += 1
            to, frac = (float(move[0]), move[1]) if move is not None else (-1.0, 0.0)
            admit = admitted[k] if admitted is not None else 0.0
            if admit > EPS:
                tail = tail_of[k]
                if tail < entry_of[k].size:  # _add_cohort's common case, inlined (hot)
                    entry_of[k][tail] = psi_of[k]
                    count_of[k][tail] = admit
                    prompt_of[k][tail] = prompt_mean
                    scale_of[k][tail] = length_scale
                    tail_of[k] = tail + 1
                else:
                    self._add_cohort(k, admit, prompt_mean, length_scale)
            lo, hi = head_of[k], tail_of[k]
            ready = ready_of[k]
            instances = ready + draining_of[k]
            tau = alive = kv = tokens = dpsi = 0.0
            if hi > lo and instances > 0:
                entry = entry_of[k][lo:hi]
                n = count_of[k][lo:hi]
                prompt = prompt_of[k][lo:hi]
                scale = scale_of[k][lo:hi]
                # The arithmetic below writes into scratch arrays of the cohorts' size
                # (numpy fills an array it is handed faster than it makes one; the same
                # bits): x, tokens generated; ahead, x a step on; length, either scaled
                # to each cohort's lengths; weighted and context, products and sums.
                cohorts = hi - lo
                temporaries = scratch.get(cohorts) or self._new_scratch(cohorts)
                x, ahead, length, weighted, context = temporaries
                scalar[()] = psi_of[k]
                x = subtract(scalar, entry, x)
                before = _interp_pair(multiply(x, scale, length), grid, curve_pair, None, None)
                g, gen_before = before.real, before.imag
                alive_n = multiply(n, g, weighted)
                alive = float(_sum(alive_n, out=total))
                # ndarray.dot, not @: without matmul's ufunc overhead, the same bits on
                # these non-negative operands (matmul's sum starts from +0.0, so on signed
                # ones only an exact zero's sign may differ; pinned by tests).
                kv = float(alive_n.dot(add(prompt, x, context), total))
                if alive > EPS:
                    # Predictor-corrector: the step time of the batch in the middle of the
                    # second, not at its start (a sizeable share finishes within it).
                    tau = step_time(alive / instances, kv / instances, kv / alive)
                    scalar[()] = 1.0 / tau
                    ahead = add(x, scalar, ahead)
                    g2 = _c_interp(multiply(ahead, scale, length), grid, survival, None, None)
                    alive_mid = 0.5 * (alive + float(n.dot(g2, total)))
                    kv_mid = 0.5 * (
                        kv
                        + float(multiply(n, g2, weighted).dot(add(prompt, ahead, context), total))
                    )
                    if alive_mid > EPS:
                        tau = step_time(
                            alive_mid / instances, kv_mid / instances, kv_mid / alive_mid
                        )
                    dpsi = 1.0 / tau
                    scalar[()] = dpsi
                    ahead = add(x, scalar, ahead)
                    length = multiply(ahead, scale, length)
                    after = _interp_pair(length, grid, curve_pair, None, None)
                    g2, gen_after = after.real, after.imag
                    completed_total += float(n.dot(subtract(g, g2, weighted), total))
                    gained = subtract(gen_after, gen_before, context)
                    tokens = float(n.dot(divide(gained, scale, gained), total))
                    tokens_total += tokens
                    tau_tokens += tau * tokens
                    if tau > busiest:  # max(busiest, tau)
                        busiest = tau
                    psi_of[k] += dpsi
                    alive_after = multiply(n, g2, weighted)
                    alive_end[k] = float(_sum(alive_after, out=total))
                    kv_end[k] = float(alive_after.dot(add(prompt, ahead, context), total))
                    # Cohorts are oldest first; drop the finished prefix. A scalar scan:
                    # the prefix is short (about a cohort a second), cheaper than a mask.
                    first = lo
                    while first < hi and length[first - lo] >= out_max:
                        first += 1
                    head_of[k] = first
                else:
                    alive_end[k] = kv_end[k] = 0.0
                    head_of[k] = hi
            if tau == 0.0:
                tau = self.idle_step_s  # for plots only
            if instances > 0:
                step = dpsi if dpsi > 0 else idle_dpsi
                # The row's clock is what a sequence admitted in this second advances:
                # on instances with no batch, an idle step's (recorded as 0, a request
                # the per-request view starts on an empty generation never finished).
                dpsi = step
                if alive > EPS and step < clock_any:
                    clock_any = step
                if draining_of[k] > 0 and step < clock_step:
                    clock_step = step
                batch_ran[k] = alive / instances
                tau_ran[k] = tau
            inst_ran[k] = instances
            alive_total += alive
            kv_total += kv
            instances_total += instances
            slot_row += [
                dpsi,
                tau,
                tokens,
                alive,
                admit,
                float(ready),
                float(instances),
                float(gid),
                to,
                frac,
            ]
        slot_row += self._free_rows[self.slots - self.used]
        # The drain clock: a drain's sequences have generated at least its advance (the
        # slowest draining generation's clock), as the fleet's drain rule assumes.
        if clock_step == inf:
            clock_step = clock_any if clock_any < inf else idle_dpsi
        self.clock += clock_step
        if self.touched:
            self.touched = {}
        if moves:
            self.moves = {}
        # The pool's step time: weighted by tokens (without tokens, the busiest
        # generation's or the idle one: plots only).
        row += (
            tau_tokens / tokens_total if tokens_total > 0 else busiest or self.idle_step_s,
            alive_total,
            kv_total,
            self.clock,
            admitted_total,
            instances_total,
            tokens_total,
            float(live),
        )
        row += slot_row
        return tokens_total, completed_total

    def _new_scratch(self, size: int) -> tuple[np.ndarray, ...]:
        """Five arrays of ``size`` for ``advance``'s temporaries (each element written
        before it is read, within one generation's second), kept for the next second
        of that size up to ``_SCRATCH_KEPT`` cohorts (beyond, the arithmetic outweighs
        making them)."""
        arrays = tuple(np.empty(size) for _ in range(5))
        if size <= _SCRATCH_KEPT:
            self._scratch[size] = arrays
        return arrays

    def _add_cohort(self, k: int, count: float, prompt_mean: float, length_scale: float) -> None:
        tail = self.tail[k]
        if tail == self.entry[k].size:
            head = self.head[k]
            live = tail - head
            if live * 2 > self.entry[k].size:
                size = self.entry[k].size * 2
                for arrays, fill in (
                    (self.entry, 0.0),
                    (self.count, 0.0),
                    (self.prompt, 0.0),
                    (self.scale, 1.0),
                ):
                    grown = np.full(size, fill)
                    grown[:live] = arrays[k][head:tail]
                    arrays[k] = grown
            else:
                for arrays in (self.entry, self.count, self.prompt, self.scale):
                    arrays[k][:live] = arrays[k][head:tail]
            self.head[k], tail = 0, live
        self.entry[k][tail] = self.psi[k]
        self.count[k][tail] = count
        self.prompt[k][tail] = prompt_mean
        self.scale[k][tail] = length_scale
        self.tail[k] = tail + 1

    # ------------------------------------------------------------------ state

    def snapshot(self) -> GenerationsState:
        lists: dict[str, list[Any]] = {name: list(getattr(self, name)) for name in self._LISTS}
        lists["drains"] = [[list(d) for d in drains] for drains in self.drains]
        lists["history"] = [list(h) for h in self.history]
        lists["touched"] = sorted(self.touched.items())
        lists["moves"] = sorted(self.moves.items())
        cohorts = tuple(
            (
                self.entry[k][self.head[k] : self.tail[k]].copy(),
                self.count[k][self.head[k] : self.tail[k]].copy(),
                self.prompt[k][self.head[k] : self.tail[k]].copy(),
                self.scale[k][self.head[k] : self.tail[k]].copy(),
            )
            for k in range(self.slots)
        )
        return GenerationsState((self.clock, self.next_id), lists, cohorts)

    def restore(self, state: GenerationsState) -> None:
        self.clock, self.next_id = state.scalars
        for name in self._LISTS:
            setattr(self, name, list(state.lists[name]))
        self.drains = [[list(d) for d in drains] for drains in state.lists["drains"]]
        self.history = [list(h) for h in state.lists["history"]]
        self.touched = dict(state.lists["touched"])
        self.moves = dict(state.lists["moves"])
        for k, (entry, count, prompt, scale) in enumerate(state.cohorts):
            if entry.size:
                self._set_cohorts(k, entry, count, prompt, scale)
                self.used = max(self.used, k + 1)
            else:  # nothing to copy: only [head, tail) is ever read
                self.head[k] = self.tail[k] = 0
        self.used = max(
            self.used, max((k + 1 for k, g in enumerate(self.gen) if g >= 0), default=0)
        )


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SlotCurves:
    """Every slot's per-second rows from second ``start`` to ``end`` (the simulator's
    now), as curves over time: the cumulative decode clock ``clock`` and slow tokens
    ``slow`` (tokens per sequence generated with a step above the SLO) at whole seconds
    ``start .. end``, and for each second the next second at which the slot's generation
    changes or moves (``next_event``)."""

    start: int
    end: int
    dpsi: np.ndarray  # (slots, seconds)
    slow_step: np.ndarray  # dpsi where the step was above the SLO
    clock: np.ndarray  # (slots, seconds + 1)
    slow: np.ndarray
    gen: np.ndarray
    to: np.ndarray
    frac: np.ndarray
    next_event: np.ndarray  # (slots, seconds): absolute second
    flat: np.ndarray  # every slot's clock curve, shifted above the previous slot's
    shift: np.ndarray  # per slot

    @classmethod
    def build(
        cls,
        columns: dict[str, np.ndarray],  # name -> (slots, seconds) from `start`
        start: int,
        end: int,
        tbt_slo_s: float,
    ) -> SlotCurves:
        dpsi = columns["dpsi"]
        slots, seconds = dpsi.shape
        slow_step = dpsi * (columns["tau"] > tbt_slo_s)
        zeros = np.zeros((slots, 1))
        clock = np.concatenate((zeros, dpsi.cumsum(axis=1)), axis=1)
        slow = np.concatenate((zeros, slow_step.cumsum(axis=1)), axis=1)
        gen = columns["gen"]
        to = columns["to"]
        event = np.zeros((slots, seconds), dtype=bool)
        event[:, 1:] = gen[:, 1:] != gen[:, :-1]
        event |= to >= 0
        # next_event[:, s] = the first second after s with an event (end: none).
        at = np.where(event, np.arange(start, end)[None, :], end)
        after = np.minimum.accumulate(at[:, ::-1], axis=1)[:, ::-1]
        next_event = np.concatenate((after[:, 1:], np.full((slots, 1), end)), axis=1)
        shift = np.arange(slots) * (float(clock[:, -1].max(initial=0.0)) + 1.0)
        flat = (clock + shift[:, None]).ravel()
        return cls(
            start,
            end,
            dpsi,
            slow_step,
            clock,
            slow,
            gen,
            to,
            columns["frac"],
            next_event,
            flat,
            shift,
        )

    def column(self, t: np.ndarray) -> np.ndarray:
        """The column of the second each of times ``t`` falls in (clipped to the curves)."""
        column: np.ndarray = fast_clip(
            np.floor(t).astype(np.int64) - self.start, 0, self.dpsi.shape[1] - 1
        )
        return column

    def at(
        self,
        curve: np.ndarray,
        step: np.ndarray,
        g: np.ndarray,
        t: np.ndarray,
        column: np.ndarray | None = None,
        within: np.ndarray | None = None,
    ) -> np.ndarray:
        """``curve`` of slots ``g`` at times ``t`` (linear within a second); ``column``:
        ``self.column(t)``, and ``within``: ``self.within(t, column)``, when the caller
        has them."""
        s = self.column(t) if column is None else column
        if within is None:
            within = self.within(t, s)
        value: np.ndarray = curve[g, s] + within * step[g, s]
        return value

    def within(self, t: np.ndarray, column: np.ndarray) -> np.ndarray:
        """How far into the second of ``column`` each of times ``t`` is."""
        offset: np.ndarray = t - self.start - column
        return offset

    def time_of(self, g: np.ndarray, level: np.ndarray) -> np.ndarray:
        """The first time slot ``g``'s clock reaches ``level`` (within the curve)."""
        seconds = self.clock.shape[1]
        if g.size == 0:
            return np.zeros(0)
        index = self.flat.searchsorted(level + self.shift[g], side="left") - g * seconds
        index = fast_clip(index, 1, seconds - 1)
        below = index - 1
        lo = self.clock[g, below]
        hi = self.clock[g, index]
        rising = hi > lo
        frac = np.where(rising, (level - lo) / np.where(rising, hi - lo, 1.0), 1.0)
        out: np.ndarray = self.start + below + fast_clip(frac, 0.0, 1.0)
        return out


@dataclass(frozen=True)
class Chased:
    """Per request (``n``), summed over its sequences' branches: the weight finished,
    the weight finished within the slow-token allowance, and the weight counted when
    unfinished ones are judged on their tokens so far; per pool the weight-averaged mean
    gap of the finished branches (inf: none finished)."""

    finished: np.ndarray
    within_finished: np.ndarray
    within_so_far: np.ndarray
    pool_weight: list[np.ndarray]
    pool_gap: list[np.ndarray]


def chase(
    curves: SlotCurves,
    request: np.ndarray,
    slot: np.ndarray,
    weight: np.ndarray,
    decode_start: np.ndarray,
    output: np.ndarray,
    allowance: np.ndarray,
    n: int,
    pool_of_slot: np.ndarray,
    pools: int,
    max_rounds: int = 10_000,
    so_far_only: bool = False,
) -> Chased:
    """Follow each sequence (``request``, starting on ``slot`` at ``decode_start`` with
    probability ``weight``; per-request arrays are indexed by ``request``) through its generation's moves until its ``output`` tokens
    are generated: a merge carries it to the target slot; a split carries it there with
    the split's share and leaves the rest. Returns per-request sums (``Chased``).

    ``so_far_only``: only ``within_so_far`` and ``pool_weight`` are summed (the rest stay
    zero, the gaps inf): what judging unfinished requests on their tokens so far reads,
    at a fraction of the cost."""
    finished = np.zeros(n)
    within_finished = np.zeros(n)
    within_so_far = np.zeros(n)
    gap_num = [np.zeros(n) for _ in range(pools)] if not so_far_only else []
    gap_den = [np.zeros(n) for _ in range(pools)] if not so_far_only else []
    origin_pool = pool_of_slot[slot]
    # Each request's weight per pool, summed branch by branch in order from 0 (what
    # np.add.at into zeros gives, bit for bit).
    pool_weight = [
        np.bincount(request[mine], weight[mine], minlength=n)
        for mine in (origin_pool == q for q in range(pools))
    ]
    req, g, w = request, slot, weight.astype(np.float64)
    t0 = fast_clip(decode_start[request].astype(np.float64), curves.start, curves.end)
    pool0 = origin_pool
    remaining = output[req].astype(np.float64)
    slow = np.zeros(req.size)
    end = curves.end
    for _round in range(max_rounds):
        if req.size == 0:
            break
        column = curves.column(t0)
        edge = curves.next_event[g, column]
        within = curves.within(t0, column)
        clock0 = curves.at(curves.clock, curves.dpsi, g, t0, column, within)
        slow0 = curves.at(curves.slow, curves.slow_step, g, t0, column, within)
        seg = curves.clock[g, edge - curves.start] - clock0
        done = remaining <= seg + 1e-9
        if done.any():
            gd = g[done]
            t_end = np.maximum(curves.time_of(gd, clock0[done] + remaining[done]), t0[done])
            slow_total = (
                slow[done] + curves.at(curves.slow, curves.slow_step, gd, t_end) - slow0[done]
            )
            r = req[done]
            ok = slow_total <= allowance[r]
            wd = w[done]
            np.add.at(within_so_far, r, wd * ok)
            if not so_far_only:
                np.add.at(finished, r, wd)
                np.add.at(within_finished, r, wd * ok)
                gap = (t_end - decode_start[r]) / np.maximum(output[r], 1.0)
                for q in range(pools):
                    mine = pool0[done] == q
                    if mine.any():
                        np.add.at(gap_num[q], r[mine], wd[mine] * gap[mine])
                        np.add.at(gap_den[q], r[mine], wd[mine])
        cont = ~done
        if not cont.any():
            break
        req, g, t0, w, pool0 = req[cont], g[cont], t0[cont], w[cont], pool0[cont]
        remaining, slow, edge = remaining[cont], slow[cont], edge[cont]
        slow_now = slow + curves.slow[g, edge - curves.start] - slow0[cont]
        remaining = remaining - seg[cont]
        at_end = edge >= end
        column = fast_clip(edge - curves.start, 0, curves.dpsi.shape[1] - 1)
        to = np.where(at_end, -1, curves.to[g, column]).astype(np.int64)
        frac = np.where(at_end, 0.0, curves.frac[g, column])
        stays = ~at_end & (curves.gen[g, column] == curves.gen[g, column - 1])
        moves = to >= 0
        stay_w = np.where(moves, w * (1.0 - frac), w) * stays
        move_w = np.where(moves, w * frac, 0.0)
        lost = w - stay_w - move_w  # unfinished at the end (or the generation vanished)
        lost_mask = lost > 0
        if lost_mask.any():
            r = req[lost_mask]
            np.add.at(within_so_far, r, lost[lost_mask] * (slow_now[lost_mask] <= allowance[r]))
        keep = stay_w > 0
        shift = move_w > 0
        start_time = edge.astype(np.float64)
        req = np.concatenate((req[keep], req[shift]))
        g = np.concatenate((g[keep], to[shift]))
        t0 = np.concatenate((start_time[keep], start_time[shift]))
        w = np.concatenate((stay_w[keep], move_w[shift]))
        pool0 = np.concatenate((pool0[keep], pool0[shift]))
        remaining = np.concatenate((remaining[keep], remaining[shift]))
        slow = np.concatenate((slow_now[keep], slow_now[shift]))
    pool_gap = (
        [np.full(n, np.inf) for _ in range(pools)]
        if so_far_only
        else [
            np.where(d > 0, num / np.where(d > 0, d, 1.0), np.inf)
            for num, d in zip(gap_num, gap_den, strict=True)
        ]
    )
    return Chased(finished, within_finished, within_so_far, pool_weight, pool_gap)
