"""``heteroscale status``: Argo CD style sync and health, per cluster and service.

Sync comes from one dry-run cycle, built and run exactly as ``plan`` does
(``build_loop(dry_run=True)`` then ``run_cycle``), never from a second diff: a service
is OutOfSync when that cycle would change something for it (a group change, an
object write), keeps an object Git has go (a leftover: what a move left behind, or a
group being deleted, until what replaces it serves: a ``kept`` hold says why, and the instances column what it
serves) or is held off one of its objects because someone else changed it
(drift) or because the write was refused (refused: by the API server, or before it
as one no Node could run), or held because such a change refused one of its scale
changes (the loop holds the whole service, ``reconciler.loop``). Health: Degraded
when the service's decision holds for a reason that needs a person (missing
metrics, an invalid revision, drift, a refused write, the planner reporting an
unattainable SLO or a bound below what the SLO needs, read from the decision's
reason and message); Progressing while instances start or drain or objects are kept;
else Healthy.

The applied revision comes from the per-cluster state ConfigMap
(``reconciler.apply.statestore``) and the leader from the Lease, both in the
reconciler's namespace. ``run`` writes it after each acting cycle, ``apply`` after
its own (unless a live ``run`` leader holds the Lease: that leader records its own
cycles); with neither the revision is "unknown".

Exit codes: 0 everything Synced and Healthy, 3 something OutOfSync, 4 all Synced but
something Progressing or Degraded, 1 error (invalid desired state, a cluster or the
reconciler's home API server unreachable).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import typer

from reconciler.commands._options import (
    FormatOpt,
    console,
    report_config_error,
)
from reconciler.commands.reconcile import (
    LeaseRef,
    Settings,
    _checked,
    build_loop,
    home_client,
    with_cycle_options,
    with_lease_options,
)
from reconciler.errors import ConfigError
from reconciler.tables import Column, plain_lines, transition
from reconciler.text_safety import visible

if TYPE_CHECKING:  # the loop pulls in prometheus_client: only when status runs
    from reconciler.loop import ClusterOutcome, CycleResult

Sync = Literal["Synced", "OutOfSync", "Unknown"]
Health = Literal["Healthy", "Progressing", "Degraded", "Unknown"]
SIMULATED = "none (simulated)"
EXIT_OUT_OF_SYNC = 3
EXIT_NOT_HEALTHY = 4

# Markers the planner puts in a decision's message (reconciler.policy.planner, step
# 7 and 8) when the SLO cannot be met: by any instance, or within a bound.
_SLO_MARKERS = (
    ("SLO at risk:", "slo_bound", "a bound keeps a role below what the SLO needs"),
    ("cannot meet it on any instance", "slo_unattainable", "SLO unattainable"),
    ("SLO out of reach,", "slo_unattainable", "SLO unattainable"),
    ("model out of reach:", "slo_model", "instances slower than the correction takes"),
)
DEGRADING = {
    "metrics_missing",
    "decision_failed",
    "invalid_revision",
    "drift",
    "refused",
    "slo_bound",
    "slo_unattainable",
    "slo_model",
    "stuck",
    "deleting",
}


@dataclass
class Hold:
    # metrics_missing | decision_failed | invalid_revision | drift | refused | slo_* |
    # stabilised | kept | stuck | deleting
    kind: str
    why: str

    @property
    def degrading(self) -> bool:
        return self.kind in DEGRADING


@dataclass
class ServiceStatus:
    service: str
    sync: Sync
    health: Health
    reason: str
    message: str
    current: dict[str, dict[str, int]]
    target: dict[str, int]
    # Placed instances per GPU type, per role (several types while a ranking change or
    # a spill is being worked through).
    gpu_types: dict[str, dict[str, int]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    # Per role, the instances serving from leftovers (what a move left behind, or a
    # group being deleted; kept until what replaces them serves): not the service's
    # groups, so not in ``current``.
    left_behind: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, in order


@dataclass
class AppliedRevision:
    revision: str  # the id, "unknown" or SIMULATED
    label: str = ""
    applied_at: str | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.revision in ("unknown", SIMULATED):
            return self.revision + (f" ({self.detail})" if self.detail else "")
        label = f" ({self.label})" if self.label else ""
        when = self.applied_at or f"at an unreadable time ({self.detail})"
        return f"{self.revision[:19]}{label} applied {when}"


@dataclass
class StoredMemories:
    """The planners' memories the state objects hold for one cluster: what a
    restarted reconciler would resume."""

    services: int  # with a stored planner memory
    shards: int  # memory shards the state object lists (0: in the state object)
    problems: list[str] = field(default_factory=list)  # shards that could not be read

    def describe(self) -> str:
        where = f"in {self.shards} memory shards" if self.shards else "in the state object"
        unread = f"; {len(self.problems)} shard(s) unreadable or absent" if self.problems else ""
        return f"{self.services} service(s) {where}{unread}"


@dataclass
class ClusterStatus:
    cluster: str
    outcome: str
    error: str | None
    revision: AppliedRevision
    services: list[ServiceStatus] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    memories: StoredMemories | None = None  # None: simulated, or no state object


@dataclass
class Leader:
    holder: str | None
    renew_time: str | None
    detail: str

    def describe(self) -> str:
        from reconciler.apply.lease import shown_holder

        if self.holder:
            return (
                f"{shown_holder(self.holder)} (renewed {self.renew_time or 'never'}{self.detail})"
            )
        return self.detail


def _iso(at_s: float) -> str | None:
    """``at_s`` as an ISO 8601 UTC time; None when no date shows it: NaN or infinite
    (the state's encoder writes them as "nan", "inf") or outside years 1 to 9999 (a
    writer whose clock, or unit, was off: 1.8e12 is milliseconds)."""
    try:
        return dt.datetime.fromtimestamp(at_s, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return None


# ------------------------------------------------------------------- per service


def _object_changes(outcome: ClusterOutcome, service: str) -> tuple[list[str], list[Hold]]:
    """The cycle's object writes for ``service``, and its objects held off by drift or
    by a refused write."""
    from reconciler.loop.cluster_cycle import drifted_objects

    changes: list[str] = []
    holds: list[Hold] = []
    if outcome.diff is None:
        return changes, holds
    # Objects the same cycle saw changed by someone else (the observation's drift).
    drifted = drifted_objects(outcome.diff)
    for obj in outcome.diff.objects:
        if obj.service != service:
            continue
        if obj.action in ("conflict", "error"):
            # Git says otherwise but the cycle will not write it: out of sync, held. A
            # conflict is someone else's change (drift); an error is a write refused,
            # by the API server or before it (say, a rollout no Node could run after a
            # cluster file's label typo): nothing was changed outside Git.
            kind = "drift" if obj.action == "conflict" else "refused"
            changes.append(" ".join(obj.headline().split()))
            holds.append(Hold(kind, f"{obj.key}: {'; '.join(obj.notes) or obj.action}"))
        elif obj.action == "keep":
            # Git has it go, but the cycle keeps it as it runs (a leftover, until what
            # replaces it serves, or a Deployment being deleted): not as desired, and not for a person to
            # fix, so a change to come and a hold that says why, not drift.
            changes.append(" ".join(obj.headline().split()))
            holds.append(Hold("kept", f"{obj.key}: {obj.notes[0] if obj.notes else 'kept'}"))
        elif obj.key in drifted:
            # A hand edit the decision then held on (e.g. missing metrics keep the
            # current size) writes nothing, yet the live object is not what Git made.
            changes.append(f"Deployment {obj.key} changed outside Git")
            holds.append(Hold("drift", f"{obj.key}: {drifted[obj.key]}"))
        elif obj.changes_something:
            changes.append(" ".join(obj.headline().split()))
    return changes, holds


def service_status(
    outcome: ClusterOutcome, service: str, desired_error: str | None
) -> ServiceStatus:
    plan = outcome.plan
    assert plan is not None
    decision = plan.decisions[service]
    fleet = plan.current.service_fleet(service)
    changes = [" ".join(str(c).split()) for c in plan.changes if c.service == service]
    object_changes, holds = _object_changes(outcome, service)
    # With a Kubernetes backend the object diff is what apply does; the group changes
    # say the same at group level, so keep both lines but count once.
    changes += [c for c in object_changes if c not in changes]
    if decision.reason in ("metrics_missing", "decision_failed", "stabilised"):
        holds.insert(0, Hold(decision.reason, decision.message))
    for marker, kind, what in _SLO_MARKERS:
        if marker in decision.message:
            holds.append(Hold(kind, f"{what}: {decision.message}"))
    if service in plan.held and decision.reason != "decision_failed":
        # A scale change refused because of drift: the whole service waits.
        holds.append(Hold("drift", f"service held: {plan.held[service]}"))
    if desired_error:
        holds.append(Hold("invalid_revision", desired_error))
    if outcome.observation is not None and service in outcome.observation.stuck:
        holds.append(Hold("stuck", outcome.observation.stuck[service]))
    if outcome.observation is not None and service in outcome.observation.deleting:
        holds.append(Hold("deleting", outcome.observation.deleting[service]))
    left_behind: dict[str, int] = {}
    if outcome.observation is not None:
        for instances_ in outcome.observation.left_behind:
            if instances_.service == service:
                left_behind[instances_.role] = (
                    left_behind.get(instances_.role, 0) + instances_.instances
                )
    moving = any(count.starting or count.draining for count in (fleet.prefill, fleet.decode))
    moving = moving or any(h.kind == "kept" for h in holds)
    health: Health = (
        "Degraded" if any(h.degrading for h in holds) else "Progressing" if moving else "Healthy"
    )
    return ServiceStatus(
        service=service,
        sync="OutOfSync" if changes else "Synced",
        health=health,
        reason=decision.reason,
        message=decision.message,
        current={
            role: {
                "ready": count.ready,
                "starting": count.starting,
                "stuck": count.stuck,  # of the starting ones, past their progress deadline
                "draining": count.draining,
            }
            for role, count in (("prefill", fleet.prefill), ("decode", fleet.decode))
        },
        gpu_types={
            role: dict(count.by_type)
            for role, count in (("prefill", fleet.prefill), ("decode", fleet.decode))
        },
        target={"prefill": decision.prefill, "decode": decision.decode},
        changes=changes,
        holds=holds,
        left_behind=left_behind,
    )


# ------------------------------------------------------ the reconciler's home cluster


def read_leader(client: Any, home: LeaseRef, now_s: float) -> Leader:
    from reconciler.apply.kubeclient import NotFound, leases_path
    from reconciler.apply.lease import parse_lease, parse_micro_time

    try:
        record = parse_lease(client.get(leases_path(home.namespace, home.name)))
    except NotFound:
        return Leader(None, None, f"none (no Lease {home.namespace}/{home.name})")
    if not record.holder:
        return Leader(None, record.renew_time, "none (the Lease is released)")
    detail = ""
    renewed_s = parse_micro_time(record.renew_time)  # the one reading the elector uses
    if record.renew_time and renewed_s is None:
        detail = "; renewTime unreadable"
    elif renewed_s is not None:
        age = now_s - renewed_s
        if age > record.duration_s:
            detail = f"; expired {age - record.duration_s:.0f} s ago"
        elif age < 0:
            detail = f"; renewed {-age:.0f} s in the future (a clock ahead?)"
    return Leader(record.holder, record.renew_time, detail)


def read_stored(store: Any, cluster: str) -> tuple[AppliedRevision, StoredMemories | None]:
    """The applied revision and the planner memories the state objects hold for
    ``cluster``, from one read of them (memories None without a readable state
    object: the revision says why)."""
    from reconciler.durable import StateFormatError
    from reconciler.policy.planner import PlannerMemory

    where = store.describe(cluster)
    try:
        stored = store.load(cluster)
    except StateFormatError as exc:
        return AppliedRevision("unknown", detail=f"{where} unreadable: {exc}"), None
    if stored is None:
        return AppliedRevision(
            "unknown", detail=f"no {where}: written by `heteroscale run` and `heteroscale apply`"
        ), None
    held = sum(isinstance(h.planner, PlannerMemory) for h in stored.histories.values())
    shards = store.loaded_memory_shards(cluster) or 0
    memories = StoredMemories(held, shards, list(store.load_problems(cluster)))
    if stored.last_plan is None:
        return AppliedRevision("unknown", detail=f"{where} records no applied plan"), memories
    plan = stored.last_plan
    label = stored.revision.label if stored.revision and stored.revision.id == plan.revision else ""
    applied_at = _iso(plan.applied_at_s)
    # The revision reads, so it is shown; only its time is said to be unreadable.
    detail = "" if applied_at else f"{where}: applied_at_s {plan.applied_at_s!r} is no time"
    return AppliedRevision(plan.revision, label, applied_at, detail), memories


# ---------------------------------------------------------------------- assembly


@dataclass
class Status:
    source: str
    target: str
    simulated: bool
    leader: Leader
    desired_error: str | None
    clusters: list[ClusterStatus]
    errors: list[str]

    @property
    def services(self) -> list[ServiceStatus]:
        return [s for c in self.clusters for s in c.services]

    @property
    def exit_code(self) -> int:
        if self.errors:
            return 1
        if any(s.sync != "Synced" for s in self.services):
            return EXIT_OUT_OF_SYNC
        if any(s.health != "Healthy" for s in self.services):
            return EXIT_NOT_HEALTHY
        return 0

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "simulated": self.simulated,
            "leader": {
                "holder": self.leader.holder,
                "renew_time": self.leader.renew_time,
                "describe": self.leader.describe(),
            },
            "desired_error": self.desired_error,
            "clusters": [
                {
                    "cluster": c.cluster,
                    "outcome": c.outcome,
                    "error": c.error,
                    "revision": asdict(c.revision),
                    "drift": c.drift,
                    "notes": c.notes,
                    "memories": asdict(c.memories) if c.memories else None,
                    "services": [s.to_json() for s in c.services],
                }
                for c in self.clusters
            ],
            # Claims about the whole fleet: unknown (null) where a cluster or the desired
            # state could not be read, not vacuously true over the services that were.
            "synced": None if self.errors else all(s.sync == "Synced" for s in self.services),
            "healthy": None if self.errors else all(s.health == "Healthy" for s in self.services),
            "errors": self.errors,
            "exit_code": self.exit_code,
        }


def cluster_status(
    outcome: ClusterOutcome, result: CycleResult, revision: AppliedRevision
) -> ClusterStatus:
    status = ClusterStatus(outcome.cluster, outcome.outcome, outcome.error, revision)
    if outcome.plan is None:
        return status
    status.services = [
        service_status(outcome, name, result.desired_error)
        for name in sorted(outcome.plan.decisions)
    ]
    drift = outcome.diff.drift if outcome.diff is not None else ()
    if not drift and outcome.observation is not None:
        drift = outcome.observation.drift
    status.drift = [f"{d.kind} {d.name}: {d.detail}" for d in drift]
    # Drift is listed above; the plan repeats it among its notes.
    status.notes = [n for n in outcome.plan.notes if not n.startswith("drift ")]
    return status


def collect_status(settings: Settings, home: LeaseRef) -> Status:
    """One dry-run cycle (plan's code path) plus the Lease and state objects.
    Raises ``ConfigError`` when the desired state is invalid."""
    loop, wiring = build_loop(settings, dry_run=True)
    result = loop.run_cycle()
    errors = [f"cluster {c.cluster}: {c.error}" for c in result.clusters if c.outcome == "error"]
    if result.desired_error and not result.clusters:
        errors.append(result.desired_error)
    store: Any = None
    if wiring.simulated:
        leader = Leader(None, None, SIMULATED)
    else:
        from reconciler.apply.statestore import ConfigMapStateStore

        try:
            client = home_client(settings.kubeconfig, home.context, "status")
            leader = read_leader(client, home, loop.clock())
            store = ConfigMapStateStore(
                client, home.namespace, "heteroscale-status", memory_shards=home.memory_shards
            )
        except Exception as exc:  # any failure to reach the home cluster: exit 1, no traceback
            leader = Leader(None, None, f"error: {type(exc).__name__}: {exc}")
            errors.append(f"Lease {home.namespace}/{home.name}: {type(exc).__name__}: {exc}")
    clusters = []
    for outcome in result.clusters:
        memories: StoredMemories | None = None
        if wiring.simulated:
            revision = AppliedRevision(SIMULATED)
        elif store is None:
            revision = AppliedRevision(
                "unknown", detail="the reconciler's namespace is unreachable"
            )
        else:
            try:
                revision, memories = read_stored(store, outcome.cluster)
            except Exception as exc:  # as above: reported, exit 1
                revision = AppliedRevision("unknown", detail=f"{type(exc).__name__}: {exc}")
                errors.append(f"{store.describe(outcome.cluster)}: {type(exc).__name__}: {exc}")
        clusters.append(cluster_status(outcome, result, revision))
        clusters[-1].memories = memories
    return Status(
        source=result.source_label,
        target=wiring.describe,
        simulated=wiring.simulated,
        leader=leader,
        desired_error=result.desired_error,
        clusters=clusters,
        errors=errors,
    )


# ------------------------------------------------------------------------- text


def format_text(status: Status) -> str:
    from reconciler.apply.cyclereport import cluster_sections  # imports the loop

    out = [f"heteroscale status: {status.source} -> {status.target}"]
    out.append(f"leader: {status.leader.describe()}")
    for cluster in cluster_sections(out, status.desired_error, status.clusters):
        out.append(f"cluster {cluster.cluster}: revision {cluster.revision.describe()}")
        if cluster.memories is not None:
            out.append(f"  planner memories: {cluster.memories.describe()}")
            out.extend(f"    {problem}" for problem in cluster.memories.problems)
        out.extend(f"  {line}" for line in plain_lines(_SERVICE_COLUMNS, cluster.services))
        for s in cluster.services:
            for change in s.changes:
                out.append(f"    {s.service}: change {change}")
            for hold in s.holds:
                out.append(f"    {s.service}: hold ({hold.kind}) {hold.why}")
        out.extend(f"    drift {d}" for d in cluster.drift)
        out.extend(f"    note: {n}" for n in cluster.notes)
    out.append("")
    out.extend(f"error: {e}" for e in status.errors)
    services = status.services
    out_of_sync = sum(s.sync != "Synced" for s in services)
    unhealthy = sum(s.health != "Healthy" for s in services)
    out.append(f"{len(services)} service(s): {out_of_sync} OutOfSync, {unhealthy} not Healthy")
    # Lease holders, drift details and state-object problems quote text anyone with
    # edit rights in the cluster wrote: no escape or line break of theirs may act.
    return "\n".join(visible(line) for line in out)


def _active(s: ServiceStatus, role: str) -> int:
    return s.current[role]["ready"] + s.current[role]["starting"]


def instances(s: ServiceStatus) -> str:
    """Active instances per role and what the decision asks: as ``plan`` shows them;
    a role on several GPU types says how many run on each."""

    def role(name: str) -> str:
        text = f"{name} {transition(_active(s, name), s.target[name])}"
        types = s.gpu_types.get(name, {})
        if len(types) > 1:
            text += " (" + ", ".join(f"{t} {n}" for t, n in sorted(types.items())) + ")"
        if s.left_behind.get(name):
            text += f" (+{s.left_behind[name]} left behind, serving until replaced)"
        return text

    return f"{role('prefill')}, {role('decode')}"


_SERVICE_COLUMNS: tuple[Column[ServiceStatus], ...] = (
    Column("service", lambda s: s.service, "left"),
    Column("sync", lambda s: s.sync, "left"),
    Column("health", lambda s: s.health, "left"),
    Column("instances", instances, "left"),
    Column("reason", lambda s: s.reason, "left"),
)


# ---------------------------------------------------------------------- command


# Each option is defined once, in ``_options``; the cycle's are listed once, in
# ``reconcile._settings`` (``with_cycle_options``).
def register(app: typer.Typer) -> None:
    @app.command()
    # status never takes anything back, nor writes: no --force, --drain-window, --diff-mode
    @with_cycle_options(force=False, drain_window=120.0, diff_mode="auto")
    @with_lease_options
    def status(
        *,
        settings: Settings,
        format: FormatOpt = "text",
        lease: LeaseRef,
    ) -> None:
        """Sync and health per cluster and service (Argo CD style), from one dry-run
        cycle, the state ConfigMaps and the Lease. Exit 0: all Synced and Healthy,
        3: something OutOfSync, 4: all Synced but something Progressing or Degraded,
        1: error."""
        if format not in ("text", "json"):
            raise typer.BadParameter("--format must be text or json")
        settings = _checked(settings)
        try:
            found = collect_status(settings, lease)
        except ConfigError as exc:
            report_config_error(exc)
            raise typer.Exit(1) from None
        if format == "json":
            print(json.dumps(found.to_json(), indent=2))
        else:
            console.print(format_text(found), markup=False, soft_wrap=True, highlight=False)
        raise typer.Exit(found.exit_code)
