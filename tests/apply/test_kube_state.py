"""The reconciler's durable state in ConfigMaps on a real API server: windows survive
a restart and a failover, ``run`` starts on the stored last known good revision when
HEAD is invalid, an unreadable object is ignored, and a stale writer never overwrites
the leader's write; the planners' memories of hundreds of services in the memory
shards, a corrupt shard losing only its own services', shards written only when
changed and at most once per ``MEMORY_WRITE_INTERVAL_S``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kubetestkit import (
    ControlPlane,
    commit_all,
    ensure_namespace,
    git,
    grant_role,
    make_desired_state,
    service_account_client,
)
from typer.testing import CliRunner

from reconciler.apply.kubeclient import KubeClient, NotFound
from reconciler.apply.statestore import (
    MEMORY_WRITE_INTERVAL_S,
    ConfigMapStateStore,
    Resumed,
    configmap_name,
    configmaps_path,
    memory_shard_names,
    resume_desired_state,
)
from reconciler.cli import app
from reconciler.desired import DesiredState
from reconciler.desired.models import ServicePolicy
from reconciler.durable import (
    DEFAULT_MEMORY_SHARDS,
    MAX_MEMORY_SHARDS,
    MAX_SERVICES,
    MAX_STATE_BYTES,
    DurableState,
    Revision,
    decode,
    encode,
    memory_shard_of,
)
from reconciler.loop import ReconcileLoop
from reconciler.policy import make_autoscaler
from reconciler.policy.base import PolicyHistory, Recommendation
from reconciler.policy.forecast import ForecastState
from reconciler.policy.planner import KeptCapacity, PlannerMemory
from reconciler.state import LengthBuckets, Sample, ServiceMetrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from looptestkit import OneGroupPlacer, RecordingBackend, packed_memory_of_numbers

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


def _fresh_store(
    client: KubeClient, cluster: str, who: str, memory_shards: int | None = None
) -> ConfigMapStateStore:
    """A store on no stored object of ``cluster`` (state object and every shard name)."""
    ensure_namespace(client, NAMESPACE)
    for name in (configmap_name(cluster), *memory_shard_names(cluster, MAX_MEMORY_SHARDS)):
        with contextlib.suppress(NotFound):
            client.delete(configmaps_path(NAMESPACE, name))
    return ConfigMapStateStore(client, NAMESPACE, who, memory_shards=memory_shards)


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


class KilledAtItsWrite(ConfigMapStateStore):
    """A store whose process dies (``SystemExit``) at the first write made once
    ``dies_when()`` holds: what a SIGKILL between a cycle's apply and its state write
    leaves."""

    dies_when: Callable[[], bool] = staticmethod(lambda: False)

    def save(self, state: DurableState) -> bool:
        if self.dies_when():
            raise SystemExit("killed")
        return super().save(state)


@pytest.mark.fault
def test_a_process_killed_between_a_scale_out_and_its_state_write_holds_it_on_restart(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The windows are written ahead of the apply: a restart after a scale-out that was
    applied but never recorded after it still holds the scale-out for the scale-in
    window (without the write-ahead it scaled in at its first cycle)."""
    state = make_desired_state(tmp_path, "st-killed")
    _fresh_store(control_plane.client(), "st-killed", "a")
    store = KilledAtItsWrite(control_plane.client(), NAMESPACE, "a")
    backend, load, clock = RecordingBackend("st-killed"), Load(4000), Clock(1000.0)
    loop = _loop(state, backend, load, clock, store)
    for _ in range(15):  # steady at 4 decode for longer than the window
        assert _decision(loop)[0] == 4
        clock.now += 30

    def decode_running() -> int:
        assert backend.fleet is not None
        return backend.fleet.service_fleet("svc").decode.ready

    load.tps = 8000
    store.dies_when = lambda: decode_running() == 8  # at the first write after the apply
    with pytest.raises(SystemExit):
        _decision(loop)
    assert decode_running() == 8
    clock.now += 30
    load.tps = 4000  # the load falls back at once
    restarted = _loop(
        state, backend, load, clock, ConfigMapStateStore(control_plane.client(), NAMESPACE, "b")
    )
    assert _decision(restarted) == (8, "stabilised")


def test_the_default_planners_memory_is_stored_and_resumed_after_a_restart(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The default planner (``heteroscale``) on an engine's full signals, queues
    included: every cycle's state write succeeds, and a new process resumes the
    forecaster, headroom and queue readings where the old one left them (its memory
    shard written at the first cycle and then once every ``MEMORY_WRITE_INTERVAL_S``:
    what the eleventh cycle, 300 s later, remembered)."""
    state = make_desired_state(tmp_path, "st-planner")
    store = _fresh_store(control_plane.client(), "st-planner", "replica-a")
    backend, load, clock = RecordingBackend("st-planner"), EngineLoad(8000, 40.0), Clock(1000.0)
    loop = _loop(state, backend, load, clock, store, policy="heteroscale")
    for k in range(12):
        load.queued = 40.0 + 10 * (k % 3)
        (outcome,) = loop.run_cycle().clusters
        assert outcome.outcome == "ok", outcome.error
        clock.now += 30
    assert MEMORY_WRITE_INTERVAL_S == 300.0
    stored = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader").load("st-planner")
    assert stored is not None and stored.saved_at_s == 1330.0  # windows: every cycle
    memory = stored.histories["svc"].planner
    assert isinstance(memory, PlannerMemory)
    assert memory.prefill_demand.samples == 11 and memory.prefill_backlog is not None
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
    assert resumed.prefill_demand.samples == 12  # one more sample on the stored eleven
    assert resumed.prefill_kept.sized[: len(memory.prefill_kept.sized)] == memory.prefill_kept.sized


def test_a_state_at_the_size_limit_is_stored_and_read_back(control_plane: ControlPlane) -> None:
    """The largest document ``encode`` makes fits a ConfigMap on a real API server:
    planner memories for as many services as fit under ``MAX_STATE_BYTES`` (no memory
    shards: all in the state object, as ``--state-memory-shards 0`` stores them)."""
    store = _fresh_store(control_plane.client(), "st-large", "replica-a", memory_shards=0)
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
def test_a_state_of_more_services_than_a_reader_takes_is_trimmed_when_written_and_said(
    control_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    """A cluster of more than ``MAX_SERVICES`` services: the state written every cycle
    was one every read refused whole (all windows and memories lost at each restart,
    said only then). Written with the first ``MAX_SERVICES`` in name order, the others
    named when written (``state_trimmed``), and read back."""
    store = _fresh_store(control_plane.client(), "st-many", "replica-a")
    history = PolicyHistory(recommendations=(Recommendation(990.0, 1, 2),), last_change_at_s=990.0)
    histories = {f"svc-{i:04d}": history for i in range(MAX_SERVICES + 1)}
    with caplog.at_level(logging.WARNING, logger="heteroscale"):
        assert store.save(DurableState("st-many", 1000.0, "replica-a", None, histories))
    (trimmed,) = [r for r in caplog.records if getattr(r, "event", "") == "state_trimmed"]
    assert f"svc-{MAX_SERVICES:04d}" in trimmed.getMessage()
    assert trimmed.services_left_out == 1  # type: ignore[attr-defined]
    back = ConfigMapStateStore(control_plane.client(), NAMESPACE, "b").load("st-many")
    assert back is not None and len(back.histories) == MAX_SERVICES
    assert f"svc-{MAX_SERVICES:04d}" not in back.histories


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
def test_only_a_commit_in_the_history_of_the_asked_revision_is_resumed(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The stored last known good revision is text anyone who may edit ConfigMaps in the
    namespace writes: with HEAD invalid at start, ``run`` resumes it only when it is a
    full commit id in the history of the revision asked for. An unreviewed branch's
    commit, or a ref name for Git to resolve, is refused with the reason; the stored
    label is never shown as the revision's."""
    repo = tmp_path / "repo"
    make_desired_state(repo, "st-resume")
    git(repo, "init", "-q", "-b", "main")
    good = commit_all(repo, "good")
    git(repo, "checkout", "-q", "-b", "unreviewed")
    (repo / "policies" / "svc.yaml").write_text(
        (repo / "policies" / "svc.yaml").read_text() + "# not on main\n"
    )
    unreviewed = commit_all(repo, "unreviewed")
    git(repo, "checkout", "-q", "main")
    (repo / "policies" / "svc.yaml").write_text("name: [broken\n")
    git(repo, "commit", "-qam", "broken")
    client = control_plane.client()
    store = _fresh_store(client, "st-resume", "previous-process")

    def resumed(stored: str) -> tuple[Resumed | None, str]:
        label = "main (\x1b[2Jforged)"
        state = DurableState("st-resume", 900.0, "x", Revision("git", stored, label))
        assert store.save(state)
        return resume_desired_state(store, repo, "main", ("st-resume",))

    found, why = resumed(unreviewed)
    assert found is None
    assert f"the stored revision {unreviewed[:12]} is not in the history of main" in why
    for ref in ("unreviewed", "main~1", "--output=/tmp/x"):
        found, why = resumed(ref)
        assert found is None and "is not a full commit id" in why, why
    found, why = resumed(good)
    assert found is not None, why
    assert found.revision.id == good and "forged" not in found.revision.label


@pytest.mark.fault
def test_the_newest_stored_revision_is_resumed_by_git_ancestry_not_a_writers_clock(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two clusters' objects name two commits, both in HEAD's history. The one saved
    at the older commit by a writer whose clock ran an hour ahead (or by a leader of a
    cluster unreachable since) had the largest ``saved_at_s`` and was resumed: a
    rollback to the older commit's policies and images on every cluster. The newer
    commit (a descendant of the older) wins; the clock only decides between commits
    Git cannot order (two sides of a merge); a revision that is no candidate (outside
    HEAD's history) leaves the others resumable."""
    repo = tmp_path / "repo"
    make_desired_state(repo, "st-order")
    git(repo, "init", "-q", "-b", "main")
    base = commit_all(repo, "base")
    policy = repo / "policies" / "svc.yaml"

    def commit_on(branch: str, start: str, line: str, changed: Path = policy) -> str:
        git(repo, "checkout", "-q", "-b", branch, start)
        changed.write_text(changed.read_text() + f"# {line}\n")
        return commit_all(repo, line)

    older = commit_on("older", base, "older")
    newer = commit_on("newer", older, "newer")
    # Beside newer (neither is the other's ancestor), merged into main with it.
    side = commit_on("side", older, "side", repo / "clusters" / "st-order.yaml")
    unreviewed = commit_on("unreviewed", newer, "not on main")
    git(repo, "checkout", "-q", "newer")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "merge", "-q", "-m", "m", "side")
    git(repo, "branch", "-q", "-f", "main")
    git(repo, "checkout", "-q", "main")
    policy.write_text("name: [broken\n")
    commit_all(repo, "HEAD: invalid")
    client = control_plane.client()
    clusters = ("st-order-a", "st-order-b", "st-order-c")
    stores = {c: _fresh_store(client, c, "previous") for c in clusters}

    def resumed(*stored: tuple[str, float]) -> str:
        for cluster, (commit, saved_at_s) in zip(clusters, stored, strict=False):
            state = DurableState(cluster, saved_at_s, "previous", Revision("git", commit))
            assert stores[cluster].save(state)
        asked = clusters[: len(stored)]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="heteroscale"):
            found, why = resume_desired_state(stores[clusters[0]], repo, None, asked)
        assert found is not None, why
        (chosen,) = [r for r in caplog.records if getattr(r, "event", "") == "state_resume_chosen"]
        assert found.revision.id[:12] in chosen.getMessage()
        return found.revision.id

    now = 1_800_000_000.0
    # The older commit saved "later" by a clock an hour ahead: Git orders them.
    assert resumed((older, now + 3600), (newer, now - 60)) == newer
    assert "by Git ancestry" in caplog.records[-1].getMessage()
    # Two sides of a merge: Git cannot order them, the clock decides (and says so).
    assert resumed((side, now - 60), (newer, now - 120)) == side
    assert resumed((side, now - 120), (newer, now - 60)) == newer
    assert "Git cannot order" in caplog.records[-1].getMessage()
    # A commit outside HEAD's history, however late, is no candidate; the others are.
    assert resumed((unreviewed, now + 3600), (older, now - 60), (base, now)) == older
    assert f"{unreviewed[:12]} is not in the history of HEAD" in caplog.records[-1].getMessage()


@pytest.mark.fault
def test_a_corrupt_state_object_is_ignored_with_a_logged_error(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = make_desired_state(tmp_path, "st-corrupt")
    client = control_plane.client()
    store = _fresh_store(client, "st-corrupt", "replica-a")
    # Another cluster's state (a ConfigMap copied or restored under this name): read
    # as this one's, its windows and cooldown went to this cluster's "svc".
    elsewhere = PolicyHistory(
        recommendations=(Recommendation(990.0, 1, 1),), last_change_at_s=990.0
    )
    for data in (
        '{"schema": "heteroscale.io/reconciler-state", "version": 99}',
        "{not json",
        "x" * 300_000,
        encode(DurableState("st-elsewhere", 990.0, "replica-x", None, {"svc": elsewhere}))[0],
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
def test_what_a_stored_state_says_of_itself_is_logged_escaped_and_cut(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer and the revision label a resumed state names, and the service names a
    refused one quotes, are text anyone who may edit the ConfigMap wrote: the text log
    format prints a message as it is, so a line break or a terminal escape in them
    forged a log line or cleared the screen. Logged escaped, and no longer than a Pod
    name."""
    cluster = "st-log-text"
    state = make_desired_state(tmp_path, cluster)
    client = control_plane.client()
    forged = "\x1b[2J\n2024-01-01 ERROR forged line" + "x" * 900
    store = _fresh_store(client, cluster, "replica-a")
    assert store.save(DurableState(cluster, 900.0, forged, Revision("git", "0" * 40, forged)))
    loop = _loop(state, RecordingBackend(cluster), Load(8000), Clock(1000.0), store)
    with caplog.at_level(logging.INFO, logger="heteroscale"):
        caplog.clear()
        _decision(loop)
    (restored,) = [r for r in caplog.records if getattr(r, "event", "") == "state_restored"]
    message = restored.getMessage()
    assert "\x1b" not in message and "\n" not in message
    assert "written by \\x1b[2J\\n2024-01-01 ERROR forged line" in message
    assert len(message) < 800

    obj = client.get(configmaps_path(NAMESPACE, configmap_name(cluster)))
    obj["data"]["state.json"] = json.dumps(
        {
            "schema": "heteroscale.io/reconciler-state",
            "version": 3,
            "memory_shards": 0,
            "cluster": cluster,
            "saved_at_s": 1.0,
            "services": {forged[:40]: {"ttft_ms": "x"}},
        }
    )
    client.request("PUT", configmaps_path(NAMESPACE, configmap_name(cluster)), body=obj)
    store = ConfigMapStateStore(control_plane.client(), NAMESPACE, "replica-b")
    loop = _loop(state, RecordingBackend(cluster), Load(8000), Clock(1030.0), store)
    with caplog.at_level(logging.ERROR, logger="heteroscale"):
        caplog.clear()
        _decision(loop)
    (refused,) = [r for r in caplog.records if getattr(r, "event", "") == "state_unreadable"]
    message = refused.getMessage()
    assert "\x1b" not in message and "\n" not in message
    assert "services.\\x1b[2J\\n2024-01-01 ERROR forged line" in message


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
    name = configmap_name("st-race")
    leader._versions[name] = stale._versions[name]
    assert stale.save(record("stale", 4.0))
    roles["stale"] = False
    assert leader.save(record("leader", 5.0))
    final = leader.load("st-race")
    assert final is not None and final.writer == "leader" and final.saved_at_s == 5.0


@pytest.mark.fault
def test_a_state_object_deleted_under_the_leader_is_created_again(
    control_plane: ControlPlane,
) -> None:
    """Deleting the state object (an operator clearing a corrupt or foreign state, a
    namespace cleanup) left the leader PUTting at the version it last wrote: 404 on
    every later save, nothing stored until a restart. The next save creates it again,
    and so does the next round for a deleted memory shard and ``apply``'s record."""
    client = control_plane.client()
    cluster = "st-deleted"
    store = _fresh_store(client, cluster, "replica-a", memory_shards=2)
    state = _states_at(cluster, services=4, seed=8)
    assert store.save(state(1000.0))
    for name in (configmap_name(cluster), *memory_shard_names(cluster, 2)):
        client.delete(configmaps_path(NAMESPACE, name))
    assert store.save(state(1030.0))
    back = ConfigMapStateStore(client, NAMESPACE, "b").load(cluster)
    assert back is not None and back.saved_at_s == 1030.0
    # The memories wait for their round (at most once every MEMORY_WRITE_INTERVAL_S).
    assert store.save(state(1000.0 + MEMORY_WRITE_INTERVAL_S))
    back = ConfigMapStateStore(client, NAMESPACE, "b").load(cluster)
    assert back is not None and back.histories == state(1000.0 + MEMORY_WRITE_INTERVAL_S).histories

    # ``apply``'s read-modify-write, deleted between its read and its write: read
    # again (nothing there) and created from that.
    recorder = ConfigMapStateStore(client, NAMESPACE, "apply", memory_shards=2)
    seen: list[DurableState | None] = []

    def change(stored: DurableState | None) -> DurableState:
        if not seen:
            client.delete(configmaps_path(NAMESPACE, configmap_name(cluster)))
        seen.append(stored)
        return DurableState(cluster, 2000.0, "apply", Revision("git", "b" * 40))

    assert recorder.update(cluster, change)
    assert seen[0] is not None and seen[1] is None
    recorded = recorder.load(cluster)
    assert recorded is not None and recorded.writer == "apply"


# ------------------------------------------------------------------ memory shards


def _full_memory(rng: random.Random, at_s: float = 1000.0) -> PlannerMemory:
    """As large as a planner's memory grows (a day's curve, the forecaster's pending
    forecasts and errors, an hour of headroom errors per role), with values as
    irregular as a real memory's (they compress alike), and no NaN (compared with ==)."""
    demand = ForecastState(
        samples=960,
        first_at_s=at_s - 28_800,
        last_at_s=at_s,
        last_value=rng.uniform(1e4, 1e5),
        level=rng.uniform(1e4, 1e5),
        trend=rng.uniform(-1.0, 1.0),
        seasonal=1.0,
        day_mean=tuple(rng.uniform(1e4, 1e5) for _ in range(96)),
        day_count=(30.0,) * 96,
        errors=tuple(tuple(rng.uniform(-0.3, 0.3) for _ in range(10)) for _ in range(2)),
    )
    kept = KeptCapacity(
        tuple((at_s - 30 * k, rng.uniform(1e4, 1e5)) for k in range(20)),
        tuple(rng.uniform(-0.3, 0.5) for _ in range(120)),
    )
    return PlannerMemory(
        prefill_demand=demand,
        decode_demand=demand,
        mix_at_s=at_s,
        prefill_kept=kept,
        decode_kept=kept,
        decode_ready_seen=12,
        decode_steady_since_s=at_s - 600,
    )


def _shard_versions(client: KubeClient, cluster: str, shards: int) -> list[str]:
    return [
        client.get(configmaps_path(NAMESPACE, name))["metadata"]["resourceVersion"]
        for name in memory_shard_names(cluster, shards)
    ]


def test_hundreds_of_services_keep_their_planner_memories_across_a_restart(
    control_plane: ControlPlane,
) -> None:
    """500 services, each memory at its largest: far more than the state object alone
    holds, all kept in the default memory shards and read back whole by a new process."""
    client = control_plane.client()
    store = _fresh_store(client, "st-many", "replica-a")
    rng = random.Random(11)
    histories = {
        f"svc-{i:03d}": PolicyHistory(
            recommendations=(Recommendation(990.0, 2, 4),), planner=_full_memory(rng)
        )
        for i in range(500)
    }
    state = DurableState("st-many", 1000.0, "replica-a", Revision("git", "abc"), histories)
    assert encode(state)[1] > 300  # the memories in the state object: most left out
    assert store.save(state)
    for name in memory_shard_names("st-many", DEFAULT_MEMORY_SHARDS):
        text = client.get(configmaps_path(NAMESPACE, name))["data"]["memories.json"]
        assert 0 < len(text.encode()) <= MAX_STATE_BYTES
    main = client.get(configmaps_path(NAMESPACE, configmap_name("st-many")))["data"]["state.json"]
    assert all(h.planner is None for h in decode(main).histories.values())
    restarted = ConfigMapStateStore(control_plane.client(), NAMESPACE, "replica-b")
    assert restarted.load("st-many") == state
    assert restarted.load_problems("st-many") == ()


@pytest.mark.fault
def test_a_raised_shard_count_the_role_does_not_name_loses_no_memory(
    control_plane: ControlPlane,
) -> None:
    """``--state-memory-shards`` raised from 8 to 16 while the Role names the 8 shards
    (deploy/rbac.yaml's set): the new shards are written first, their writes are
    refused, and the round stops there, so the 8 old shards keep the memories that were
    to move. Every memory is read back, at 16 and back at 8 (the old order rewrote
    shards 0-7 first and lost the 24 of 40 memories whose new home it could not write)."""
    cluster = "st-reshard"
    admin = control_plane.client()
    _fresh_store(admin, cluster, "admin")
    named = [configmap_name(cluster), *memory_shard_names(cluster, DEFAULT_MEMORY_SHARDS)]
    account = service_account_client(admin, NAMESPACE, "st-reshard")
    rules = [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "verbs": ["get", "update"],
            "resourceNames": named,
        },
    ]
    grant_role(admin, NAMESPACE, "st-reshard", "st-reshard", rules)
    rng = random.Random(2)
    histories = {f"svc-{i:02d}": PolicyHistory(planner=_full_memory(rng)) for i in range(40)}
    assert ConfigMapStateStore(account, NAMESPACE, "a", memory_shards=8).save(
        DurableState(cluster, 1000.0, "a", None, histories)
    )
    raised = ConfigMapStateStore(account, NAMESPACE, "b", memory_shards=16)
    loaded = raised.load(cluster)
    assert loaded is not None
    assert raised.save(DurableState(cluster, 1030.0, "b", None, loaded.histories))

    def memories_read(shards: int) -> int:
        back = ConfigMapStateStore(account, NAMESPACE, "r", memory_shards=shards).load(cluster)
        assert back is not None
        return sum(h.planner is not None for h in back.histories.values())

    assert memories_read(16) == 40
    assert memories_read(8) == 40


@pytest.mark.fault
def test_a_corrupt_memory_shard_loses_only_its_services_memories(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One shard object corrupted on the API server: a new process reads every other
    shard, reports the corrupt one once (log, ``StateUnreadable``), cycles on with
    those services' planners afresh, and its write replaces the object."""
    cluster = "st-shard-corrupt"
    state = make_desired_state(tmp_path, cluster)  # one service, "svc"
    client = control_plane.client()
    histories = _svc_among_forty_others(seed=3)
    stored = DurableState(cluster, 1000.0, "replica-a", None, histories)
    assert _fresh_store(client, cluster, "replica-a").save(stored)
    bad = memory_shard_of("svc", DEFAULT_MEMORY_SHARDS)
    name = memory_shard_names(cluster, DEFAULT_MEMORY_SHARDS)[bad]
    obj = client.get(configmaps_path(NAMESPACE, name))
    obj["data"]["memories.json"] = '{"schema": "heteroscale.io/reconciler-memories", "ver'
    client.request("PUT", configmaps_path(NAMESPACE, name), body=obj)

    reader = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    back = reader.load(cluster)
    assert back is not None
    lost = {n for n in histories if memory_shard_of(n, DEFAULT_MEMORY_SHARDS) == bad}
    assert "svc" in lost and len(lost) < len(histories)
    for service, history in histories.items():
        expected = None if service in lost else history.planner
        assert back.histories[service].planner == expected, service
    (problem,) = reader.load_problems(cluster)
    assert name in problem and "memory shard" in problem and "not JSON" in problem

    outcome, message = _three_cycles_reporting_once(
        control_plane, state, cluster, Clock(1030.0), caplog
    )
    assert name in message
    assert outcome.plan is not None
    fresh = outcome.plan.decisions["svc"].history.planner
    assert isinstance(fresh, PlannerMemory) and fresh.prefill_demand.samples == 3  # afresh
    # The leader's first write replaced the corrupt object: it reads again.
    again = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader").load(cluster)
    assert again is not None
    memory = again.histories["svc"].planner
    assert isinstance(memory, PlannerMemory) and memory.prefill_demand.samples == 1


@pytest.mark.fault
def test_a_deleted_memory_shard_is_said_not_read_as_an_empty_one(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One shard object deleted on the API server read as an empty shard (an absent
    one stands for that): its services' planners started afresh and nothing said so.
    The state object records how many memories each shard held, so a new process
    reports the absent one (log, ``StateUnreadable``), naming its services; the
    leader's next round writes it again. A state object written before the record
    (none in it) reads as it did, the deletion unseen."""
    cluster = "st-shard-deleted"
    state = make_desired_state(tmp_path, cluster)  # one service, "svc"
    client = control_plane.client()
    histories = _svc_among_forty_others(seed=5)
    writer = _fresh_store(client, cluster, "replica-a")
    # The first save writes the shards after the state object: the second records them.
    for at_s in (1000.0, 1030.0):
        assert writer.save(DurableState(cluster, at_s, "replica-a", None, histories))
    home = memory_shard_of("svc", DEFAULT_MEMORY_SHARDS)
    name = memory_shard_names(cluster, DEFAULT_MEMORY_SHARDS)[home]
    homed = sorted(n for n in histories if memory_shard_of(n, DEFAULT_MEMORY_SHARDS) == home)
    client.delete(configmaps_path(NAMESPACE, name))

    reader = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    back = reader.load(cluster)
    assert back is not None
    assert {n for n, h in back.histories.items() if h.planner is None} == set(homed)
    (problem,) = reader.load_problems(cluster)
    assert f"ConfigMap {NAMESPACE}/{name} absent" in problem, problem
    assert f"records {len(homed)} planner memories in it" in problem, problem
    assert ", ".join(homed[:5]) in problem, problem

    _, message = _three_cycles_reporting_once(control_plane, state, cluster, Clock(1060.0), caplog)
    assert "absent" in message
    again = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    resumed = again.load(cluster)
    assert resumed is not None and again.load_problems(cluster) == ()
    assert isinstance(resumed.histories["svc"].planner, PlannerMemory)

    # Written before the record: the same deletion reads as an empty shard, unsaid.
    path = configmaps_path(NAMESPACE, configmap_name(cluster))
    main = client.get(path)
    document = json.loads(main["data"]["state.json"])
    assert document["memories_per_shard"][home] >= 1
    del document["memories_per_shard"]
    main["data"]["state.json"] = json.dumps(document)
    client.request("PUT", path, body=main)
    client.delete(configmaps_path(NAMESPACE, name))
    old_format = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    unseen = old_format.load(cluster)
    assert unseen is not None and unseen.histories["svc"].planner is None
    assert old_format.load_problems(cluster) == ()

    # A record that does not read (forged, or written by a broken hand) is left out and
    # said; the state object's windows and every shard's memories read as they are.
    main = client.get(path)
    document = json.loads(main["data"]["state.json"])
    document["memories_per_shard"] = [-1, "NaN"]
    main["data"]["state.json"] = json.dumps(document)
    client.request("PUT", path, body=main)
    forged = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    read = forged.load(cluster)
    assert read is not None and read.histories.keys() == unseen.histories.keys()
    assert read.histories["svc"].recommendations == unseen.histories["svc"].recommendations
    (problem,) = forged.load_problems(cluster)
    assert problem.startswith("memories_per_shard") and "left out" in problem


@pytest.mark.fault
def test_shards_full_of_numbers_are_read_within_one_budget(control_plane: ControlPlane) -> None:
    """Anyone who may edit ConfigMaps in the reconciler's namespace can write the state
    object, which names how many memory shards to read (up to 64), and the shards: a
    memory of "0," repeated packs 1.5 million numbers into a few KB. One load reads at
    most ``_LOAD_NUMBERS`` of them over every shard together (with a budget per shard,
    64 shards of four such memories took 6 minutes and 25 GB to read); the shards
    past it are reported and their services' planners start afresh."""
    cluster = "st-shard-numbers"
    client = control_plane.client()
    services = {f"svc-{k}": PolicyHistory() for k in range(4)}
    assert _fresh_store(client, cluster, "writer", memory_shards=4).save(
        DurableState(cluster, 1000.0, "writer", None, services)
    )
    memory = packed_memory_of_numbers(1_500_000)
    for k, name in enumerate(memory_shard_names(cluster, 4)):
        obj = client.get(configmaps_path(NAMESPACE, name))
        obj["data"]["memories.json"] = json.dumps(
            {
                "schema": "heteroscale.io/reconciler-memories",
                "version": 1,
                "cluster": cluster,
                "memories": {f"svc-{k}": memory},
            }
        )
        client.request("PUT", configmaps_path(NAMESPACE, name), body=obj)

    reader = ConfigMapStateStore(control_plane.client(), NAMESPACE, "reader")
    back = reader.load(cluster)
    assert back is not None
    assert [n for n, h in sorted(back.histories.items()) if h.planner] == ["svc-0", "svc-1"]
    problems = reader.load_problems(cluster)
    assert len(problems) == 2
    assert all("beyond the 4,000,000 numbers" in problem for problem in problems), problems


def test_memory_shards_are_written_only_when_changed_and_at_most_once_per_interval(
    control_plane: ControlPlane,
) -> None:
    """Counted by the objects' resourceVersions: the state object is written on every
    save; a shard only when its memories changed, and then not within
    ``MEMORY_WRITE_INTERVAL_S`` of its last write (a restart loses at most that)."""
    client = control_plane.client()
    cluster = "st-interval"
    store = _fresh_store(client, cluster, "replica-a", memory_shards=4)
    rng = random.Random(5)
    memories = {f"svc-{i}": _full_memory(rng) for i in range(12)}
    changing = memory_shard_of("svc-0", 4)

    def save(at_s: float, svc0_at_s: float = 1000.0) -> str:
        histories = {
            n: PolicyHistory(planner=replace(m, mix_at_s=svc0_at_s) if n == "svc-0" else m)
            for n, m in memories.items()
        }
        assert store.save(DurableState(cluster, at_s, "replica-a", None, histories))
        obj = client.get(configmaps_path(NAMESPACE, configmap_name(cluster)))
        return str(obj["metadata"]["resourceVersion"])

    interval = MEMORY_WRITE_INTERVAL_S
    main = save(1000.0)
    first = _shard_versions(client, cluster, 4)
    # Unchanged: no shard rewritten; the state object is, on every save.
    assert save(1030.0) != main and _shard_versions(client, cluster, 4) == first
    # svc-0's memory changes within the interval since its shard's last write (t=1000):
    # held...
    save(1060.0, svc0_at_s=1060.0)
    assert _shard_versions(client, cluster, 4) == first
    # ... and written once the interval has passed, that shard only.
    save(1000.0 + interval, svc0_at_s=1060.0)
    second = _shard_versions(client, cluster, 4)
    assert [a != b for a, b in zip(first, second, strict=True)] == [k == changing for k in range(4)]
    save(1030.0 + interval, svc0_at_s=1030.0 + interval)  # changed again: held
    assert _shard_versions(client, cluster, 4) == second
    # A restart now resumes svc-0's memory as last written (at most the interval old).
    restarted = ConfigMapStateStore(control_plane.client(), NAMESPACE, "b").load(cluster)
    assert restarted is not None and restarted.saved_at_s == 1030.0 + interval
    kept = restarted.histories["svc-0"].planner
    assert kept is not None and kept.mix_at_s == 1060.0
    save(1000.0 + 2 * interval, svc0_at_s=1030.0 + interval)
    third = _shard_versions(client, cluster, 4)
    assert third[changing] != second[changing]
    # Unchanged, long after: still not rewritten.
    save(1000.0 + 10 * interval, svc0_at_s=1030.0 + interval)
    assert _shard_versions(client, cluster, 4) == third


def _states_at(cluster: str, services: int, seed: int) -> Callable[[float], DurableState]:
    """The states of ``services`` services with full planner memories, saved at a given
    time (their memories stamped with it, so each time's differ)."""
    rng = random.Random(seed)
    memories = {f"svc-{i}": _full_memory(rng) for i in range(services)}

    def state(at_s: float) -> DurableState:
        histories = {
            n: PolicyHistory(planner=replace(m, mix_at_s=at_s)) for n, m in memories.items()
        }
        return DurableState(cluster, at_s, "replica-a", None, histories)

    return state


def test_a_graceful_stop_flushes_the_memories_the_interval_held_back(
    control_plane: ControlPlane,
) -> None:
    """``flush_memories`` (``run`` calls it on SIGTERM, before releasing the Lease)
    writes the last saved state's memories that the interval held back, so a rolling
    update resumes them all; with nothing held back it writes nothing."""
    client = control_plane.client()
    cluster = "st-flush"
    store = _fresh_store(client, cluster, "replica-a", memory_shards=4)
    state = _states_at(cluster, services=12, seed=6)
    assert store.save(state(1000.0))  # the shards written
    assert store.save(state(1030.0))  # held: within the interval
    held = ConfigMapStateStore(client, NAMESPACE, "b").load(cluster)
    assert held is not None
    assert {h.planner.mix_at_s for h in held.histories.values() if h.planner} == {1000.0}
    store.flush_memories()
    flushed = ConfigMapStateStore(client, NAMESPACE, "b").load(cluster)
    assert flushed is not None and flushed.histories == state(1030.0).histories
    versions = _shard_versions(client, cluster, 4)
    store.flush_memories()  # nothing held back any more
    assert _shard_versions(client, cluster, 4) == versions


@pytest.mark.fault
def test_a_flush_stops_at_an_api_server_that_does_not_answer(
    control_plane: ControlPlane,
) -> None:
    """Saved through the real API server, flushed against one that accepts connections
    and never answers: the round stops at the first shard's failure instead of waiting
    out every shard's retries, and ``run``'s bounded wait returns in its own time."""
    import socket
    import threading
    import time

    from reconciler.apply.kubeclient import RetryPolicy
    from reconciler.commands.reconcile import flush_memories_bounded

    client = control_plane.client()
    cluster = "st-flush-dead"
    store = _fresh_store(client, cluster, "replica-a", memory_shards=8)
    state = _states_at(cluster, services=24, seed=7)
    assert store.save(state(1000.0)) and store.save(state(1030.0))  # the second held back
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(silent.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        store.client = KubeClient(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            timeout_s=(0.5, 0.5),
            retry=RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.01),
        )
        started = time.monotonic()
        store.flush_memories()
        assert store.client.stats.requests == 2  # one shard's attempts, then it stopped
        assert time.monotonic() - started < 3.0
        store.client = KubeClient(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            timeout_s=(0.5, 30.0),  # a read that would hang for half a minute
            retry=RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.01),
        )
        started = time.monotonic()
        assert flush_memories_bounded(store, wait_s=1.0) is False
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        silent.close()
        for conn in accepted:
            conn.close()


def test_a_new_shard_count_reads_the_old_shards_and_moves_the_memories(
    control_plane: ControlPlane,
) -> None:
    """Written with 8 shards, read by a replica configured for 3: every memory found
    (the document lists the 8), then written where 3 shards place them."""
    client = control_plane.client()
    cluster = "st-reshard"
    rng = random.Random(8)
    histories = {f"svc-{i:02d}": PolicyHistory(planner=_full_memory(rng)) for i in range(30)}
    state = DurableState(cluster, 1000.0, "replica-a", None, histories)
    assert _fresh_store(client, cluster, "replica-a", memory_shards=8).save(state)
    three = ConfigMapStateStore(control_plane.client(), NAMESPACE, "b", memory_shards=3)
    assert three.load(cluster) == state
    moved = DurableState(cluster, 1030.0, "b", None, histories)
    assert three.save(moved)
    main = client.get(configmaps_path(NAMESPACE, configmap_name(cluster)))["data"]["state.json"]
    assert json.loads(main)["memory_shards"] == 3
    for k, name in enumerate(memory_shard_names(cluster, 3)):
        text = client.get(configmaps_path(NAMESPACE, name))["data"]["memories.json"]
        assert {memory_shard_of(n, 3) for n in json.loads(text)["memories"]} == {k}
    assert ConfigMapStateStore(control_plane.client(), NAMESPACE, "c").load(cluster) == moved


@pytest.mark.parametrize("lower", [3, 0])
def test_a_smaller_shard_count_empties_the_shards_it_no_longer_writes(
    control_plane: ControlPlane, lower: int
) -> None:
    """Lowered from 8 shards to 3 (or to 0: the memories in the state object), the
    leader writes the shards past the new count empty. Raised to 8 again, a count reads
    a service's home shard first: had an old memory stayed there, it would win over the
    one written since wherever the raised count's shard writes had not yet landed (here:
    the replica lost the Lease between the state object and its shards)."""
    client = control_plane.client()
    cluster = f"st-shrink-{lower}"
    rng = random.Random(lower)
    old = {f"svc-{i:02d}": PolicyHistory(planner=_full_memory(rng)) for i in range(30)}
    new = {name: PolicyHistory(planner=_full_memory(rng, at_s=1030.0)) for name in old}
    first = _fresh_store(client, cluster, "a", memory_shards=8)
    assert first.save(DurableState(cluster, 1000.0, "a", None, old))
    smaller = ConfigMapStateStore(control_plane.client(), NAMESPACE, "b", memory_shards=lower)
    smaller.load(cluster)
    assert smaller.save(DurableState(cluster, 1030.0, "b", None, new))
    for name in memory_shard_names(cluster, 8)[lower:]:
        text = client.get(configmaps_path(NAMESPACE, name))["data"]["memories.json"]
        assert json.loads(text)["memories"] == {}

    leads = iter([True])  # leads for the state object's write, then no longer
    raised = ConfigMapStateStore(
        control_plane.client(),
        NAMESPACE,
        "c",
        memory_shards=8,
        is_leader=lambda: next(leads, False),
    )
    raised.load(cluster)
    assert raised.save(DurableState(cluster, 1060.0, "c", None, new))
    loaded = ConfigMapStateStore(control_plane.client(), NAMESPACE, "d").load(cluster)
    assert loaded is not None
    for name, history in loaded.histories.items():
        # 3 shards: each memory still in the shard the 3 placed it in; 0: the state
        # object listing 8 shards holds none itself, so none is read. Never an old one.
        expected = new[name].planner if lower else None
        assert history.planner == expected, name


def _three_cycles_reporting_once(
    control_plane: ControlPlane,
    state: DesiredState,
    cluster: str,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> tuple[Any, str]:
    """Three cycles of a new replica's loop on the stored state: each ok, the stored
    memories' problem logged once and counted once (``StateUnreadable``). The last
    cycle's outcome and the logged message."""
    store = ConfigMapStateStore(control_plane.client(), NAMESPACE, "replica-b")
    loop = _loop(
        state, RecordingBackend(cluster), EngineLoad(8000, 40.0), clock, store, policy="heteroscale"
    )
    with caplog.at_level(logging.ERROR, logger="heteroscale"):
        caplog.clear()
        for _ in range(3):
            (outcome,) = loop.run_cycle().clusters
            assert outcome.outcome == "ok", outcome.error
            clock.now += 30
    reports = [r for r in caplog.records if getattr(r, "event", "") == "state_memories_unreadable"]
    assert len(reports) == 1, caplog.records
    unreadable = loop.metrics.registry.get_sample_value(
        "heteroscale_errors_total", {"cluster": cluster, "kind": "StateUnreadable"}
    )
    assert unreadable == 1
    return outcome, reports[0].getMessage()


def _svc_among_forty_others(seed: int) -> dict[str, PolicyHistory]:
    """Full planner memories for "svc" and forty other services, spread over the
    default shards."""
    rng = random.Random(seed)
    histories = {f"other-{i:02d}": PolicyHistory(planner=_full_memory(rng)) for i in range(40)}
    histories["svc"] = PolicyHistory(planner=_full_memory(rng))
    return histories
