"""`heteroscale status` on the embedded default (no kubeconfig: the simulated fleet),
its JSON shape and exit codes, and the health rules on hand-built cycle outcomes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands.status import (
    AppliedRevision,
    ClusterStatus,
    Leader,
    Status,
    service_status,
)
from reconciler.loop import ClusterOutcome
from reconciler.placement.base import PlacementResult
from reconciler.plan import Plan
from reconciler.policy.base import Decision
from reconciler.state import DeploymentGroup, FleetState, GroupRole

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config


def test_the_embedded_default_is_out_of_sync_where_plan_finds_changes() -> None:
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", "--repo", str(REPO), "--format", "json"])
    assert planned.exit_code == 3, planned.output
    (plan_cluster,) = json.loads(planned.stdout)["clusters"]
    changed = {c["service"] for c in plan_cluster["group_changes"]}

    result = runner.invoke(app, ["status", "--repo", str(REPO), "--format", "json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    (cluster,) = report["clusters"]
    out_of_sync = {s["service"] for s in cluster["services"] if s["sync"] == "OutOfSync"}
    assert out_of_sync == changed, "status is plan's cycle, service by service"
    assert report["synced"] is False and report["exit_code"] == 3


def test_json_shape_on_the_simulated_fleet() -> None:
    result = CliRunner().invoke(app, ["status", "--repo", str(REPO), "--format", "json"])
    report = json.loads(result.stdout)
    assert report["simulated"] is True
    assert report["leader"] == {"holder": None, "renew_time": None, "describe": "none (simulated)"}
    assert report["errors"] == [] and report["desired_error"] is None
    (cluster,) = report["clusters"]
    assert cluster["cluster"] == "prod-east" and cluster["outcome"] == "ok"
    assert cluster["revision"]["revision"] == "none (simulated)"
    services = {s["service"]: s for s in cluster["services"]}
    assert set(services) == {"chat", "summarize", "svc-a", "svc-b"}
    for s in services.values():
        assert set(s) == {
            "service",
            "sync",
            "health",
            "reason",
            "message",
            "current",
            "target",
            "gpu_types",
            "changes",
            "holds",
            "left_behind",
        }
        assert s["sync"] in ("Synced", "OutOfSync")
        assert s["health"] in ("Healthy", "Progressing", "Degraded")
        assert (s["sync"] == "OutOfSync") == bool(s["changes"])
        assert set(s["current"]["decode"]) == {"ready", "starting", "stuck", "draining"}
        active = s["current"]["decode"]["ready"] + s["current"]["decode"]["starting"]
        assert sum(s["gpu_types"]["decode"].values()) == active
        assert all(set(h) == {"kind", "why"} for h in s["holds"])
    assert set(services["chat"]["gpu_types"]["decode"]) == {"h20"}  # kept by preference


def test_text_names_every_service_and_the_simulated_leader() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--repo", str(REPO)])
    assert result.exit_code == 3, result.output
    assert "leader: none (simulated)" in result.output
    assert "cluster prod-east: revision none (simulated)" in result.output
    lines = result.output.splitlines()
    assert lines[4].split() == ["SERVICE", "SYNC", "HEALTH", "INSTANCES", "REASON"]
    rows = {line.split()[0]: line.split()[1] for line in lines[5:9]}
    # The same sync per service as the JSON report (which the test above ties to plan).
    report = json.loads(
        runner.invoke(app, ["status", "--repo", str(REPO), "--format", "json"]).stdout
    )
    (cluster,) = report["clusters"]
    assert rows == {s["service"]: s["sync"] for s in cluster["services"]}
    assert set(rows) == {"chat", "summarize", "svc-a", "svc-b"}
    assert "OutOfSync" in rows.values()  # exit 3: something to apply


def test_errors_exit_1_and_usage_2(tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "policies").mkdir()
    (tmp_path / "clusters").mkdir()
    (tmp_path / "policies" / "x.yaml").write_text("name: [broken\n")
    assert runner.invoke(app, ["status", "--repo", str(tmp_path)]).exit_code == 1
    assert runner.invoke(app, ["status", "--repo", str(REPO), "--format", "yaml"]).exit_code == 2


def test_an_unreachable_api_server_is_an_error(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""\
apiVersion: v1
kind: Config
clusters: [{name: down, cluster: {server: "https://127.0.0.1:9", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: test-token}}]
contexts: [{name: down, context: {cluster: down, user: admin}}]
current-context: down
""")
    result = CliRunner().invoke(
        app,
        [
            "status",
            "--repo",
            str(REPO),
            "--kubeconfig",
            str(kubeconfig),
            "--placer",
            "greedy",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["clusters"][0]["outcome"] == "error"
    assert any("127.0.0.1:9" in e for e in report["errors"])
    # No service was read, so nothing is Synced or Healthy: unknown, not vacuously true.
    assert report["synced"] is None and report["healthy"] is None


# ------------------------------------------------------------ health, by hand


def _outcome(message: str, reason: str = "within_tolerance", starting: int = 0) -> ClusterOutcome:
    group = DeploymentGroup("svc", "c", "g1", "c", None, GroupRole("h20", 2), GroupRole("h20", 4))
    fleet = FleetState("c", (group,), starting={("svc", "decode"): starting})
    decision = Decision("svc", 2, 4, reason, message)  # type: ignore[arg-type]
    plan = Plan("c", {"svc": decision}, PlacementResult("c", (group,)), (), fleet)
    return ClusterOutcome(cluster="c", plan=plan)


@pytest.mark.parametrize(
    ("message", "reason", "starting", "health", "kinds"),
    [
        ("decode_tps 100 within 10%", "within_tolerance", 0, "Healthy", []),
        ("decode_tps 100 within 10%", "within_tolerance", 2, "Progressing", []),
        (
            "decode_tps missing: hold 2 prefill, 4 decode",
            "metrics_missing",
            2,
            "Degraded",
            ["metrics_missing"],
        ),
        ("scale-in held by the 300 s window", "stabilised", 0, "Healthy", ["stabilised"]),
        (
            "SLO at risk: decode needs 9, max_instances allows 4",
            "bounds",
            0,
            "Degraded",
            ["slo_bound"],
        ),
        (
            "ttft 900 ms above SLO, but 30% of requests cannot meet it on any instance",
            "scale_out",
            0,
            "Degraded",
            ["slo_unattainable"],
        ),
        (
            "model out of reach: decode reads at least 2x slower than its model",
            "within_tolerance",
            0,
            "Degraded",
            ["slo_model"],
        ),
    ],
)
def test_health_from_the_decision(
    message: str, reason: str, starting: int, health: str, kinds: list[str]
) -> None:
    found = service_status(_outcome(message, reason, starting), "svc", None)
    assert found.sync == "Synced" and found.health == health
    assert [h.kind for h in found.holds] == kinds


def test_an_invalid_revision_degrades_every_service() -> None:
    found = service_status(_outcome("ok"), "svc", "desired state invalid (1 problem(s))")
    assert found.health == "Degraded" and [h.kind for h in found.holds] == ["invalid_revision"]


def test_exit_code_precedence() -> None:
    def status(*services: tuple[str, str], errors: tuple[str, ...] = ()) -> Status:
        cluster = ClusterStatus("c", "ok", None, AppliedRevision("unknown"))
        for sync, health in services:
            s = service_status(_outcome("ok"), "svc", None)
            s.sync, s.health = sync, health  # type: ignore[assignment]
            cluster.services.append(s)
        return Status("src", "tgt", True, Leader(None, None, ""), None, [cluster], list(errors))

    assert status(("Synced", "Healthy")).exit_code == 0
    assert status(("Synced", "Healthy"), ("Synced", "Degraded")).exit_code == 4
    assert status(("Synced", "Progressing")).exit_code == 4
    assert status(("OutOfSync", "Healthy"), ("Synced", "Degraded")).exit_code == 3
    assert status(("OutOfSync", "Healthy"), errors=("cluster c: down",)).exit_code == 1


def test_a_role_on_several_gpu_types_shows_each() -> None:
    """While a ranking change or a spill is worked through, a role runs on several
    types: the INSTANCES column says how many on each."""
    from reconciler.commands.status import ServiceStatus, instances

    counts = {"ready": 30, "starting": 2, "draining": 0}
    status = ServiceStatus(
        service="chat",
        sync="OutOfSync",
        health="Progressing",
        reason="scale_out",
        message="",
        current={"prefill": dict(counts), "decode": dict(counts)},
        target={"prefill": 32, "decode": 34},
        gpu_types={"prefill": {"h800": 32}, "decode": {"h20": 28, "h800": 4}},
    )
    assert instances(status) == "prefill 32->32, decode 32->34 (h20 28, h800 4)"


class _LeaseOnly:
    """A client whose one object is the reconciler's Lease, as ``read_leader`` reads it."""

    def __init__(self, renew_time: str) -> None:
        self.renew_time = renew_time

    def get(self, path: str) -> dict[str, object]:
        spec = {"holderIdentity": "replica-a", "leaseDurationSeconds": 15}
        return {"spec": {**spec, "renewTime": self.renew_time}}


@pytest.mark.parametrize(
    ("renew_time", "detail"),
    [
        ("2026-01-01T00:00:00.000000Z", ""),  # renewed 10 s ago, a 15 s lease
        ("2026-01-01T00:00:00Z", ""),  # whole seconds, as some servers write it
        ("2025-12-31T23:59:00.000000Z", "; expired 55 s ago"),
        ("2026-01-01T00:10:00.000000Z", "; renewed 590 s in the future (a clock ahead?)"),
        ("yesterday", "; renewTime unreadable"),  # was a ValueError traceback
    ],
)
def test_the_leader_is_read_from_any_renew_time_the_elector_reads(
    renew_time: str, detail: str
) -> None:
    from reconciler.commands.reconcile import LeaseRef
    from reconciler.commands.status import read_leader

    now_s = dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=dt.UTC).timestamp()
    leader = read_leader(_LeaseOnly(renew_time), LeaseRef(), now_s)
    assert (leader.holder, leader.detail) == ("replica-a", detail)


def test_what_a_move_left_behind_is_kept_out_of_sync_and_its_instances_shown() -> None:
    """While a move holds the old Deployments (here: no room for the new copy beside
    them), the service's groups are the new copy (1 prefill, 4 decode) and the old one
    serves 5 prefill: status said Synced with the new copy's counts only. It is
    OutOfSync (Git has the old Deployments go), Progressing, says why they are kept,
    and shows what they serve."""
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.commands.status import instances
    from reconciler.observe.base import Observation
    from reconciler.placement.base import UngroupedInstances

    why = "kept while its replacement is not all placed (4 prefill: gpu_capacity; prefill 1 of 5)"
    kept = ObjectDiff("svc/svc-a-p", "svc", "a", "prefill", "keep", 5, 5, notes=(why,))
    outcome = _outcome("decode_tps 100 within 10%")
    outcome.diff = ClusterDiff("c", "server-dry-run", (kept,))
    outcome.observation = Observation(
        outcome.plan.current,  # type: ignore[union-attr]
        left_behind=(
            UngroupedInstances("svc", "prefill", "n1", 3, 2),
            UngroupedInstances("svc", "prefill", "n2", 2, 2),
        ),
    )
    found = service_status(outcome, "svc", None)
    assert (found.sync, found.health) == ("OutOfSync", "Progressing")
    assert [(h.kind, h.why) for h in found.holds] == [("kept", f"svc/svc-a-p: {why}")]
    assert found.changes == ["= keep Deployment svc/svc-a-p [svc/a/prefill] replicas 5 -> 5"]
    assert found.left_behind == {"prefill": 5}
    assert instances(found) == "prefill 2->2 (+5 left behind, serving until replaced), decode 4->4"


class _StateOnly:
    """A client whose one object is cluster c1's state ConfigMap holding ``text``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def get(self, path: str) -> dict[str, object]:
        from reconciler.apply.kubeclient import NotFound
        from reconciler.apply.statestore import configmap_name

        if path.endswith("/" + configmap_name("c1")):
            return {"metadata": {"resourceVersion": "7"}, "data": {"state.json": self.text}}
        raise NotFound(404, "NotFound", path)


@pytest.mark.parametrize("applied_at_s", [float("nan"), float("inf"), -float("inf"), 1.8e12])
def test_a_stored_applied_time_no_date_can_show_leaves_the_revision_shown(
    applied_at_s: float,
) -> None:
    """The state's encoder writes a non-finite time as "nan"/"inf" and its reader takes
    any number: such a state reads, so status shows its revision and says only the
    time is unreadable, instead of raising (which made the cluster an error: exit 1,
    revision "unknown", no memories line)."""
    from reconciler.apply.statestore import ConfigMapStateStore
    from reconciler.commands.status import read_stored
    from reconciler.durable import AppliedPlan, DurableState, Revision, encode_state

    commit = "a" * 40
    state = DurableState(
        "c1",
        1_800_000_000.0,
        "replica-a",
        Revision("git", commit, "main"),
        {},
        AppliedPlan("sha256:" + "b" * 64, commit, applied_at_s),
    )
    client = _StateOnly(encode_state(state, 0).text)
    store = ConfigMapStateStore(client, "heteroscale", "heteroscale-status", memory_shards=0)
    revision, memories = read_stored(store, "c1")
    assert (revision.revision, revision.label, revision.applied_at) == (commit, "main", None)
    assert memories is not None
    assert revision.describe() == (
        f"{commit[:19]} (main) applied at an unreadable time (ConfigMap "
        f"heteroscale/heteroscale-state-c1: applied_at_s {applied_at_s!r} is no time)"
    )
