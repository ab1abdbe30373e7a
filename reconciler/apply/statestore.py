"""The reconciler's durable state (``reconciler.durable``) in one ConfigMap per
cluster, ``heteroscale-state-<cluster>`` in the reconciler's own namespace, key
``state.json``.

Why a ConfigMap there: the reconciler's namespace exists only in the cluster it runs
in, RBAC can name the object (get/update by ``resourceNames``), and a ConfigMap
needs no CRD. All clusters' objects live next to the Lease, so a replica reads its
state from the same API server it elects through.

Only the leader writes, and every write carries the ``resourceVersion`` it read. A
409 means someone wrote in between (a replica that still believed it led): the
store re-reads and, while this replica still holds the Lease, writes its own state
over the newer version (the leader wins); a replica that lost the Lease drops its
write. An object that cannot be read (corrupt, oversized, another schema version)
is reported by the caller and later overwritten by the leader.

One other writer: a one-shot ``heteroscale apply`` records the plan and revision it
applied (``reconciler.commands.reconcile.record_applied``), and only while no other
holder's Lease is live. It never writes a whole state of its own: ``update`` reads
the object, changes the applied-plan identity and the revision, and writes at the
``resourceVersion`` it read; a conflict reads again, so the windows a leader stored
are kept whatever the interleaving.
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
from urllib.parse import quote

from reconciler.apply.kubeclient import KubeClient, NotFound, ResourceConflict
from reconciler.desired.loader import DesiredState, load_desired_state
from reconciler.durable import DurableState, Revision, StateFormatError, decode, encode
from reconciler.errors import ConfigError

log = logging.getLogger("heteroscale.state")

PREFIX = "heteroscale-state-"
KEY = "state.json"
WRITE_ATTEMPTS = 3


def configmap_name(cluster: str) -> str:
    """``heteroscale-state-<cluster>``; a cluster name that is not a valid object name
    is folded to one, with a hash of the original so two names never collide."""
    name = re.sub(r"[^a-z0-9-]+", "-", cluster.lower()).strip("-")
    if name == cluster and len(PREFIX + name) <= 253:
        return PREFIX + name
    digest = hashlib.sha256(cluster.encode()).hexdigest()[:10]
    return f"{PREFIX}{name[:200]}-{digest}".replace("--", "-")


def configmaps_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{quote(namespace)}/configmaps"
    return f"{base}/{quote(name)}" if name else base


class ConfigMapStateStore:
    """Reads and writes the state objects through one client (the reconciler's home
    cluster: in-cluster, or the Lease's context)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        identity: str,
        *,
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.identity = identity
        self.is_leader = is_leader
        # The resourceVersion last read or written, per cluster ("" = no object yet).
        self._versions: dict[str, str] = {}

    def describe(self, cluster: str) -> str:
        return f"ConfigMap {self.namespace}/{configmap_name(cluster)}"

    def _get(self, cluster: str) -> dict | None:
        try:
            obj = self.client.get(configmaps_path(self.namespace, configmap_name(cluster)))
        except NotFound:
            self._versions[cluster] = ""
            return None
        self._versions[cluster] = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        return obj

    def load(self, cluster: str) -> DurableState | None:
        """The stored state, None when there is none. Raises ``StateFormatError`` for
        an object it cannot read, API errors as they come (the caller holds)."""
        obj = self._get(cluster)
        if obj is None:
            return None
        data = obj.get("data") or {}
        text = data.get(KEY)
        if not isinstance(text, str):
            raise StateFormatError(f"no '{KEY}' key")
        return decode(text)

    def save(self, state: DurableState) -> bool:
        """Write ``state`` (only while this replica leads); True when written. Raises
        ``StateTooLarge`` and API errors other than a lost race."""
        text = self._encode(state)
        cluster = state.cluster
        for _ in range(WRITE_ATTEMPTS):
            if not self.is_leader():
                log.info(
                    f"{self.describe(cluster)}: not written, this replica no longer leads",
                    extra={"event": "state_not_leader", "cluster": cluster},
                )
                return False
            if cluster not in self._versions:
                self._get(cluster)
            try:
                self._write(cluster, text)
            except ResourceConflict:
                # Someone wrote (or created) it since we read: re-read the version and,
                # if still the leader, write ours over it.
                log.warning(
                    f"{self.describe(cluster)}: changed since read; re-reading",
                    extra={"event": "state_conflict", "cluster": cluster},
                )
                self._get(cluster)
                continue
            return True
        return self._gave_up(cluster)

    def update(
        self, cluster: str, change: Callable[[DurableState | None], DurableState | None]
    ) -> bool:
        """Read-modify-write for a writer that does not own the whole object (``heteroscale
        apply`` recording the plan it applied): read the stored state, let ``change``
        derive the new one from it (None: nothing to write), and write that with the
        ``resourceVersion`` read as a precondition. A 409 (someone wrote in between)
        reads again and derives again from what is there now, so the other writer's
        windows are kept, never overwritten with an older copy. ``is_leader`` is asked
        before every attempt (False: nothing written).

        True when written. False when ``is_leader`` said no, ``change`` had nothing to
        write, or after ``WRITE_ATTEMPTS`` conflicts. Raises ``StateFormatError`` for a
        stored object it cannot read (left as it is: it may be a newer reconciler's),
        ``StateTooLarge`` and API errors."""
        for _ in range(WRITE_ATTEMPTS):
            if not self.is_leader():
                return False
            new = change(self.load(cluster))
            if new is None:
                return False
            if new.cluster != cluster:
                raise ValueError(f"state of cluster {new.cluster} offered for {cluster}")
            try:
                self._write(cluster, self._encode(new))
            except ResourceConflict:
                log.info(
                    f"{self.describe(cluster)}: changed since read; reading it again",
                    extra={"event": "state_conflict", "cluster": cluster},
                )
                continue
            return True
        return self._gave_up(cluster)

    def _gave_up(self, cluster: str) -> bool:
        """Logs that every write attempt lost a race; False (not written)."""
        log.error(
            f"{self.describe(cluster)}: not written after {WRITE_ATTEMPTS} conflicts",
            extra={"event": "state_write_failed", "cluster": cluster},
        )
        return False

    def _encode(self, state: DurableState) -> str:
        text, dropped = encode(state)
        if dropped:
            log.warning(
                f"{self.describe(state.cluster)}: the planner memories of {dropped} of "
                f"{len(state.histories)} services left out to stay under the size limit "
                "(their planners start afresh after a restart)",
                extra={"event": "state_trimmed", "cluster": state.cluster, "dropped": dropped},
            )
        return text

    def _write(self, cluster: str, text: str) -> None:
        """One write at the version last read (a POST when there was no object); raises
        ``ResourceConflict`` when it moved (or appeared) since."""
        name = configmap_name(cluster)
        version = self._versions[cluster]
        metadata: dict[str, object] = {"name": name}
        if version:
            metadata["resourceVersion"] = version
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                **metadata,
                "namespace": self.namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": "heteroscale",
                    "app.kubernetes.io/component": "reconciler-state",
                },
                "annotations": {"heteroscale.io/cluster": cluster},
            },
            "data": {KEY: text},
        }
        if version:
            written = self.client.request("PUT", configmaps_path(self.namespace, name), body=body)
        else:
            written = self.client.request("POST", configmaps_path(self.namespace), body=body)
        self._versions[cluster] = str(written.get("metadata", {}).get("resourceVersion", ""))


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


def resume_desired_state(
    store: ConfigMapStateStore, repo: Path, rev: str | None, only: tuple[str, ...]
) -> tuple[Resumed | None, str]:
    """The newest stored Git revision among the candidate clusters' objects, loaded;
    or None and why not (nothing stored, unreadable, a content hash, or that revision
    no longer loads)."""
    found: list[tuple[float, str, Revision]] = []
    reasons: list[str] = []
    for cluster in candidate_clusters(repo, rev, only):
        try:
            stored = store.load(cluster)
        except StateFormatError as exc:
            reasons.append(f"{store.describe(cluster)} unreadable: {exc}")
            continue
        if stored is not None and stored.revision is not None:
            found.append((stored.saved_at_s, cluster, stored.revision))
    if not found:
        return None, "; ".join(reasons) or "no last known good revision stored"
    _, cluster, revision = max(found, key=lambda f: f[0])
    if revision.kind != "git":
        return None, (
            f"the stored last known good revision is a content hash ({revision.label}): "
            "a directory's earlier content cannot be restored (use --rev for a Git source)"
        )
    try:
        state = load_desired_state(repo, rev=revision.id)
    except ConfigError as exc:
        return None, f"stored revision {revision.id[:12]} does not load either: {exc}"
    return Resumed(state, revision, cluster), ""
