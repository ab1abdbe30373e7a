"""The reconciler's durable state (``reconciler.durable``) in ConfigMaps in the
reconciler's own namespace: per cluster one state object, ``heteroscale-state-<cluster>``
(key ``state.json``), and a fixed number of memory shards holding the planners'
memories, ``heteroscale-state-<cluster>-memories-<k>`` (``memory_shard_names``, key
``memories.json``; ``--state-memory-shards``, default ``DEFAULT_MEMORY_SHARDS``; 0
keeps the memories in the state object itself, as before version 3). After the count
is lowered, the shards past it are written empty once (best effort: a Role that no
longer names them gets one warning), so that no old memory is read back if it is
raised again.

Why ConfigMaps there: the reconciler's namespace exists only in the cluster it runs
in, RBAC can name the objects (get/update by ``resourceNames``: the shards are a fixed,
listable set for that reason), and a ConfigMap needs no CRD. All clusters' objects
live next to the Lease, so a replica reads its state from the same API server it
elects through.

Only the leader writes, and every write carries the ``resourceVersion`` it read. A
409 means someone wrote in between (a replica that still believed it led): the
store re-reads and, while this replica still holds the Lease, writes its own state
over the newer version (the leader wins); a replica that lost the Lease drops its
write. A 404 means the object was deleted since (``DeletedSinceRead``: an operator
clearing a corrupt or foreign state): read again, nothing there, so the write creates
it. The memory shards are written the same way (``_write_as_leader``), after the
state object, and only those whose content changed, each at most once every
``MEMORY_WRITE_INTERVAL_S`` of the states' ``saved_at_s``: a crash therefore loses
at most the last five minutes of planner memory (the windows and cooldowns, in the
state object, are written every cycle); a graceful stop writes what was held back
(``flush_memories``, before the Lease is released). An object that cannot be read (corrupt,
oversized, another schema version) is reported by the caller and later overwritten by
the leader; a memory shard that cannot be read loses only its own services' memories
(``load_problems``), never the state. Nor does one that is absent though the state
object records memories in it (``durable``, ``memories_per_shard``: deleted by someone
else, heteroscale never deletes one), but that is said too: read as empty, as it was,
its services' planners started afresh without a word.

Clusters' cycles at once (``run`` reconciles each on a thread of its own): one store
serves them all, and every table of it is keyed by cluster or by one cluster's object
names, each written only by that cluster's cycle (one at a time); the client is
thread-safe. ``flush_memories`` at a stop runs once the loop has waited for the cycles
in flight (``ReconcileLoop.stop_cycles``); a cycle still writing then races it only on
its own cluster's objects, where a conflict is read again and written over.

One other writer: a one-shot ``heteroscale apply`` records the plan and revision it
applied (``reconciler.commands.reconcile.record_applied``), and only while no other
holder's Lease is live. It never writes a whole state of its own: ``update`` reads
the state object, changes the applied-plan identity and the revision, and writes at
the ``resourceVersion`` it read, never touching the memory shards; a conflict reads
again, so the windows a leader stored are kept whatever the interleaving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reconciler.apply.kubeclient import Forbidden, KubeClient, NotFound, ResourceConflict
from reconciler.apply.plancheck import commit_problem
from reconciler.desired.loader import DesiredState, load_desired_state
from reconciler.dns1123 import name_segment, namespace_segment
from reconciler.durable import (
    DEFAULT_MEMORY_SHARDS,
    MAX_MEMORY_SHARDS,
    MAX_SERVICES,
    DurableState,
    EncodedState,
    MemoriesPerShard,
    Revision,
    StateFormatError,
    StoredDocument,
    UnpackBudget,
    attach_memories,
    decode_shard,
    decode_stored,
    empty_shard,
    encode_state,
    memory_shard_of,
    valid_memory_shards,
)
from reconciler.errors import ClusterUnavailable, ConfigError, HeteroscaleError
from reconciler.policy.planner import PlannerMemory
from reconciler.text_safety import cut, visible

log = logging.getLogger("heteroscale.state")

PREFIX = "heteroscale-state-"
KEY = "state.json"
MEMORIES_KEY = "memories.json"
WRITE_ATTEMPTS = 3
# Memories change every cycle: rewriting N shards of up to 800 KiB each cycle would load etcd.
MEMORY_WRITE_INTERVAL_S = 300.0
_MAX_NAME = 253  # a ConfigMap's name is a DNS subdomain
_SHARD_SUFFIX = "-memories-"
_LOOKS_LIKE_A_SHARD = re.compile(r"-memories-[0-9]+$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def configmap_name(cluster: str) -> str:
    """``heteroscale-state-<cluster>``; a cluster name that is not a valid object name
    (or would read as another cluster's memory shard, ``-memories-<k>``) is folded to
    one, with a hash of the original so two names never collide."""
    name = re.sub(r"[^a-z0-9-]+", "-", cluster.lower()).strip("-")
    if name == cluster and len(PREFIX + name) <= _MAX_NAME and not _LOOKS_LIKE_A_SHARD.search(name):
        return PREFIX + name
    return f"{PREFIX}{name[:200]}-{_digest(cluster)}".replace("--", "-")


def memory_shard_names(cluster: str, memory_shards: int) -> tuple[str, ...]:
    """The names of ``cluster``'s memory shards, shard k at index k:
    ``<configmap_name(cluster)>-memories-<k>``. A state object name too long to take
    the suffix is folded first (200 characters and a hash of it), as ``configmap_name``
    folds, so the names stay valid and distinct."""
    base = configmap_name(cluster)
    if len(f"{base}{_SHARD_SUFFIX}{MAX_MEMORY_SHARDS}") > _MAX_NAME:
        base = f"{base[:200]}-{_digest(base)}".replace("--", "-")
    return tuple(f"{base}{_SHARD_SUFFIX}{k}" for k in range(memory_shards))


def _changed(conflict: ResourceConflict) -> str:
    """What happened to an object since it was read, as a conflict's log line says."""
    return "deleted" if isinstance(conflict, DeletedSinceRead) else "changed"


def _rbac_hint(exc: BaseException, cluster: str, memory_shards: int) -> str:
    """For a refusal by RBAC: what to grant (an upgrade from a version without memory
    shards needs the new names in the Role, or ``--state-memory-shards 0``)."""
    if not isinstance(exc, Forbidden):
        return ""
    names = memory_shard_names(cluster, memory_shards)
    return (
        f"; the Role must name every memory shard of cluster {cluster} under "
        f"resourceNames ({names[0]} to {names[-1]}, get and update: deploy/rbac.yaml), "
        "or run with --state-memory-shards 0 to keep the memories in the state object"
    )


class DeletedSinceRead(ResourceConflict):
    """A write at the ``resourceVersion`` read answered 404: the object was deleted
    since. A conflict like any other (the precondition failed): the writer reads again,
    finds no object and creates it."""


def configmaps_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{namespace_segment(namespace)}/configmaps"
    return base if name is None else f"{base}/{name_segment(name, 'ConfigMap')}"


class ConfigMapStateStore:
    """Reads and writes the state objects through one client (the reconciler's home
    cluster: in-cluster, or the Lease's context). ``memory_shards``: how many memory
    shards it writes (None: ``DEFAULT_MEMORY_SHARDS``; 0: memories in the state
    object); it reads as many as the stored state object lists, whatever it writes."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        identity: str,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        holds_lease: Callable[[], bool] | None = None,
        memory_shards: int | None = None,
    ) -> None:
        namespace_segment(namespace)  # InvalidObjectName now, not at the first write
        self.client = client
        self.namespace = namespace
        self.identity = identity
        self.is_leader = is_leader
        # Asked before a write over another's (a conflict): whether this replica still
        # holds the Lease by the API server (``LeaseElector.holds_lease``); None: no
        # election, the local check alone.
        self.holds_lease = holds_lease
        self.memory_shards = valid_memory_shards(
            DEFAULT_MEMORY_SHARDS if memory_shards is None else memory_shards
        )
        # The resourceVersion last read or written, per object name ("" = no object yet).
        self._versions: dict[str, str] = {}
        # Per memory shard name: its text as last read or written (None: no object;
        # not here: unknown). Per cluster: the saved_at_s of its last round of shard
        # writes (``_write_memories``).
        self._shard_texts: dict[str, str | None] = {}
        # Per memory shard name: how many memories it holds as last read or written (0:
        # no object; not here: unknown), what the state object records
        # (``_memories_per_shard``).
        self._shard_memories: dict[str, int] = {}
        self._memories_round_at_s: dict[str, float] = {}
        # Per cluster: what its last ``load`` could not read (memory shards).
        self._load_problems: dict[str, tuple[str, ...]] = {}
        # Per cluster: the state last saved (``flush_memories`` writes its memories).
        self._saved: dict[str, DurableState] = {}
        # Per cluster: the memory shards the state object last read listed.
        self._loaded_shards: dict[str, int] = {}
        # Clusters whose leftover shards (``_leftover_shards``) could not be emptied.
        self._leftovers_given_up: set[str] = set()

    def describe(self, cluster: str) -> str:
        return self._describe_object(configmap_name(cluster))

    def _describe_object(self, name: str) -> str:
        return f"ConfigMap {self.namespace}/{name}"

    def _get(self, name: str) -> dict | None:
        try:
            obj = self.client.get(configmaps_path(self.namespace, name))
        except NotFound:
            self._versions[name] = ""
            return None
        self._versions[name] = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        return obj

    def _load_document(
        self, cluster: str, budget: UnpackBudget | None = None
    ) -> StoredDocument | None:
        """What the state object holds (its memories unpacked within ``budget``); None
        when there is none. ``StateFormatError`` also for a document of another cluster
        than ``cluster``."""
        obj = self._get(configmap_name(cluster))
        if obj is None:
            return None
        text = (obj.get("data") or {}).get(KEY)
        if not isinstance(text, str):
            raise StateFormatError(f"no '{KEY}' key")
        return decode_stored(text, budget, cluster=cluster)

    def load(self, cluster: str, *, with_memories: bool = True) -> DurableState | None:
        """The stored state, None when there is none. Raises ``StateFormatError`` for
        a state object it cannot read or that holds another cluster's state (copied or
        restored under this name), API errors as they come (the caller holds).

        With ``with_memories`` the memory shards the state object lists are read too
        (all of them, wherever a memory lies: ``attach_memories``); one that cannot be
        read (unreadable, or an API error) is left out, its services' planners start
        afresh, and why is listed in ``load_problems``; its object is overwritten by
        the next write."""
        self._load_problems[cluster] = ()
        # One budget for every memory this read unpacks: the state object names the
        # shards, so a budget per document would let it name 64 full ones.
        budget = UnpackBudget()
        document = self._load_document(cluster, budget)
        if document is None:
            return None
        state, memory_shards = document.state, document.memory_shards
        self._loaded_shards[cluster] = memory_shards
        self._load_problems[cluster] = document.problems
        if not with_memories or not memory_shards:
            return state
        found: dict[int, dict[str, PlannerMemory]] = {}
        problems = list(document.problems)
        names = memory_shard_names(cluster, memory_shards)
        for k, name in enumerate(names):
            try:
                found[k] = self._read_shard(name, cluster, k, budget)
            except (StateFormatError, HeteroscaleError, OSError) as exc:
                problems.append(
                    f"{self._describe_object(name)} unreadable, the planner memories it "
                    f"holds are left out (those planners start afresh): {exc}"
                    + _rbac_hint(exc, cluster, memory_shards)
                )
        state = attach_memories(state, found, memory_shards)
        for k, recorded in enumerate(document.memories_per_shard or ()):
            if recorded and k in found and self._shard_texts.get(names[k], "") is None:
                problems.append(self._absent_shard_problem(state, names[k], k, recorded))
        self._load_problems[cluster] = tuple(problems)
        return state

    def _absent_shard_problem(
        self, state: DurableState, name: str, shard: int, recorded: int
    ) -> str:
        """What a load says of memory shard ``shard`` (object ``name``), absent though the
        state object records ``recorded`` memories in it: read as empty, the services
        whose memories it held start their planners afresh. Named: those it is home to
        (``durable.memory_shard_of``) without a memory from any shard now, which may
        include a service that had none."""
        shards = self._loaded_shards.get(state.cluster, 0)
        lost = sorted(
            service
            for service, history in state.histories.items()
            if history.planner is None and memory_shard_of(service, shards) == shard
        )
        named = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        return (
            f"{self._describe_object(name)} absent, though the state object records "
            f"{recorded} planner memories in it (deleted outside heteroscale?): read as "
            "empty, their planners start afresh (the services it is home to without a "
            f"memory now: {named or 'none'})"
        )

    def load_problems(self, cluster: str) -> tuple[str, ...]:
        """What the last ``load`` of ``cluster`` could not read and left out (memory
        shards), one line each with the reason; empty when it read everything."""
        return self._load_problems.get(cluster, ())

    def loaded_memory_shards(self, cluster: str) -> int | None:
        """How many memory shards the state object read last listed (0: the memories
        are in it; None: no state object read)."""
        return self._loaded_shards.get(cluster)

    def _read_shard(
        self, name: str, cluster: str, shard: int, budget: UnpackBudget
    ) -> dict[str, PlannerMemory]:
        self._shard_texts.pop(name, None)  # unknown until read
        self._shard_memories.pop(name, None)
        obj = self._get(name)
        if obj is None:
            self._shard_texts[name] = None
            self._shard_memories[name] = 0
            return {}
        text = (obj.get("data") or {}).get(MEMORIES_KEY)
        if not isinstance(text, str):
            raise StateFormatError(f"memory shard {shard}: no '{MEMORIES_KEY}' key")
        self._shard_texts[name] = text
        memories = decode_shard(text, cluster, shard, budget)
        self._shard_memories[name] = len(memories)
        return memories

    def _memories_per_shard(self, cluster: str) -> MemoriesPerShard | None:
        """What the state object written now records of this store's memory shards:
        how many memories each holds as last read or written (None where neither
        happened yet), before this save's round of shard writes, which may not happen
        or fail part-way (``durable``: never a shard that held no memories). None
        without memory shards."""
        if not self.memory_shards:
            return None
        names = memory_shard_names(cluster, self.memory_shards)
        return tuple(self._shard_memories.get(name) for name in names)

    def save(self, state: DurableState) -> bool:
        """Write ``state`` (only while this replica leads); True when the state object
        was written. The memory shards follow (``_write_memories``): one that cannot be
        written is logged and tried again later, never fails the save. Raises
        ``StateTooLarge`` and API errors (of the state object) other than a lost race."""
        due = self._memories_due(state.cluster, state.saved_at_s)
        encoded = self._encode(
            state,
            self.memory_shards,
            shards_wanted=due,
            memories_per_shard=self._memories_per_shard(state.cluster),
        )
        name = configmap_name(state.cluster)
        if not self._write_as_leader(name, state.cluster, KEY, encoded.text):
            return False
        self._saved[state.cluster] = state
        if due:
            self._write_memories(state.cluster, encoded, state.saved_at_s)
        return True

    def flush_memories(self) -> None:
        """Write the memory shards of every cluster whose last saved state's memories
        wait for the next round (``MEMORY_WRITE_INTERVAL_S``): at a graceful stop, while
        this replica still leads, so a rolling update loses none of them. Errors are
        logged (``_write_memories``, which stops a cluster's round at an API server
        that does not answer), never raised: the process is stopping anyway. The
        caller bounds its wait (``run``: ``FLUSH_WAIT_S``)."""
        for cluster, state in list(self._saved.items()):
            # Shards already holding what this state would write are skipped by
            # ``_write_memories`` (a round that failed part-way is tried again).
            try:
                encoded = self._encode(state, self.memory_shards)
            except ValueError as exc:  # StateTooLarge: that save did not happen either
                log.error(
                    f"{self.describe(cluster)}: planner memories not flushed: {exc}",
                    extra={"event": "state_memories_write_failed", "cluster": cluster},
                )
                continue
            self._write_memories(cluster, encoded, state.saved_at_s)

    def _memories_due(self, cluster: str, now_s: float) -> bool:
        """Whether ``cluster``'s memory shards may be written at ``now_s``: none written
        yet by this store, or the last round ``MEMORY_WRITE_INTERVAL_S`` ago or more (or
        the clock went back)."""
        if not self.memory_shards and not self._leftover_shards(cluster):
            return False
        last_s = self._memories_round_at_s.get(cluster)
        return last_s is None or not 0 <= now_s - last_s < MEMORY_WRITE_INTERVAL_S

    def _leftover_shards(self, cluster: str, written: int | None = None) -> int:
        """How many memory shards past the ``written`` ones (default: this store's
        count) the state object last read listed: left by a larger count."""
        if cluster in self._leftovers_given_up:
            return 0
        written = self.memory_shards if written is None else written
        return max(0, self._loaded_shards.get(cluster, 0) - written)

    def _write_memories(self, cluster: str, encoded: EncodedState, now_s: float) -> None:
        """One round of memory shard writes of ``encoded`` (``_memories_due``; ``now_s``:
        the state's ``saved_at_s``): each shard whose text differs from the stored one (an absent
        object stands for an empty shard), so each is written at most once every
        ``MEMORY_WRITE_INTERVAL_S``; the shards past them that a larger count left are
        written empty. One that cannot be written is logged and tried again at the next
        round."""
        self._memories_round_at_s[cluster] = now_s
        shards = encoded.shards
        empty = empty_shard(cluster)
        # The shards a larger count left (the state object read listed them) are
        # emptied: raised again, that count would read them as their services' home
        # shards, before the shards holding the memories written since.
        texts = (*shards, *(empty,) * self._leftover_shards(cluster, len(shards)))
        held = (*encoded.shard_memories, *(0,) * (len(texts) - len(shards)))
        names = memory_shard_names(cluster, len(texts))
        # Highest shard first, the leftovers last, and the round stops at the first
        # write that fails: a memory moves to a new home when the count changes, and
        # rewriting the shard it leaves before its new home is written lost it for
        # good wherever that write failed (raised from 8 to 16 shards with a Role naming
        # the 8: 24 of 40 memories were left, and back at 8 still 24). A raised count's
        # new shards are the highest, a lowered count's old ones the leftovers, so the
        # homes are written before the shards the memories leave; a memory is read from
        # whichever shard holds it (``durable.attach_memories``). A count changed to one
        # not a multiple or divisor of the old moves some memories to lower shards too:
        # a write failing part-way through that round can still lose those.
        order = [*range(len(shards) - 1, -1, -1), *range(len(shards), len(texts))]
        for k in order:
            name, text = names[k], texts[k]
            stored = self._shard_texts.get(name, "")  # "": unknown, never a shard's text
            if (empty if stored is None else stored) == text:
                continue
            try:
                written = self._write_as_leader(name, cluster, MEMORIES_KEY, text)
            except (HeteroscaleError, OSError) as exc:
                if k >= len(shards) and not isinstance(exc, ClusterUnavailable):
                    # A leftover the Role may no longer name: emptying it is a safeguard
                    # for a later larger count, not worth an error every round.
                    log.warning(
                        f"{self._describe_object(name)}: left by a larger memory shard "
                        f"count, could not be emptied (not tried again): "
                        f"{type(exc).__name__}: {exc}",
                        extra={"event": "state_memories_leftover", "cluster": cluster},
                    )
                    self._leftovers_given_up.add(cluster)
                    return
                log.error(
                    f"{self._describe_object(name)}: planner memories not written, nor the "
                    f"shards below it this round (tried again in "
                    f"{MEMORY_WRITE_INTERVAL_S:.0f} s): "
                    f"{type(exc).__name__}: {exc}" + _rbac_hint(exc, cluster, len(shards)),
                    extra={"event": "state_memories_write_failed", "cluster": cluster},
                )
                return  # the shards below may hold the memories this one was to receive
            if not written:
                return  # no longer the leader, or another writer kept winning
            self._shard_texts[name] = text
            self._shard_memories[name] = held[k]

    def update(
        self, cluster: str, change: Callable[[DurableState | None], DurableState | None]
    ) -> bool:
        """Read-modify-write for a writer that does not own the whole object (``heteroscale
        apply`` recording the plan it applied): read the stored state, let ``change``
        derive the new one from it (None: nothing to write), and write that with the
        ``resourceVersion`` read as a precondition. A 409 (someone wrote in between)
        or a 404 (deleted in between) reads again and derives again from what is there
        now, so the other writer's windows are kept, never overwritten with an older
        copy. ``is_leader`` is asked
        before every attempt (False: nothing written). Only the state object is read
        and written, in the layout it was stored in: ``change`` sees no memory held in
        a memory shard, and those stay as they are.

        True when written. False when ``is_leader`` said no, ``change`` had nothing to
        write, or after ``WRITE_ATTEMPTS`` conflicts. Raises ``StateFormatError`` for a
        stored object it cannot read (left as it is: it may be a newer reconciler's),
        ``StateTooLarge`` and API errors."""
        name = configmap_name(cluster)
        for _ in range(WRITE_ATTEMPTS):
            if not self.is_leader():
                return False
            document = self._load_document(cluster)
            stored = document.state if document else None
            memory_shards = document.memory_shards if document else self.memory_shards
            new = change(stored)
            if new is None:
                return False
            if new.cluster != cluster:
                raise ValueError(f"state of cluster {new.cluster} offered for {cluster}")
            try:
                # The shards are not written: what the object records of them stays.
                encoded = self._encode(
                    new,
                    memory_shards,
                    shards_wanted=False,
                    memories_per_shard=document.memories_per_shard if document else None,
                )
                self._write(name, cluster, KEY, encoded.text)
            except ResourceConflict as exc:
                log.info(
                    f"{self.describe(cluster)}: {_changed(exc)} since read; reading it again",
                    extra={"event": "state_conflict", "cluster": cluster},
                )
                continue
            return True
        return self._gave_up(name, cluster)

    def _write_as_leader(self, name: str, cluster: str, key: str, text: str) -> bool:
        """Write ``text`` under ``key`` of object ``name`` while this replica leads, at
        the version last read; on a conflict re-read the version and write over it (the
        leader wins). True when written, False when no longer the leader or after
        ``WRITE_ATTEMPTS`` conflicts; API errors other than a lost race propagate."""
        for _ in range(WRITE_ATTEMPTS):
            if not self.is_leader():
                log.info(
                    f"{self._describe_object(name)}: not written, this replica no longer leads",
                    extra={"event": "state_not_leader", "cluster": cluster},
                )
                return False
            if name not in self._versions:
                self._get(name)
            try:
                self._write(name, cluster, key, text)
            except ResourceConflict as exc:
                # Someone wrote (or created, or deleted) it since we read: re-read the
                # version and, if still the leader, write ours over it (or create it).
                log.warning(
                    f"{self._describe_object(name)}: {_changed(exc)} since read; re-reading",
                    extra={"event": "state_conflict", "cluster": cluster},
                )
                if self.holds_lease is not None and not self.holds_lease():
                    # The other writer may be the replica that leads now: its state
                    # stands (the old leader's windows written over it five times).
                    log.info(
                        f"{self._describe_object(name)}: not written over, this replica "
                        "does not hold the Lease",
                        extra={"event": "state_not_leader", "cluster": cluster},
                    )
                    return False
                self._get(name)
                continue
            return True
        return self._gave_up(name, cluster)

    def _gave_up(self, name: str, cluster: str) -> bool:
        """Logs that every write attempt lost a race; False (not written)."""
        log.error(
            f"{self._describe_object(name)}: not written after {WRITE_ATTEMPTS} conflicts",
            extra={"event": "state_write_failed", "cluster": cluster},
        )
        return False

    def _encode(
        self,
        state: DurableState,
        memory_shards: int,
        *,
        shards_wanted: bool = True,
        memories_per_shard: MemoriesPerShard | None = None,
    ) -> EncodedState:
        encoded = encode_state(
            state,
            memory_shards,
            shards_wanted=shards_wanted,
            memories_per_shard=memories_per_shard,
        )
        left_out = encoded.services_left_out
        if left_out:
            # Said at write time: a restart would only find them missing.
            shown = ", ".join(left_out[:5])
            more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
            log.warning(
                f"{self.describe(state.cluster)}: {len(left_out)} of {len(state.histories)} "
                f"services left out, a state holds at most {MAX_SERVICES} (the first in name "
                f"order; their windows, cooldowns and planner memories start afresh after a "
                f"restart): {shown}{more}",
                extra={
                    "event": "state_trimmed",
                    "cluster": state.cluster,
                    "services_left_out": len(left_out),
                },
            )
        if encoded.dropped:
            log.warning(
                f"{self.describe(state.cluster)}: the planner memories of {encoded.dropped} "
                f"of {len(state.histories)} services left out to stay under the size limit "
                "(their planners start afresh after a restart)",
                extra={
                    "event": "state_trimmed",
                    "cluster": state.cluster,
                    "dropped": encoded.dropped,
                },
            )
        return encoded

    def _write(self, name: str, cluster: str, key: str, text: str) -> None:
        """One write of object ``name`` at the version last read (a POST when there was
        no object); raises ``ResourceConflict`` when it moved (or appeared) since,
        ``DeletedSinceRead`` (one too) when it was deleted since."""
        version = self._versions[name]
        metadata: dict[str, object] = {"name": name}
        if version:
            metadata["resourceVersion"] = version
        component = "reconciler-state" if key == KEY else "reconciler-memories"
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                **metadata,
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": "heteroscale",
                    "app.kubernetes.io/component": component,
                },
                "annotations": {"heteroscale.io/cluster": cluster},
            },
            "data": {key: text},
        }
        if version:
            try:
                written = self.client.request(
                    "PUT", configmaps_path(self.namespace, name), body=body
                )
            except NotFound as exc:
                # Deleted since read (an operator clearing a corrupt or foreign state, a
                # namespace cleanup): every later PUT at this version would be 404 too.
                # Forgotten, so the caller's re-read finds no object and its retry creates it.
                self._versions[name] = ""
                raise DeletedSinceRead(exc.status, exc.reason, exc.api_message, exc.body) from exc
        else:
            written = self.client.request("POST", configmaps_path(self.namespace), body=body)
        self._versions[name] = str(written.get("metadata", {}).get("resourceVersion", ""))


# --------------------------------------------------------------------- start-up


def candidate_clusters(repo: Path, rev: str | None, only: tuple[str, ...]) -> list[str]:
    """Whose state objects to look at when the desired state cannot be read: the
    ``--cluster`` names, else the names of the cluster files (``clusters/NAME.yaml``)
    at ``rev`` (if it resolves) and in the working tree."""
    if only:
        return list(only)
    names: set[str] = set()
    if rev:
        listing = subprocess.run(
            ["git", "-C", str(repo), "ls-tree", "-z", "--name-only", rev, "clusters/"],
            capture_output=True,
            check=False,
        )
        if listing.returncode == 0:
            for raw in listing.stdout.split(b"\0"):
                path = PurePosixPath(os.fsdecode(raw))
                if path.suffix in (".yaml", ".yml"):
                    names.add(path.stem)
    clusters_dir = repo / "clusters"
    if clusters_dir.is_dir():
        names.update(p.stem for p in clusters_dir.iterdir() if p.suffix in (".yaml", ".yml"))
    return sorted(names)


@dataclass(frozen=True)
class Resumed:
    """The stored last known good desired state the loop starts from."""

    state: DesiredState
    revision: Revision
    cluster: str  # whose state object named it


@dataclass(frozen=True)
class _StoredRevision:
    """A Git revision a cluster's state object names, and when its writer saved it."""

    cluster: str
    revision: Revision
    saved_at_s: float


def resume_desired_state(
    store: ConfigMapStateStore, repo: Path, rev: str | None, only: tuple[str, ...]
) -> tuple[Resumed | None, str]:
    """The newest stored Git revision among the candidate clusters' objects that is
    one to start from (``_not_resumable``), loaded; or None and why not (nothing
    stored, unreadable, a content hash, none resumable, or that revision no longer
    loads). Newest by Git ancestry (``_newest``), never first by a writer's clock: an
    object saved at an older commit by a clock running ahead, or left behind by a
    cluster unreachable since, would roll every cluster back to that commit."""
    found: list[_StoredRevision] = []
    reasons: list[str] = []
    for cluster in candidate_clusters(repo, rev, only):
        try:
            stored = store.load(cluster, with_memories=False)
        except StateFormatError as exc:
            reasons.append(f"{store.describe(cluster)} unreadable: {exc}")
            continue
        if stored is not None and stored.revision is not None:
            found.append(_StoredRevision(cluster, stored.revision, stored.saved_at_s))
    if not found:
        return None, "; ".join(reasons) or "no last known good revision stored"
    commits = [f for f in found if f.revision.kind == "git"]
    if not commits:
        return None, (
            "the stored last known good revision is a content hash: a directory's earlier "
            "content cannot be restored (use --rev for a Git source)"
        )
    resumable = []
    refused = []
    for candidate in commits:
        problem = _not_resumable(repo, candidate.revision.id, rev)
        if problem is None:
            resumable.append(candidate)
        else:
            refused.append(f"{store.describe(candidate.cluster)}: {problem}")
    if not resumable:
        return None, "; ".join(refused)
    chosen, why = _newest(repo, resumable)
    passed_over = f"; passed over: {'; '.join(refused)}" if refused else ""
    log.info(
        f"resuming revision {chosen.revision.id[:12]} stored in "
        f"{store.describe(chosen.cluster)}: {why}{passed_over}",
        extra={"event": "state_resume_chosen", "cluster": chosen.cluster},
    )
    revision = chosen.revision
    try:
        state = load_desired_state(repo, rev=revision.id)
    except ConfigError as exc:
        return None, f"stored revision {revision.id[:12]} does not load either: {exc}"
    # Named as the loader names it: the stored label is text anyone could have written.
    return Resumed(state, Revision("git", revision.id, state.source_label), chosen.cluster), ""


def _newest(repo: Path, stored: list[_StoredRevision]) -> tuple[_StoredRevision, str]:
    """The newest of ``stored`` (each a commit in the history of the revision asked
    for) and why it was chosen. By Git ancestry: the commits none of the others
    descends from (``git merge-base --independent``); when that leaves more than one
    (two sides of a merge, which Git cannot order), the one saved last by its writer's
    clock. Among the objects naming the chosen commit, the one saved last."""
    commits = sorted({s.revision.id for s in stored})
    if len(commits) == 1:
        return max(stored, key=lambda s: s.saved_at_s), "the only stored revision"
    independent = subprocess.run(
        ["git", "-C", str(repo), "merge-base", "--independent", *commits],
        capture_output=True,
        text=True,
        check=False,
    )
    tips = sorted(set(independent.stdout.split()))
    if independent.returncode != 0 or not tips or not set(tips) <= set(commits):
        unordered = f"git merge-base could not order them ({cut(independent.stderr.strip(), 200)})"
        tips = commits
    else:
        shown = ", ".join(tip[:12] for tip in tips)
        unordered = f"Git cannot order {shown} (none descends from another)"
    chosen = max((s for s in stored if s.revision.id in tips), key=lambda s: s.saved_at_s)
    if len(tips) == 1:
        return chosen, (
            f"the newest of {len(commits)} stored revisions by Git ancestry (a descendant "
            "of every other)"
        )
    return chosen, (
        f"{unordered}: the one saved last by its writer's clock (saved_at_s {chosen.saved_at_s})"
    )


def _not_resumable(repo: Path, stored: str, rev: str | None) -> str | None:
    """Why the stored Git revision ``stored`` is no revision to start from, or None.
    Anyone who may edit ConfigMaps in the namespace writes it, so it must be a full
    commit id (never an option or a ref name for Git to resolve) in the history of the
    revision asked for (``rev``; HEAD without one): a commit reconciled from there
    before, not any commit the clone holds (an old one, an unreviewed branch's)."""
    if commit_problem(stored) is not None:
        return f"the stored revision '{visible(cut(stored, 80))}' is not a full commit id"
    wanted = rev or "HEAD"
    ancestry = subprocess.run(
        ["git", "-C", str(repo), "merge-base", "--is-ancestor", stored, wanted],
        capture_output=True,
        check=False,
    )
    if ancestry.returncode != 0:
        return (
            f"the stored revision {stored[:12]} is not in the history of {wanted}: not "
            "resumed (a last known good revision is one reconciled from there)"
        )
    return None
