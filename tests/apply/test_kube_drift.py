"""Drift against the real API server (v1.20), through the reconcile loop: replicas
changed through the scale subresource (no managed-fields entry) and by another field
manager, what the loop does with each (module doc of reconciler.observe.kubernetes,
"Replica drift"), and what it logs, counts and reports."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubetestkit import (
    ControlPlane,
    create_nodes,
    ensure_namespace,
    list_deployments,
    list_pods,
    make_desired_state,
    wait_for,
)

from reconciler.apply import cyclereport, names
from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import KubeClient, deployments_path
from reconciler.desired import DesiredState
from reconciler.loop import ClusterOutcome, CycleResult, ReconcileLoop
from reconciler.placement.greedy import GreedyPlacer
from reconciler.policy.base import Decision, DecisionInput, PolicyHistory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import StaticMetrics

pytestmark = pytest.mark.kubernetes


@dataclass
class Wants:
    """Asks for a set size; arms the cooldown on a change, as the paper's policy does
    (``last_change_at_s`` = now when the decision differs from what runs)."""

    prefill: int
    decode: int
    name: str = "wants"

    def decide(self, inputs: DecisionInput) -> Decision:
        policy, fleet, _metrics, history, now_s = inputs.unpacked()
        changed = (self.prefill, self.decode) != (fleet.prefill.active, fleet.decode.active)
        return Decision(
            policy.name,
            self.prefill,
            self.decode,
            "baseline",
            f"wants {self.prefill}/{self.decode}",
            history=PolicyHistory(last_change_at_s=now_s if changed else history.last_change_at_s),
        )


@dataclass
class Rig:
    """One cluster of the shared API server, reconciled by a real loop."""

    state: DesiredState
    client: KubeClient
    wants: Wants
    clock: list[float] = field(default_factory=lambda: [1_000_000.0])
    force: bool = False

    @property
    def name(self) -> str:
        (name,) = self.state.clusters
        return name

    def loop(self, *, force: bool = False) -> ReconcileLoop:
        options = ApplyOptions(force=force, soft_scale_in_window_s=0)

        def backend_for(spec: object) -> KubernetesBackend:
            return KubernetesBackend(
                self.client, state=self.state, options=options, clock=lambda: self.clock[0]
            )

        return ReconcileLoop(
            load_desired=lambda: self.state,
            backend_for=backend_for,  # type: ignore[arg-type]
            metrics_for=lambda spec: StaticMetrics(),
            autoscaler=self.wants,
            placer=GreedyPlacer(),
            clock=lambda: self.clock[0],
        )

    def cycle(self, loop: ReconcileLoop) -> tuple[CycleResult, ClusterOutcome]:
        result = loop.run_cycle()
        (outcome,) = result.clusters
        assert outcome.outcome == "ok", outcome.error
        self.clock[0] += 30
        return result, outcome

    def replicas(self) -> dict[str, int]:
        return {
            n: d["spec"]["replicas"] for n, d in list_deployments(self.client, self.name).items()
        }

    def groups(self) -> dict[str, tuple[int, int]]:
        """group id -> (prefill, decode) replicas, as the Deployments say."""
        out: dict[str, list[int]] = {}
        for d in list_deployments(self.client, self.name).values():
            annotations = d["metadata"]["annotations"]
            role = d["metadata"]["labels"]["heteroscale.io/role"]
            sizes = out.setdefault(annotations["heteroscale.io/group-id"], [0, 0])
            sizes[0 if role == "prefill" else 1] = d["spec"]["replicas"]
        return {g: (p, d) for g, (p, d) in out.items()}


@pytest.fixture
def rig(control_plane: ControlPlane, tmp_path: Path, request: pytest.FixtureRequest) -> Rig:
    name = "drift-" + request.node.name.split("_")[-1][:12].lower().replace("_", "-")
    state = make_desired_state(tmp_path, name, affinity="cluster")
    client = control_plane.client()
    ensure_namespace(client, name)
    create_nodes(client, state.clusters[name])
    return Rig(state, client, Wants(4, 8))


def _drift_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "drift"]


def _counter(loop: ReconcileLoop, name: str, **labels: str) -> float:
    value = loop.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _bound_pods(rig: Rig, selector: str) -> int:
    return sum(1 for p in list_pods(rig.client, rig.name, selector) if p["spec"].get("nodeName"))


def _scale_subresource(rig: Rig, deployment: str, replicas: int) -> None:
    """What `kubectl scale` does: a write to the scale subresource."""
    rig.client.request(
        "PATCH",
        deployments_path(rig.name, deployment) + "/scale",
        body={"spec": {"replicas": replicas}},
        content_type="application/merge-patch+json",
    )


@pytest.mark.fault
def test_a_kubectl_scale_is_logged_counted_reported_and_taken_back_in_the_group_shape(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    loop = rig.loop()
    rig.cycle(loop)
    shape = rig.groups()
    assert sorted(shape.values()) == [(2, 4), (2, 4)], shape
    victim = sorted(n for n in rig.replicas() if n.endswith("-d"))[0]
    _scale_subresource(rig, victim, 7)
    # The hand-added instances run (bound to nodes) before the next cycle looks: the
    # placers count instances from the nodes, so they must not count those.
    group_label = victim.removeprefix("svc-").removesuffix("-d")
    wait_for(
        lambda: _bound_pods(rig, f"{names.GROUP_LABEL}={group_label}") == 9,
        what="the 7 decode and 2 prefill pods of the group bound to nodes",
    )
    live = rig.client.get(deployments_path(rig.name, victim))
    assert not any(
        e["manager"] != "heteroscale" and "f:replicas" in e.get("fieldsV1", {}).get("f:spec", {})
        for e in live["metadata"]["managedFields"]
    ), "the scale subresource left no managed-fields entry on this server (the case tested)"

    caplog.set_level(logging.INFO, logger="heteroscale")
    result, outcome = rig.cycle(loop)
    # Logged with the object, the field, the live and the desired value.
    (record,) = _drift_records(caplog)
    assert record.kind == "replicas_changed"  # type: ignore[attr-defined]
    assert record.object == f"{rig.name}/{victim}"  # type: ignore[attr-defined]
    assert (record.field, record.live, record.desired) == ("spec.replicas", "7", "4")  # type: ignore[attr-defined]
    # Counted and shown while it lasts.
    labels = {"cluster": rig.name, "kind": "replicas_changed"}
    assert _counter(loop, "heteroscale_drift_total", **labels) == 1
    assert _counter(loop, "heteroscale_drift_items", **labels) == 1
    # In the report: text and JSON.
    text = cyclereport.format_text(result, title="t")
    assert (
        f"drift replicas_changed {rig.name}/{victim}: spec.replicas is 7, heteroscale set 4" in text
    )
    (entry,) = [
        d
        for d in cyclereport.to_json(result)["clusters"][0]["objects"]["drift"]
        if d["kind"] == "replicas_changed"
    ]
    assert (entry["field"], entry["live"], entry["desired"]) == ("spec.replicas", "7", "4")
    # Taken back, in the group's shape; no other group touched, no group change.
    assert rig.groups() == shape
    assert outcome.plan is not None and not outcome.plan.changes
    (changed,) = outcome.diff.changed if outcome.diff else ()
    assert changed.key == f"{rig.name}/{victim}" and changed.replicas_after == 4

    # Resolved: logged once more, the gauge drops, the counter stays, nothing to do.
    caplog.clear()
    _, outcome = rig.cycle(loop)
    assert not _drift_records(caplog)
    assert any(getattr(r, "event", None) == "drift_resolved" for r in caplog.records)
    assert _counter(loop, "heteroscale_drift_items", **labels) == 0
    assert _counter(loop, "heteroscale_drift_total", **labels) == 1
    assert outcome.diff is not None and not outcome.diff.has_changes, outcome.lines

    # A hand scale-down is taken back the same way.
    _scale_subresource(rig, victim, 1)
    rig.cycle(loop)
    assert rig.groups() == shape
    assert _counter(loop, "heteroscale_drift_total", **labels) == 2


@pytest.mark.fault
def test_a_scale_change_refused_because_of_drift_holds_the_service_and_keeps_the_cooldown(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    loop = rig.loop()
    rig.cycle(loop)
    armed_at = loop.histories[rig.name]["svc"].last_change_at_s
    assert armed_at is not None
    shape = rig.groups()
    assert sorted(shape.values()) == [(2, 4), (2, 4)], shape
    victim = sorted(n for n in rig.replicas() if n.endswith("-d"))[0]
    # Someone edits replicas with their own field manager: it now owns the field.
    rig.client.merge_patch(
        deployments_path(rig.name, victim), {"spec": {"replicas": 6}}, field_manager="kubectl-edit"
    )
    hand_edited = rig.replicas()

    # The service should shrink to one group: every way to get there writes the
    # hand-edited Deployment (its size, or deleting it), which is refused.
    rig.wants.prefill, rig.wants.decode = 2, 4
    caplog.set_level(logging.INFO, logger="heteroscale")
    result, outcome = rig.cycle(loop)
    assert outcome.plan is not None
    assert set(outcome.plan.held) == {"svc"}, outcome.plan.notes
    assert "refused the scale change" in outcome.plan.held["svc"]
    assert rig.replicas() == hand_edited, "nothing changed size, nothing was deleted"
    assert not outcome.plan.changes, "no group change planned for a held service"
    assert outcome.diff is not None and not outcome.diff.changed, "a refused write is no change"
    assert (
        loop.metrics.registry.get_sample_value("heteroscale_plan_changes", {"cluster": rig.name})
        == 0
    )
    assert loop.histories[rig.name]["svc"].last_change_at_s == armed_at, "cooldown not re-armed"
    # Logged, counted and reported.
    drift = {(r.kind, r.field, r.live, r.desired) for r in _drift_records(caplog)}  # type: ignore[attr-defined]
    assert ("replicas_changed", "spec.replicas", "6", "4") in drift
    assert ("object_modified", "spec.replicas", "6", "4") in drift, (
        "the refused field, from the dry run"
    )
    assert any(getattr(r, "event", None) == "service_held" for r in caplog.records)
    assert _counter(loop, "heteroscale_services_held", cluster=rig.name) == 1
    text = cyclereport.format_text(result, title="t")
    assert "service svc held at 4 prefill, 8 decode (the decision asks 2, 4)" in text
    assert "kubectl-edit" in text
    assert cyclereport.to_json(result)["clusters"][0]["held"]["svc"]

    # It stays held (and is not logged or counted again) while the edit stands.
    caplog.clear()
    _, outcome = rig.cycle(loop)
    assert outcome.plan is not None and set(outcome.plan.held) == {"svc"}
    assert not _drift_records(caplog)
    assert rig.replicas() == hand_edited
    assert loop.histories[rig.name]["svc"].last_change_at_s == armed_at

    # --force takes the edit back, and the scale-in happens in whole groups.
    forced = rig.loop(force=True)
    _, outcome = rig.cycle(forced)
    assert outcome.plan is not None and not outcome.plan.held
    assert list(rig.groups().values()) == [(2, 4)], rig.groups()
