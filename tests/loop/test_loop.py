"""The reconcile loop's glue: every cluster through its own backend, failures
isolated, last known good desired state, leader gating, metrics and health."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from looptestkit import (
    FixedAutoscaler,
    MemoryStore,
    OneGroupPlacer,
    RecordingBackend,
    StaticMetrics,
    unreachable,
)

from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ClusterSpec
from reconciler.errors import (
    MAX_ISSUES_SHOWN_PER_FILE,
    ClusterUnavailable,
    ConfigError,
    ConfigIssue,
)
from reconciler.loop import JsonFormatter, ReconcileLoop, reporting, serve_http
from reconciler.loop.reporting import HTTP_CLIENT_TIMEOUT_S, MAX_HTTP_CLIENTS
from reconciler.loop.schedule import windows_never_covered
from reconciler.policy.base import Decision, DecisionInput, Recommendation
from reconciler.policy.coordinated import scale_in_floor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def two_cluster_state(state: DesiredState) -> DesiredState:
    """The example fleet plus a copy of its cluster under another name."""
    east = state.clusters["prod-east"]
    west = east.model_copy(update={"name": "prod-west", "kube_context": "prod-west"})
    west_policies = {
        f"{n}-w": p.model_copy(update={"name": f"{n}-w", "cluster": "prod-west"})
        for n, p in state.policies.items()
    }
    return DesiredState(
        policies={**state.policies, **west_policies},
        clusters={"prod-east": east, "prod-west": west},
        templates=state.templates,
        source_label="two clusters",
    )


def make_loop(
    state: DesiredState, backends: dict[str, RecordingBackend], **kwargs: object
) -> ReconcileLoop:
    return ReconcileLoop(
        load_desired=kwargs.pop("load_desired", lambda: state),  # type: ignore[arg-type]
        backend_for=lambda spec: backends[spec.name],
        metrics_for=lambda spec: StaticMetrics(),
        autoscaler=FixedAutoscaler(),
        placer=OneGroupPlacer(),
        clock=kwargs.pop("clock", lambda: 1000.0),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_cycle_applies_every_cluster_and_a_second_cycle_changes_nothing(
    state: DesiredState,
) -> None:
    both = two_cluster_state(state)
    backends = {
        "prod-east": RecordingBackend("prod-east"),
        "prod-west": RecordingBackend("prod-west"),
    }
    loop = make_loop(both, backends)
    first = loop.run_cycle()
    assert [c.cluster for c in first.clusters] == ["prod-east", "prod-west"]
    assert all(c.applied and c.outcome == "ok" for c in first.clusters)
    assert first.has_changes
    assert len(backends["prod-east"].applied[0].groups) == len(state.policies)
    second = loop.run_cycle()
    assert not second.has_changes


def test_a_cluster_file_naming_another_context_gets_a_backend_for_it(
    state: DesiredState,
) -> None:
    """A running loop whose Git revision moves a cluster to another kubeconfig context
    connects anew, closing the old connection: the backend built for the old context
    went on writing to the cluster Git moved away from, while `plan` on the same commit
    targeted the new one."""
    east = state.clusters["prod-east"]
    moved = DesiredState(
        policies=state.policies,
        clusters={"prod-east": east.model_copy(update={"kube_context": "prod-east-new"})},
        templates=state.templates,
        source_label="moved",
    )
    revisions = [state]
    built: list[tuple[str | None, RecordingBackend]] = []
    closed: list[str | None] = []

    class ClosingBackend(RecordingBackend):
        def close(self) -> None:
            closed.append(self.context)

    def backend_for(spec: ClusterSpec) -> RecordingBackend:
        backend = ClosingBackend(spec.name)
        backend.context = spec.kube_context  # type: ignore[attr-defined]
        built.append((spec.kube_context, backend))
        return backend

    loop = ReconcileLoop(
        load_desired=lambda: revisions[-1],
        backend_for=backend_for,
        metrics_for=lambda spec: StaticMetrics(),
        autoscaler=FixedAutoscaler(),
        placer=OneGroupPlacer(),
        clock=lambda: 1000.0,
    )
    loop.run_cycle()
    loop.run_cycle()
    assert [context for context, _ in built] == [east.kube_context]  # kept between cycles
    old_writes = len(built[0][1].applied)
    revisions.append(moved)
    (outcome,) = loop.run_cycle().clusters
    assert [context for context, _ in built] == [east.kube_context, "prod-east-new"]
    assert closed == [east.kube_context]
    assert outcome.applied and built[-1][1].applied, "the new context's cluster is written"
    assert len(built[0][1].applied) == old_writes, "the old context's cluster: no more writes"


def test_a_cluster_removed_from_the_desired_state_has_its_backend_closed(
    state: DesiredState,
) -> None:
    """A cluster file removed from Git: its backend (a watch's connections) is closed
    and dropped at the next loop cycle instead of staying open for the life of the
    process; the clusters that stay keep theirs."""
    both = two_cluster_state(state)
    closed: list[str] = []

    class ClosingBackend(RecordingBackend):
        def close(self) -> None:
            closed.append(self.cluster)

    backends = {"prod-east": ClosingBackend("prod-east"), "prod-west": ClosingBackend("prod-west")}
    desired = [both]
    loop = make_loop(both, backends, load_desired=lambda: desired[-1])  # type: ignore[arg-type]
    loop.run_cycle()
    desired.append(
        DesiredState(
            policies={n: p for n, p in both.policies.items() if p.cluster == "prod-east"},
            clusters={"prod-east": both.clusters["prod-east"]},
            templates=both.templates,
            source_label="west removed",
        )
    )
    loop.run_cycle()
    assert closed == ["prod-west"]
    assert set(loop.backends) == {"prod-east"}


def test_a_service_moved_to_another_cluster_is_kept_where_it_ran_even_with_prune_on(
    state: DesiredState,
) -> None:
    """A policy whose `cluster:` now names another cluster moved its service; it was
    not removed. The old cluster's cycle cannot see the new copy serve, so it never
    prunes the old one: with --prune-removed-services it deleted every serving instance
    at once while the other cluster's copy had none ready. A service whose policy is
    gone is still pruned."""
    both = two_cluster_state(state)
    moved, removed = sorted(p.name for p in state.policies_for("prod-east"))[:2]
    after = DesiredState(
        policies={
            **{n: p for n, p in both.policies.items() if n not in (moved, removed)},
            moved: both.policies[moved].model_copy(update={"cluster": "prod-west"}),
        },
        clusters=both.clusters,
        templates=both.templates,
        source_label="moved and removed",
    )
    desired = [both]
    backends = {
        "prod-east": RecordingBackend("prod-east"),
        "prod-west": RecordingBackend("prod-west"),
    }
    loop = make_loop(both, backends, load_desired=lambda: desired[0], prune_removed_services=True)
    loop.run_cycle()
    desired.append(after)
    desired.pop(0)
    east, west = loop.run_cycle().clusters
    assert east.plan is not None and west.plan is not None
    east_services = {g.service for g in east.plan.groups}
    assert moved in east_services, "the moved service's old copy is kept"
    assert removed not in east_services, "a removed service is still pruned"
    assert moved in {g.service for g in west.plan.groups}
    assert any(
        f"service {moved} is running but its policy now deploys it to cluster prod-west" in n
        for n in east.plan.notes
    )


def test_an_unreachable_cluster_is_reported_and_skipped_without_blocking_others(
    state: DesiredState,
) -> None:
    both = two_cluster_state(state)
    backends = {"prod-east": unreachable("prod-east"), "prod-west": RecordingBackend("prod-west")}
    loop = make_loop(both, backends, interval_s=30.0)
    result = loop.run_cycle()
    east, west = result.clusters
    assert east.outcome == "error" and "connection refused" in (east.error or "")
    assert west.outcome == "ok" and west.applied
    assert result.has_errors
    # Backoff: the first failure retries next cycle, repeated failures wait longer.
    assert loop.run_cycle().clusters[0].outcome == "error"
    assert loop.run_cycle().clusters[0].outcome == "skipped"


def test_a_backing_off_cluster_is_not_skipped_longer_than_the_backoff_after_a_clock_step_back(
    state: DesiredState,
) -> None:
    """The backoff is timed on the wall clock; stepped back an hour (an NTP correction),
    a cluster that had failed was skipped for the whole hour, far past the backoff's
    cap (``max_backoff_s``)."""
    both = two_cluster_state(state)
    east = RecordingBackend("prod-east", fail_with=ClusterUnavailable("down"))
    now = [100_000.0]
    loop = make_loop(
        both,
        {"prod-east": east, "prod-west": RecordingBackend("prod-west")},
        clock=lambda: now[0],
        interval_s=30.0,
    )
    for _ in range(4):
        loop.run_cycle()
        now[0] += 30
    east.fail_with = None
    now[0] -= 3600
    skipped_s = 0.0
    while loop.run_cycle().clusters[0].outcome == "skipped":
        skipped_s += 30
        now[0] += 30
        assert skipped_s <= loop.max_backoff_s, "skipped past the backoff's cap"


def test_an_invalid_revision_keeps_the_last_known_good_state(state: DesiredState) -> None:
    calls = {"n": 0}

    def load() -> DesiredState:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConfigError(
                [ConfigIssue("policies/chat.yaml", 3, 1, "slo", "required field is missing")]
            )
        return state

    backends = {"prod-east": RecordingBackend("prod-east")}
    loop = make_loop(state, backends, load_desired=load)
    loop.run_cycle()
    result = loop.run_cycle()
    assert result.desired_error and "policies/chat.yaml:3:1" in result.desired_error
    assert result.clusters and result.clusters[0].outcome == "ok", (
        "the last good state is still reconciled"
    )
    assert loop.metrics.desired_valid._value.get() == 0  # type: ignore[attr-defined]


def test_an_invalid_revision_with_very_many_problems_is_reported_in_bounded_size(
    state: DesiredState,
) -> None:
    many = [
        ConfigIssue("policies/chat.yaml", i + 1, 1, f"k{i}", "unknown key")
        for i in range(MAX_ISSUES_SHOWN_PER_FILE + 5000)
    ]
    loads = iter([state])

    def load() -> DesiredState:
        state_or_none = next(loads, None)
        if state_or_none is None:
            raise ConfigError(many)
        return state_or_none

    loop = make_loop(state, {"prod-east": RecordingBackend("prod-east")}, load_desired=load)
    loop.run_cycle()
    error = loop.run_cycle().desired_error or ""
    assert error.startswith("desired state invalid (5100 problem(s))")
    # The header with the first problem, the other 99, and how many more there are.
    assert len(error.splitlines()) == MAX_ISSUES_SHOWN_PER_FILE + 1
    assert error.endswith(
        "policies/chat.yaml: 5,000 more problems not shown (the first 100 of a file are)"
    )


def test_a_standby_and_a_dry_run_never_apply(state: DesiredState) -> None:
    backends = {"prod-east": RecordingBackend("prod-east")}
    standby = make_loop(state, backends, is_leader=lambda: False)
    outcome = standby.run_cycle().clusters[0]
    assert outcome.outcome == "standby" and not outcome.applied
    dry = make_loop(state, backends, dry_run=True)
    assert not dry.run_cycle().clusters[0].applied
    assert backends["prod-east"].applied == [] and len(backends["prod-east"].diffed) == 2


def test_a_cycle_that_lost_the_lease_before_applying_only_reports(
    state: DesiredState, caplog: pytest.LogCaptureFixture
) -> None:
    # Asked: for the loop's gauge, as the cluster's cycle starts, right before applying.
    answers = [True, True, False]
    backend = RecordingBackend("prod-east")
    store = MemoryStore()
    loop = make_loop(
        state,
        {"prod-east": backend},
        is_leader=lambda: answers.pop(0) if answers else True,
        state_store=store,
    )
    with caplog.at_level(logging.WARNING, logger="heteroscale.loop"):
        outcome = loop.run_cycle().clusters[0]
    assert outcome.outcome == "standby" and not outcome.applied
    assert backend.applied == [] and len(backend.diffed) == 1
    assert store.saved == {}, "only the leader writes"
    (withheld,) = [r for r in caplog.records if getattr(r, "event", "") == "apply_withheld"]
    assert withheld.getMessage() == (
        "cluster prod-east: not applied: this replica no longer leads (the Lease was lost "
        "during the cycle)"
    )
    # Leading again: another leader may have written the windows meanwhile.
    assert store.loads == ["prod-east"]
    assert loop.run_cycle().clusters[0].applied
    assert store.loads == ["prod-east", "prod-east"] and "prod-east" in store.saved


def test_a_loop_cycle_waiting_out_a_long_cluster_deadline_is_not_a_stall(
    state: DesiredState,
) -> None:
    """A loop cycle waits for its clusters up to their deadline: with a deadline beyond
    three intervals and 30 s, a slow cluster failed /healthz and Kubernetes restarted
    the replica (a restart does not make an API server faster). A loop silent past the
    deadline too is still a stall."""
    loop = make_loop(
        state,
        {"prod-east": RecordingBackend("prod-east")},
        cluster_workers=2,
        cluster_deadline_s=200.0,
    )
    loop.run_cycle()
    assert loop.healthy(now_s=1000.0 + 3 * 30.0 + 30 + 150)
    assert not loop.healthy(now_s=1000.0 + 3 * 30.0 + 30 + 250)


def test_metrics_and_health_are_served(state: DesiredState) -> None:
    backends = {"prod-east": RecordingBackend("prod-east")}
    loop = make_loop(state, backends)
    server = serve_http(loop, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/readyz")  # no desired state loaded yet
        loop.run_cycle()
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        for metric in (
            'heteroscale_cycle_duration_seconds_count{cluster="prod-east"} 1.0',
            'heteroscale_decisions_total{reason="baseline",service="chat"} 1.0',
            "heteroscale_placement_solve_seconds_count",
            'heteroscale_drift_items{cluster="prod-east",kind="node_missing"} 0.0',
            'heteroscale_drift_items{cluster="prod-east",kind="replicas_changed"} 0.0',
            'heteroscale_services_held{cluster="prod-east"} 0.0',
            "heteroscale_errors_total",
            'heteroscale_cycles_total{cluster="prod-east",outcome="ok"} 1.0',
            # What the dashboard (deploy/grafana-dashboard.json) draws against each other:
            # the policy's SLOs, what runs and what is decided.
            'heteroscale_slo_seconds{service="chat",slo="ttft"} 1.5',
            'heteroscale_slo_seconds{service="chat",slo="tbt"} 0.05',
            'heteroscale_current_instances{role="decode",service="chat",state="ready"}',
            'heteroscale_current_instances{role="prefill",service="chat",state="starting"}',
            'heteroscale_target_instances{role="decode",service="chat"}',
        ):
            assert metric in text, metric
        assert urllib.request.urlopen(base + "/healthz").status == 200
        assert urllib.request.urlopen(base + "/readyz").status == 200
    finally:
        server.shutdown()
    assert not loop.healthy(now_s=1000.0 + 10 * 30.0), "a stalled loop is unhealthy"


def test_the_metrics_of_a_removed_service_and_a_removed_cluster_go_with_them(
    state: DesiredState,
) -> None:
    """A service whose policy is removed, or a cluster removed from the desired state,
    is no longer on /metrics from the next cycle on: its last target, instances,
    decisions, SLOs, cycles, errors and drift would otherwise be reported for the life
    of the process. The services and clusters that stay are still reported."""
    from prometheus_client import generate_latest

    both = two_cluster_state(state)
    removed = sorted(p.name for p in state.policies_for("prod-east"))[0]
    kept = sorted(p.name for p in state.policies_for("prod-east"))[1]
    east_only = DesiredState(
        policies={
            n: p for n, p in both.policies.items() if p.cluster == "prod-east" and n != removed
        },
        clusters={"prod-east": both.clusters["prod-east"]},
        templates=both.templates,
        source_label="a service and a cluster removed",
    )
    desired = [both]
    backends = {"prod-east": RecordingBackend("prod-east"), "prod-west": unreachable("prod-west")}
    loop = make_loop(
        both,
        backends,  # type: ignore[arg-type]
        load_desired=lambda: desired[0],
        prune_removed_services=True,
        cluster_workers=2,
    )

    def series() -> list[str]:
        text = generate_latest(loop.metrics.registry).decode()
        return [line for line in text.splitlines() if line.startswith("heteroscale_")]

    loop.run_cycle()
    before = series()
    for gone in (f'service="{removed}"', 'cluster="prod-west"'):
        assert any(gone in line for line in before), gone
    for name in ("target_instances", "current_instances", "decisions_total", "slo_seconds"):
        assert any(line.startswith(f"heteroscale_{name}{{") and removed in line for line in before)
    for name in ("cycles_total", "cycle_duration_seconds_count", "errors_total"):
        assert any(f"heteroscale_{name}{{" in line and "prod-west" in line for line in before)

    desired[0] = east_only
    loop.run_cycle()
    after = series()
    assert [line for line in after if f'service="{removed}"' in line] == []
    assert [line for line in after if 'cluster="prod-west"' in line] == []
    assert f'heteroscale_target_instances{{role="decode",service="{kept}"}} 2.0' in after
    assert 'heteroscale_cycles_total{cluster="prod-east",outcome="ok"} 2.0' in after
    assert 'heteroscale_cycle_running_seconds{cluster="prod-east"} 0.0' in after


def test_clients_that_never_finish_a_request_are_bounded_in_number_and_time(
    state: DesiredState,
) -> None:
    """A client that connects and sends nothing held a handler thread for good, and a
    few thousand of them exhausted the process's threads and memory. At most
    ``MAX_HTTP_CLIENTS`` are served at once (the others closed unanswered), each waits
    ``HTTP_CLIENT_TIMEOUT_S`` at most for a read, the loop cycles on meanwhile, and once
    they are dropped the endpoints answer again."""
    loop = make_loop(state, {"prod-east": RecordingBackend("prod-east")})
    server = serve_http(loop, "127.0.0.1", 0)
    address = ("127.0.0.1", server.server_address[1])
    threads_before = threading.active_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_HTTP_CLIENTS + 100):
            idle.append(socket.create_connection(address))
        time.sleep(0.5)
        assert threading.active_count() <= threads_before + MAX_HTTP_CLIENTS
        assert loop.run_cycle().clusters[0].outcome == "ok"
        deadline = time.monotonic() + HTTP_CLIENT_TIMEOUT_S + 5.0
        while True:
            try:
                status = urllib.request.urlopen(f"http://{address[0]}:{address[1]}/healthz").status
                break
            except OSError:
                assert time.monotonic() < deadline, "the endpoints never answered again"
                time.sleep(0.2)
        assert status == 200
        # The idle clients were dropped, not kept: the server closed each connection.
        idle[0].settimeout(1.0)
        assert idle[0].recv(1) == b""
    finally:
        for client in idle:
            client.close()
        server.shutdown()


def _closed_by_server(client: socket.socket) -> bool:
    """Whether the server closed ``client``'s connection (end of file or a reset)."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        client.setblocking(True)


def test_a_client_that_drips_its_request_is_closed_at_the_connection_deadline(
    state: DesiredState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every half second never trips the per-read timeout; such clients held
    every slot for as long as they liked. Each connection is closed
    ``HTTP_CONNECTION_DEADLINE_S`` after it was accepted (shortened here), every slot
    is freed, and the endpoints answer again."""
    monkeypatch.setattr(reporting, "HTTP_CONNECTION_DEADLINE_S", 1.5)
    loop = make_loop(state, {"prod-east": RecordingBackend("prod-east")})
    server = serve_http(loop, "127.0.0.1", 0)
    address = ("127.0.0.1", server.server_address[1])
    drippers = [socket.create_connection(address) for _ in range(MAX_HTTP_CLIENTS)]
    try:
        opened_s = time.monotonic()
        closed_after_s: dict[int, float] = {}
        while len(closed_after_s) < len(drippers):
            assert time.monotonic() - opened_s < 10.0, "a dripping client was never closed"
            for i, client in enumerate(drippers):
                if i in closed_after_s:
                    continue
                if _closed_by_server(client):
                    closed_after_s[i] = time.monotonic() - opened_s
                else:
                    client.sendall(b"G")
            time.sleep(0.5)
        assert max(closed_after_s.values()) < 1.5 + HTTP_CLIENT_TIMEOUT_S
        status = urllib.request.urlopen(f"http://{address[0]}:{address[1]}/healthz").status
        assert status == 200
    finally:
        for client in drippers:
            client.close()
        server.shutdown()


class _StuckElection:
    """A leader election whose health the test sets."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def is_leader(self) -> bool:
        return False

    def holds_lease(self) -> bool:
        return False

    def health_problem(self) -> str | None:
        return self.problem

    def error_counts(self) -> dict[str, int]:
        return {"Forbidden": 3} if self.problem else {}

    def decision_age_s(self) -> float:
        return 50.0 if self.problem else 1.0


def test_a_stuck_leader_election_fails_healthz_and_shows_in_metrics(state: DesiredState) -> None:
    election = _StuckElection()
    # Wired as ``run`` does: only the bound is_leader method is passed.
    loop = make_loop(
        state, {"prod-east": RecordingBackend("prod-east")}, is_leader=election.is_leader
    )
    assert loop.leader_election is election
    server = serve_http(loop, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert urllib.request.urlopen(base + "/healthz").status == 200
        election.problem = "no valid decision on Lease ns/x for 50 s (> 45 s): Forbidden: no"
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(base + "/healthz")
        assert raised.value.code == 503
        assert raised.value.read().decode() == election.problem + "\n"
        text = urllib.request.urlopen(base + "/metrics").read().decode()
        assert 'heteroscale_lease_errors_total{kind="Forbidden"} 3.0' in text
        assert "heteroscale_lease_decision_age_seconds 50.0" in text
        assert "heteroscale_lease_healthy 0.0" in text
        election.problem = None
        assert urllib.request.urlopen(base + "/healthz").status == 200
    finally:
        server.shutdown()


def test_json_logs_carry_structured_fields() -> None:
    record = logging.LogRecord(
        "heteroscale.loop", logging.INFO, __file__, 1, "cluster %s ok", ("east",), None
    )
    record.cluster = "east"
    record.event = "cycle"
    line = json.loads(JsonFormatter().format(record))
    assert (
        line["msg"] == "cluster east ok" and line["cluster"] == "east" and line["event"] == "cycle"
    )
    assert line["level"] == "info"


def test_a_held_service_keeps_its_groups_and_its_cooldown(state: DesiredState) -> None:
    """``plan_cluster(held=...)``: the decision is still made and reported, but no
    group of the held service changes size and ``last_change_at_s`` stays."""
    from reconciler.cycle import plan_cluster
    from reconciler.observe.base import Observation
    from reconciler.policy.base import Decision, PolicyHistory
    from reconciler.state import DeploymentGroup, FleetState, GroupRole

    service = sorted(p.name for p in state.policies_for("prod-east"))[0]
    policy = state.policies[service]
    running = DeploymentGroup(
        service=service,
        cluster="prod-east",
        group_id="g0",
        domain=state.clusters["prod-east"].s2[0].name,
        subgroup=None,
        prefill=GroupRole(policy.prefill.preferred_gpu_types()[0], 3),
        decode=GroupRole(policy.decode.preferred_gpu_types()[0], 5),
    )
    observation = Observation(FleetState("prod-east", groups=(running,)))

    class Arming(FixedAutoscaler):
        def decide(self, inputs: DecisionInput) -> Decision:
            return Decision(
                inputs.policy.name,
                1,
                2,
                "scale_in",
                "1/2",
                history=PolicyHistory(last_change_at_s=inputs.now_s),
            )

    before = {service: PolicyHistory(last_change_at_s=10.0)}
    args = (state, "prod-east", observation, {}, before, 500.0, Arming(), OneGroupPlacer())
    free, histories = plan_cluster(*args)
    assert any(c.service == service for c in free.changes)
    assert histories[service].last_change_at_s == 500.0

    held, histories = plan_cluster(*args, held={service: "a write was refused"})
    assert not [c for c in held.changes if c.service == service]
    assert [g for g in held.groups if g.service == service] == [running]
    assert held.decisions[service].decode == 2, "the decision is still reported"
    assert histories[service].last_change_at_s == 10.0, "cooldown not re-armed"
    assert held.held == {service: "a write was refused"}
    assert any(n.startswith(f"service {service} held at 3 prefill, 5 decode") for n in held.notes)

    # An observation that could not read the service's objects holds it the same way.
    unreadable = Observation(observation.fleet, held={service: "annotation unreadable"})
    held, histories = plan_cluster(state, "prod-east", unreadable, *args[3:])
    assert not [c for c in held.changes if c.service == service]
    assert held.held == {service: "annotation unreadable"}
    assert histories[service].last_change_at_s == 10.0, "cooldown not re-armed"


def test_a_cluster_allows_running_instances_to_move_only_where_its_desired_state_says_so(
    state: DesiredState,
) -> None:
    """``placement.allow_rebalance`` in the cluster's file (reviewed in Git like every
    other setting) reaches the placer; without it, running instances never move."""
    from dataclasses import replace

    from reconciler.cycle import plan_cluster
    from reconciler.desired.models import PlacementSettings
    from reconciler.observe.base import Observation
    from reconciler.placement.base import PlacementOptions, PlacementRequest, PlacementResult
    from reconciler.state import FleetState

    asked: list[PlacementOptions] = []

    class Recording(OneGroupPlacer):
        def place(self, request: PlacementRequest) -> PlacementResult:
            asked.append(request.options)
            return super().place(request)

    east = state.clusters["prod-east"]
    allowing = east.model_copy(update={"placement": PlacementSettings(allow_rebalance=True)})
    moving = replace(state, clusters={**state.clusters, "prod-east": allowing})
    observation = Observation(FleetState("prod-east"))
    for desired in (state, moving):
        plan_cluster(desired, "prod-east", observation, {}, {}, 0.0, FixedAutoscaler(), Recording())
    assert [o.allow_rebalance for o in asked] == [False, True]
    # A caller's options keep their other settings.
    plan_cluster(
        moving,
        "prod-east",
        observation,
        {},
        {},
        0.0,
        FixedAutoscaler(),
        Recording(),
        placement_options=PlacementOptions(time_limit_s=7.0),
    )
    assert (asked[-1].allow_rebalance, asked[-1].time_limit_s) == (True, 7.0)


def test_a_service_whose_autoscaler_raises_is_held_and_the_others_still_reconcile(
    state: DesiredState, caplog: pytest.LogCaptureFixture
) -> None:
    """One service's decision failing (a bug for its inputs) holds that service where
    it runs, says what raised and where, and leaves every other service's cycle and
    the loop's cycle outcome alone; ``status`` calls it a degrading hold."""
    from reconciler.commands.status import service_status

    broken = sorted(p.name for p in state.policies_for("prod-east"))[0]

    class FailsForOne(FixedAutoscaler):
        def decide(self, inputs: DecisionInput) -> Decision:
            if inputs.policy.name == broken:
                raise ZeroDivisionError("float division by zero")
            return super().decide(inputs)

    backends = {"prod-east": RecordingBackend("prod-east")}
    loop = make_loop(state, backends)
    first = loop.run_cycle()  # every service placed once
    loop.cluster_cycle.autoscaler = FailsForOne(prefill=2, decode=3)
    with caplog.at_level(logging.INFO, logger="heteroscale.loop"):
        outcome = loop.run_cycle().clusters[0]
    failures = [r for r in caplog.records if getattr(r, "event", "") == "decision_failed"]
    assert [(r.levelname, getattr(r, "service", "")) for r in failures] == [("ERROR", broken)]
    assert outcome.outcome == "ok" and outcome.applied
    plan = outcome.plan
    assert plan is not None
    decision = plan.decisions[broken]
    assert decision.reason == "decision_failed"
    assert (decision.prefill, decision.decode) == (1, 2)
    assert decision.message.startswith(
        "the autoscaler failed (ZeroDivisionError: float division by zero at test_loop.py:"
    )
    assert [g for g in plan.groups if g.service == broken] == [
        g
        for g in first.clusters[0].plan.groups
        if g.service == broken  # type: ignore[union-attr]
    ]
    assert any(
        n.startswith(f"service {broken} held at 1 prefill, 2 decode: the autoscaler failed")
        for n in plan.notes
    )
    others = [c for c in plan.changes if c.service != broken]
    assert len({c.service for c in others}) == len(state.policies_for("prod-east")) - 1
    status = service_status(outcome, broken, None)
    assert status.health == "Degraded"
    assert [h.kind for h in status.holds] == ["decision_failed"]
    assert loop.metrics.decisions.labels(broken, "decision_failed")._value.get() == 1


def test_the_loop_keeps_the_objects_of_an_unchanged_desired_state_between_cycles(
    state: DesiredState,
) -> None:
    """Every cycle loads the desired state again; the policies and clusters that did
    not change keep their objects, and with them everything cached per object (the
    planner's GPU ranking and models: ~2 ms a service it would derive again)."""
    loop = make_loop(
        state,
        {"prod-east": RecordingBackend("prod-east")},
        load_desired=lambda: load_desired_state(REPO),
    )
    loop.run_cycle()
    first = loop.last_good
    loop.run_cycle()
    assert first is not None and loop.last_good is not None
    assert all(loop.last_good.policies[n] is p for n, p in first.policies.items())
    assert all(loop.last_good.clusters[n] is c for n, c in first.clusters.items())


def test_refused_scale_changes_name_the_services_to_hold() -> None:
    from reconciler.apply.fields import FieldChange
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.loop import refused_scale_changes, scaled_services

    def obj(key: str, service: str, action: str, before: int, after: int) -> ObjectDiff:
        fields = (FieldChange("spec.replicas", before, after),) if action == "update" else ()
        return ObjectDiff(
            key, service, "g", "decode", cast(Any, action), before, after, fields, notes=("why",)
        )

    diff = ClusterDiff(
        "c",
        "server-dry-run",
        (
            obj("ns/a-d", "a", "conflict", 7, 4),  # a refused scale change
            obj("ns/a-p", "a", "delete", 2, 0),
            obj("ns/b-d", "b", "conflict", 4, 4),  # refused, but not a scale change
            obj("ns/c-d", "c", "update", 4, 2),
        ),
    )
    assert refused_scale_changes(diff) == {
        "a": "Deployment ns/a-d refused the scale change 7 -> 4: why"
    }
    assert scaled_services(diff) == {"a", "c"}


def test_the_backoff_doubles_up_to_its_cap_however_long_a_cluster_fails() -> None:
    from reconciler.loop.schedule import backoff_delay

    assert [backoff_delay(30.0, 300.0, n) for n in (1, 2, 3, 4, 5)] == [
        30.0,
        60.0,
        120.0,
        240.0,
        300.0,
    ]
    # Days of failures: no OverflowError (30 * 2**1099 is past any float).
    assert backoff_delay(30.0, 300.0, 1100) == 300.0
    assert backoff_delay(86400.0, 300.0, 10**6) == 300.0


def test_a_cycle_with_a_refused_write_keeps_the_recorded_revision_and_saves_the_windows(
    state: DesiredState,
) -> None:
    """`run`'s leader records the revision and plan it applied (what `status` shows as
    deployed) only after a cycle in which no write was refused: a rollout refused
    whole (say, a cluster file's label typo) leaves the cluster on the old revision,
    so the old record stays; the windows are saved after every acting cycle still."""
    from reconciler.apply.report import ClusterDiff, ObjectDiff
    from reconciler.durable import revision_of
    from reconciler.plan import Plan

    class RefusingBackend(RecordingBackend):
        """Applies every plan, or, once ``refuse`` is set, refuses each write (the
        fleet stays as it was), as the Kubernetes backend reports it."""

        refuse = False

        def diff_cluster(self, plan: Plan) -> ClusterDiff:
            action: Any = "error" if self.refuse else "unchanged"
            notes = ("no node has a label 'typo'",) if self.refuse else ()
            objects = tuple(
                ObjectDiff(
                    f"ns/{g.service}-d", g.service, g.group_id, "decode", action, 2, 2, notes=notes
                )
                for g in plan.groups
            )
            return ClusterDiff(plan.cluster, "server-dry-run", objects)

        def apply_cluster(
            self, plan: Plan, writes_refused: Callable[[], str | None] | None = None
        ) -> ClusterDiff:
            if not self.refuse:
                self.apply(plan)
            return self.diff_cluster(plan)

    second = DesiredState(
        policies=state.policies,
        clusters=state.clusters,
        templates={**state.templates, "decode": {"image": "engine:decode-v2"}},
        source_label="second revision",
    )
    desired = [state]
    backend = RefusingBackend("prod-east")
    store = MemoryStore()
    clock = [1000.0]
    loop = make_loop(
        state,
        {"prod-east": backend},
        load_desired=lambda: desired[0],
        state_store=store,
        clock=lambda: clock[0],
    )
    assert loop.run_cycle().clusters[0].applied
    first = store.saved["prod-east"]
    assert first.revision == revision_of(state) and first.last_plan is not None

    desired[0], backend.refuse, clock[0] = second, True, 1030.0
    outcome = loop.run_cycle().clusters[0]
    assert outcome.applied and outcome.refused_objects and not outcome.applied_in_full
    after = store.saved["prod-east"]
    assert after.saved_at_s == 1030.0, "the windows are saved after the cycle"
    assert after.revision == first.revision and after.last_plan == first.last_plan

    backend.refuse, clock[0] = False, 1060.0
    assert loop.run_cycle().clusters[0].applied_in_full
    applied = store.saved["prod-east"]
    assert applied.revision == revision_of(second) != first.revision
    assert applied.last_plan is not None and applied.last_plan.revision == applied.revision.id
    assert applied.last_plan.applied_at_s == 1060.0


def test_one_client_address_cannot_hold_the_slots_the_health_probe_needs(
    state: DesiredState,
) -> None:
    """One client that keeps every connection it may open idle, reopening each as the
    server closes it, held all the slots, and the kubelet's /healthz probes failed for
    as long as it liked. One address holds ``MAX_HTTP_CLIENTS_PER_ADDRESS``; a probe
    from another address is answered meanwhile, and the flooding address's extra
    connections are closed unanswered."""
    import http.client

    loop = make_loop(state, {"prod-east": RecordingBackend("prod-east")})
    server = serve_http(loop, "127.0.0.1", 0)
    address = ("127.0.0.1", server.server_address[1])
    idle = [socket.create_connection(address) for _ in range(MAX_HTTP_CLIENTS)]
    try:
        # The connections past the address's share are closed unanswered as the server
        # accepts them (on a loaded machine, not at once).
        beyond = MAX_HTTP_CLIENTS - reporting.MAX_HTTP_CLIENTS_PER_ADDRESS
        closed: set[int] = set()
        deadline = time.monotonic() + 10.0
        while len(closed) < beyond and time.monotonic() < deadline:
            closed |= {i for i, c in enumerate(idle) if i not in closed and _closed_by_server(c)}
            time.sleep(0.1)
        assert len(closed) == beyond
        for _ in range(3):
            probe = http.client.HTTPConnection(*address, timeout=5, source_address=("127.0.0.2", 0))
            probe.request("GET", "/healthz")
            assert probe.getresponse().status == 200
            probe.close()
    finally:
        for client in idle:
            client.close()
        server.shutdown()


def test_a_hold_on_a_missing_signal_says_why_the_source_read_it_missing() -> None:
    """The signals the hold names come first, at most four, then how many more; a
    decision that is no such hold is left as it is."""
    from reconciler.cycle import with_missing_reasons
    from reconciler.state import ServiceMetrics

    gaps = (
        ("prefill_sm_active", "no series for role prefill"),
        ("decode_sm_active", "no series for role decode"),
        ("decode_kv_usage", "no series for role decode"),
        ("ttft", "no series for role prefill"),
        ("decode_tps", "value is NaN"),
    )
    metrics = ServiceMetrics("chat", gaps=gaps)
    held = Decision("chat", 3, 4, "metrics_missing", "decode_tps missing")
    told = with_missing_reasons(held, metrics)
    assert (told.prefill, told.decode, told.reason) == (3, 4, "metrics_missing")
    assert told.message == (
        "decode_tps missing (read as missing: decode_tps: value is NaN; prefill_sm_active: no "
        "series for role prefill; decode_sm_active: no series for role decode; "
        "decode_kv_usage: no series for role decode; and 1 more)"
    )
    sized = Decision("chat", 3, 4, "scale_out", "decode 4000 ...")
    assert with_missing_reasons(sized, metrics) is sized


def test_an_interval_that_never_covers_a_scale_in_window_is_said_once_per_revision(
    state: DesiredState, caplog: pytest.LogCaptureFixture
) -> None:
    """A scale-in window is covered by a decision at most a window before its start,
    so a service whose window is no longer than half the loop's interval never scales
    in: the loop says which when it reads such a revision, not every cycle. One whose
    window is shorter than the interval but longer than half of it is covered (it
    scales in), and is not named."""

    def said_at(interval_s: float) -> list[Any]:
        caplog.clear()
        backends = {"prod-east": RecordingBackend("prod-east")}
        loop = make_loop(state, backends, interval_s=interval_s)
        with caplog.at_level(logging.WARNING, logger="heteroscale.loop"):
            loop.run_cycle()
            loop.run_cycle()
        return [
            r
            for r in caplog.records
            if getattr(r, "event", "") == "scale_in_window_shorter_than_interval"
        ]

    said = said_at(900.0)
    assert len(said) == 1
    short = [
        f"{name} ({policy.scaling.scale_in_window_s:g} s)"
        for name, policy in sorted(state.policies.items())
        if 0 < policy.scaling.scale_in_window_s <= 450.0
    ]
    assert short and said[0].__dict__["services"] == short
    assert "chat" not in " ".join(short)  # its 600 s window is covered
    # At 450 s the 300 s windows are shorter than the interval, yet covered.
    assert any("(300 s)" in s for s in short)
    assert not said_at(450.0)
    assert not said_at(30.0)


@pytest.mark.parametrize("interval_s", [45.0, 60.0, 90.0, 119.0, 120.0, 121.0, 180.0])
def test_the_window_warning_names_exactly_the_windows_decisions_never_cover(
    state: DesiredState, interval_s: float
) -> None:
    """Decisions made a little later than every ``interval_s`` (a loop's cycles are
    never early): the warning names a 60 s window exactly when those decisions leave
    it uncovered, so that the service never scales in."""
    policy = state.policies["svc-a"]
    scaling = policy.scaling.model_copy(update={"scale_in_window_s": 60.0})
    one = cast(
        DesiredState,
        SimpleNamespace(policies={"svc-a": policy.model_copy(update={"scaling": scaling})}),
    )
    recs = tuple(Recommendation(k * (interval_s + 0.01), 10 - k, 10 - k) for k in range(6))
    never_covered = scale_in_floor(recs, 60.0) is None
    assert bool(windows_never_covered(one, interval_s)) == never_covered
