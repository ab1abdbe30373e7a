"""The reconciler's durable state in a ConfigMap on a real API server: windows survive
a restart and a failover, ``run`` starts on the stored last known good revision when
HEAD is invalid, an unreadable object is ignored, and a stale writer never overwrites
the leader's write."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from kubetestkit import ControlPlane, commit_all, ensure_namespace, git, make_desired_state
from typer.testing import CliRunner

from reconciler.apply.kubeclient import KubeClient, NotFound
from reconciler.apply.statestore import ConfigMapStateStore, configmap_name, configmaps_path
from reconciler.cli import app
from reconciler.desired import DesiredState
from reconciler.desired.models import ServicePolicy
from reconciler.durable import MAX_STATE_BYTES, DurableState, Revision, decode, encode
from reconciler.loop import ReconcileLoop
from reconciler.policy import make_autoscaler
from reconciler.policy.base import PolicyHistory, Recommendation
from reconciler.policy.planner import KeptCapacity, PlannerMemory
from reconciler.state import LengthBuckets, Sample, ServiceMetrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import OneGroupPlacer, RecordingBackend

pytestmark = pytest.mark.kubernetes
NAMESPACE = "state-tests"


class Load:
    """Decode tokens/s every service reports (prompt tokens at four times that)."""

    def __init__(self, tps: float) -> None:
        self.tps = tps

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        return {
            p.name: ServiceMetrics(
                p.name,
                decode_tps=Sample(self.tps, now_s),
                prefill_tps=Sample(4 * self.tps, now_s),
            )
            for p in policies
        }


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _loop(
    state: DesiredState,
    backend: RecordingBackend,
    load: Load,
    clock: Clock,
    store: ConfigMapStateStore | None,
    is_leader: object = lambda: True,
    policy: str = "heteroscale-paper",
) -> ReconcileLoop:
    return ReconcileLoop(
        load_desired=lambda: state,
        backend_for=lambda spec: backend,
        metrics_for=lambda spec: load,
        # The paper policy: its proportional arithmetic on the test policy's hand-set
        # target makes the window arithmetic below exact (scale-in window 300 s, cooldown
        # 120 s); the planner's memory is persisted too (tests/loop/test_durable.py).
        autoscaler=make_autoscaler(policy),
        placer=OneGroupPlacer(),
        clock=clock,
        is_leader=is_leader,  # type: ignore[arg-type]
        state_store=store,
        identity=store.identity if store else "",
    )


class EngineLoad(Load):
    """Everything a vLLM preset reads: rates, latencies, both queues and the length
    histograms (the planner's full input)."""

    LE = (128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, math.inf)

    def __init__(self, tps: float, queued: float) -> None:
        super().__init__(tps)
        self.queued = queued

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        prompts = LengthBuckets(self.LE, (5.0, 20.0, 60.0, 150.0, 190.0, 199.0, 200.0), now_s)
        outputs = LengthBuckets(self.LE, (60.0, 150.0, 190.0, 198.0, 200.0, 200.0, 200.0), now_s)
        return {
            p.name: ServiceMetrics(
                p.name,
                decode_tps=Sample(self.tps, now_s),
                prefill_tps=Sample(4 * self.tps, now_s),
                ttft=Sample(400.0, now_s),
                tbt=Sample(30.0, now_s),
                prefill_queue=Sample(self.queued, now_s),
                decode_queue=Sample(self.queued / 4, now_s),
                prompt_tokens=prompts,
                output_tokens=outputs,
            )
            for p in policies
        }


def _decision(loop: ReconcileLoop) -> tuple[int, str]:
    (outcome,) = loop.run_cycle().clusters
    assert outcome.outcome in ("ok", "standby"), outcome.error
    assert outcome.plan is not None
    decision = outcome.plan.decisions["svc"]
    return decision.decode, decision.reason


def _fresh_store(client: KubeClient, cluster: str, who: str) -> ConfigMapStateStore:
    ensure_namespace(client, NAMESPACE)
    with contextlib.suppress(NotFound):
        client.delete(configmaps_path(NAMESPACE, configmap_name(cluster)))
    return ConfigMapStateStore(client, NAMESPACE, who)


def _run_up_to_the_drop(loop: ReconcileLoop, load: Load, clock: Clock) -> None:
    """8 decode for 300 s from t=1000, then the load drops at t=1330 (2 decode)."""
    for _ in range(11):
        _decision(loop)
        clock.now += 30
    load.tps = 2000
    assert _decision(loop) == (8, "stabilised")
    clock.now += 30


def test_a_restart_resumes_the_scale_in_window(control_plane: ControlPlane, tmp_path: Path) -> None:
    state = make_desired_state(tmp_path, "st-restart")
    store = _fresh_store(control_plane.client(), "st-restart", "replica-a")
    backend, load, clock = RecordingBackend("st-restart"), Load(8000), Clock(1000.0)
    _run_up_to_the_drop(_loop(state, backend, load, clock, store), load, clock)
    while clock.now < 1600:  # the process runs on under the window, then dies
        clock.now += 30
    # A new process (new store, new loop) on the same cluster, right at the window's end.
    restarted = _loop(
        state, backend, load, clock, ConfigMapStateStore(control_plane.client(), NAMESPACE, "b")
    )
    amnesiac = _loop(state, RecordingBackend("st-restart", fleet=backend.fleet), load, clock, None)
    clock.now += 30
    first_after, _ = _decision(restarted)
    assert first_after < 8, "the stored window (high 8s ended at t=1300) has passed: scale in"
    # Without the stored state the window starts again: still held at 8.
    assert _decision(amnesiac) == (8, "stabilised")


def test_a_scale_in_held_by_the_window_stays_held_across_a_restart(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    state = make_desired_state(tmp_path, "st-held")
    store = _fresh_store(control_plane.client(), "st-held", "replica-a")
    backend, load, clock = RecordingBackend("st-held"), Load(8000), Clock(1000.0)
    _run_up_to_the_drop(_loop(state, backend, load, clock, store), load, clock)
    stored = decode(
        control_plane.client().get(configmaps_path(NAMESPACE, configmap_name("st-held")))["data"][
            "state.json"
        ]
    )
    assert stored.histories["svc"].last_change_at_s == 1030.0  # the cooldown's anchor
    # A restart in the middle of the window: the 8s are still inside it.
    restarted = _loop(
        state, backend, load, clock, ConfigMapStateStore(control_plane.client(), NAMESPACE, "b")
    )
    assert _decision(restarted) == (8, "stabilised")
    while clock.now <= 1600:
        assert _decision(restarted)[0] == 8
        clock.now += 30
    for _ in range(3):
        clock.now += 30
        decode_now, _ = _decision(restarted)
    assert decode_now < 8, "the window has passed since t=1330: the scale-in happens"


def test_the_default_planners_memory_is_stored_and_resumed_after_a_restart(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The default planner (``heteroscale``) on an engine's full signals, queues
    included: every cycle's state write succeeds, and a new process resumes the
    forecaster, headroom and queue readings where the old one left them."""
    state = make_desired_state(tmp_path, "st-planner")
    store = _fresh_store(control_plane.client(), "st-planner", "replica-a")
    backend, load, clock = RecordingBackend("st-planner"), EngineLoad(8000, 40.0), Clock(1000.0)
    loop = _loop(state, backend, load, clock, store, policy="heteroscale")
    for k in range(12):
        load.queued = 40.0 + 10 * (k % 3)
        (outcome,) = loop.run_cycle().clusters
        assert outcome.outcome == "ok", outcome.error
        clock.now += 30
    stored = decode(
        control_plane.client().get(configmaps_path(NAMESPACE, configmap_name("st-planner")))[
            "data"
        ]["state.json"]
    )
    memory = stored.histories["svc"].planner
    assert isinstance(memory, PlannerMemory)
    assert memory.prefill_demand.samples == 12 and memory.prefill_backlog is not None
    restarted = _loop(
        state,
        backend,
        load,
        clock,
        ConfigMapStateStore(control_plane.client(), NAMESPACE, "b"),
        policy="heteroscale",
    )
    (outcome,) = restarted.run_cycle().clusters
    assert outcome.outcome == "ok" and outcome.plan is not None, outcome.error
    resumed = outcome.plan.decisions["svc"].history.planner
    assert isinstance(resumed, PlannerMemory)
    assert resumed.prefill_demand.samples == 13  # one more sample on the stored twelve
    assert resumed.prefill_kept.sized[: len(memory.prefill_kept.sized)] == memory.prefill_kept.sized


def test_a_state_at_the_size_limit_is_stored_and_read_back(control_plane: ControlPlane) -> None:
    """The largest document ``encode`` makes fits a ConfigMap on a real API server:
    planner memories for as many services as fit under ``MAX_STATE_BYTES``."""
    store = _fresh_store(control_plane.client(), "st-large", "replica-a")
    rng = random.Random(5)  # values as irregular as a real memory's (compressed alike)
    histories = {}
    for i in range(400):  # more than fit: encode keeps what does
        memory = PlannerMemory(
            prefill_kept=KeptCapacity(
                tuple((1000.0 + 30 * k, rng.uniform(1e4, 1e5)) for k in range(20)),
                tuple(rng.uniform(-0.3, 0.5) for _ in range(120)),
            ),
            decode_kept=KeptCapacity((), tuple(rng.uniform(-0.3, 0.5) for _ in range(120))),
        )
        histories[f"svc-{i:03d}"] = PolicyHistory(planner=memory)
    state = DurableState("st-large", 1000.0, "replica-a", None, histories)
    text, dropped = encode(state)
    assert 0 < dropped < 400 and len(text.encode()) > 0.95 * MAX_STATE_BYTES
    assert store.save(state)
    back = store.load("st-large")
    assert back is not None
    assert sum(h.planner is not None for h in back.histories.values()) == 400 - dropped


@pytest.mark.fault
def test_a_replica_taking_over_the_lease_resumes_the_windows(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    state = make_desired_state(tmp_path, "st-failover")
    client = control_plane.client()
    leader_store = _fresh_store(client, "st-failover", "replica-a")
    roles = {"a": True, "b": False}
    standby_store = ConfigMapStateStore(
        control_plane.client(), NAMESPACE, "replica-b", is_leader=lambda: roles["b"]
    )
    backend, load, clock = RecordingBackend("st-failover"), Load(8000), Clock(1000.0)
    leader = _loop(state, backend, load, clock, leader_store, is_leader=lambda: roles["a"])
    _run_up_to_the_drop(leader, load, clock)
    while clock.now < 1600:
        _decision(leader)
        clock.now += 30
    # replica-b starts now as a standby: its own windows begin here.
    standby = _loop(state, backend, load, clock, standby_store, is_leader=lambda: roles["b"])
    roles.update(a=False, b=True)  # replica-a dies; replica-b takes over the Lease
    clock.now += 30
    decode_now, reason = _decision(standby)
    assert decode_now < 8, (decode_now, reason, "the leader's window had passed: scale in")
    written = decode(
        client.get(configmaps_path(NAMESPACE, configmap_name("st-failover")))["data"]["state.json"]
    )
    assert written.writer == "replica-b"


@pytest.mark.fault
def test_run_with_an_invalid_head_reconciles_to_the_stored_revision(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    make_desired_state(repo, "st-run")
    git(repo, "init", "-q", "-b", "main")
    good = commit_all(repo, "good")
    client = control_plane.client()
    store = _fresh_store(client, "st-run", "previous-process")
    assert store.save(DurableState("st-run", 900.0, "previous-process", Revision("git", good)))
    (repo / "policies" / "svc.yaml").write_text("name: [broken\n")
    git(repo, "commit", "-qam", "broken")
    common = [
        "run",
        "--repo",
        str(repo),
        "--rev",
        "main",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--lease-namespace",
        NAMESPACE,
        "--no-leader-elect",
        "--dry-run",
        "--cycles",
        "1",
        "--interval",
        "0.1",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    kinds = {e.get("event") for e in events}
    assert {"desired_from_store", "desired_invalid", "cycle"} <= kinds, kinds
    from_store = next(e for e in events if e.get("event") == "desired_from_store")
    assert good[:12] in from_store["msg"] and "svc.yaml" in from_store["msg"]
    # Nothing stored: an invalid HEAD still fails clearly.
    client.delete(configmaps_path(NAMESPACE, configmap_name("st-run")))
    failed = CliRunner().invoke(app, common)
    assert failed.exit_code == 1
    assert "no last known good revision stored" in failed.output


@pytest.mark.fault
def test_a_corrupt_state_object_is_ignored_with_a_logged_error(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_desired_state(tmp_path, "st-corrupt")
    client = control_plane.client()
    store = _fresh_store(client, "st-corrupt", "replica-a")
    for data in (
        '{"schema": "heteroscale.io/reconciler-state", "version": 99}',
        "{not json",
        "x" * 300_000,
    ):
        with contextlib.suppress(NotFound):
            client.delete(configmaps_path(NAMESPACE, configmap_name("st-corrupt")))
        client.request(
            "POST",
            configmaps_path(NAMESPACE),
            body={
                "metadata": {"name": configmap_name("st-corrupt")},
                "data": {"state.json": data},
            },
        )
        store = ConfigMapStateStore(client, NAMESPACE, "replica-a")
        loop = _loop(state, RecordingBackend("st-corrupt"), Load(8000), Clock(1000.0), store)
        with caplog.at_level(logging.ERROR, logger="heteroscale"):
            caplog.clear()
            assert _decision(loop) == (4, "scale_out")  # started fresh
        assert any("ignored, starting fresh" in r.getMessage() for r in caplog.records)
        unreadable = loop.metrics.registry.get_sample_value(
            "heteroscale_errors_total", {"cluster": "st-corrupt", "kind": "StateUnreadable"}
        )
        assert unreadable == 1
        # The leader's write replaces the unreadable object.
        stored = decode(
            client.get(configmaps_path(NAMESPACE, configmap_name("st-corrupt")))["data"][
                "state.json"
            ]
        )
        assert stored.writer == "replica-a" and "svc" in stored.histories


@pytest.mark.fault
def test_a_stale_writer_never_overwrites_the_leaders_write(control_plane: ControlPlane) -> None:
    client = control_plane.client()
    roles = {"leader": True, "stale": True}  # both believe they lead at first
    leader = _fresh_store(client, "st-race", "leader")
    leader.is_leader = lambda: roles["leader"]
    stale = ConfigMapStateStore(
        control_plane.client(), NAMESPACE, "stale", is_leader=lambda: roles["stale"]
    )

    def record(who: str, at: float) -> DurableState:
        history = PolicyHistory(recommendations=(Recommendation(at, 1, 2),))
        return DurableState("st-race", at, who, histories={"svc": history})

    assert leader.save(record("leader", 1.0))
    assert leader.load("st-race") is not None and stale.load("st-race") is not None  # both at v1
    # The leader writes (v2); the stale one, which lost the Lease meanwhile, writes with v1.
    assert leader.save(record("leader", 2.0))
    roles["stale"] = False
    assert not stale.save(record("stale", 3.0))
    assert leader.load("st-race").writer == "leader"  # type: ignore[union-attr]
    # The other order: the stale one writes first (still believing it leads), then the
    # leader's write with an old resourceVersion conflicts, re-reads and wins.
    stale.load("st-race")
    roles["stale"] = True
    leader._versions["st-race"] = stale._versions["st-race"]
    assert stale.save(record("stale", 4.0))
    roles["stale"] = False
    assert leader.save(record("leader", 5.0))
    final = leader.load("st-race")
    assert final is not None and final.writer == "leader" and final.saved_at_s == 5.0
