"""One slow cluster holds no other: with ``cluster_workers`` each cluster's cycle runs
on its own thread within a deadline; a cycle past it is reported, never started twice,
and accounted when it ends. Fakes only (the real API server: tests/apply/
test_kube_slow_cluster.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from looptestkit import (
    FixedAutoscaler,
    MemoryStore,
    OneGroupPlacer,
    RecordingBackend,
    StaticMetrics,
)
from test_loop import two_cluster_state
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.errors import ClusterUnavailable
from reconciler.loop import ReconcileLoop
from reconciler.loop.schedule import MIN_DEFAULT_CLUSTER_DEADLINE_S, default_cluster_deadline
from reconciler.observe.base import Observation
from reconciler.plan import Plan
from reconciler.state import ServiceMetrics

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 0.5
HELD_S = 20.0  # how long a blocked fake waits for its release at most


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return two_cluster_state(load_desired_state(REPO))


@dataclass
class BlockingBackend(RecordingBackend):
    """A cluster whose API server answers its reads only once ``gate`` is set (each
    answer within every bound of the client: it is slow, not down)."""

    gate: threading.Event = field(default_factory=threading.Event)
    observed: int = 0
    applied_at: list[float] = field(default_factory=list)
    fail_after_gate: Exception | None = None

    def observe(self, cluster: ClusterSpec, policies: Sequence[ServicePolicy]) -> Observation:
        self.observed += 1
        assert self.gate.wait(HELD_S), "never released"
        if self.fail_after_gate is not None:
            raise self.fail_after_gate
        return super().observe(cluster, policies)

    def apply(self, plan: Plan) -> list[str]:
        self.applied_at.append(time.monotonic())
        return super().apply(plan)


@dataclass
class BlockingMetrics:
    """A Prometheus read that answers only once ``gate`` is set."""

    gate: threading.Event = field(default_factory=threading.Event)

    def fetch(self, policies: Sequence[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        assert self.gate.wait(HELD_S), "never released"
        return StaticMetrics().fetch(policies, now_s)


@pytest.fixture
def gates() -> list[threading.Event]:
    """Every gate a test blocks on: released at its end (``make_loop``)."""
    return []


@pytest.fixture
def make_loop(gates: list[threading.Event]) -> Iterator[Any]:
    """Builds loops over the fakes; at the end of the test releases every gate and
    waits for the loops' cycles, so no thread outlives its test (nor logs into the
    next one's records)."""
    loops: list[ReconcileLoop] = []

    def build(
        state: DesiredState,
        backends: dict[str, RecordingBackend],
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ReconcileLoop:
        kwargs.setdefault("cluster_workers", 4)
        kwargs.setdefault("cluster_deadline_s", DEADLINE_S)
        loops.append(
            ReconcileLoop(
                load_desired=lambda: state,
                backend_for=lambda spec: backends[spec.name],
                metrics_for=lambda spec: (metrics or {}).get(spec.name, StaticMetrics()),
                autoscaler=FixedAutoscaler(),
                placer=OneGroupPlacer(),
                clock=lambda: 1000.0,
                **kwargs,
            )
        )
        return loops[-1]

    yield build
    for gate in gates:
        gate.set()
    for loop in loops:
        assert loop.runs is None or not loop.runs.drain(HELD_S)


def _metric(loop: ReconcileLoop, name: str, **labels: str) -> float:
    value = loop.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("slow", ["api server", "prometheus"])
def test_a_slow_cluster_does_not_delay_another_clusters_decision_and_apply(
    state: DesiredState, gates: list[threading.Event], make_loop: Any, slow: str
) -> None:
    # prod-east comes first, as it did in turn: its reads hang; prod-west goes on.
    east = BlockingBackend("prod-east") if slow == "api server" else RecordingBackend("prod-east")
    west = BlockingBackend("prod-west")
    west.gate.set()
    east_metrics = BlockingMetrics()
    gates.extend([getattr(east, "gate", east_metrics.gate), east_metrics.gate])
    # Released long after the deadline: in turn, prod-west would wait for it.
    release = threading.Timer(3.0, gates[0].set)
    release.start()
    loop = make_loop(
        state,
        {"prod-east": east, "prod-west": west},
        {"prod-east": east_metrics} if slow == "prometheus" else None,
    )
    started = time.monotonic()
    result = loop.run_cycle()
    took = time.monotonic() - started
    assert took < DEADLINE_S + 1.0, took
    assert west.applied and west.applied_at[0] - started < DEADLINE_S + 0.5
    east_report, west_report = result.clusters
    assert west_report.outcome == "ok" and west_report.applied
    assert west_report.plan is not None and west_report.plan.decisions
    assert east_report.outcome == "error" and not east_report.applied
    assert east_report.error is not None
    assert east_report.error.startswith("CycleOverdue: still running after 0.5 s (deadline 0.5 s)")
    assert result.has_errors
    release.cancel()


def test_an_overdue_cycle_is_reported_not_started_twice_and_accounted_when_it_ends(
    state: DesiredState,
    gates: list[threading.Event],
    make_loop: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    east, west = BlockingBackend("prod-east"), RecordingBackend("prod-west")
    gates.append(east.gate)
    store = MemoryStore()
    loop = make_loop(state, {"prod-east": east, "prod-west": west}, state_store=store)
    with caplog.at_level(logging.INFO, logger="heteroscale.loop"):
        first = loop.run_cycle()
        # While it runs: reported again, with how long it has run, not started again.
        assert _metric(loop, "heteroscale_cycle_running_seconds", cluster="prod-east") > 0
        assert _metric(loop, "heteroscale_cycle_running_seconds", cluster="prod-west") == 0
        second = loop.run_cycle()
        assert [c.outcome for c in first.clusters] == ["error", "ok"]
        assert [c.outcome for c in second.clusters] == ["error", "ok"]
        (east_again, _) = second.clusters
        assert east_again.error is not None and "still running after" in east_again.error
        assert east_again.duration_s >= DEADLINE_S
        assert east.observed == 1, "never two cycles of one cluster at once"
        assert len(west.applied) == 2 and not west.applied[1].has_changes
        assert (
            _metric(loop, "heteroscale_errors_total", cluster="prod-east", kind="CycleOverdue") == 2
        )
        assert _metric(loop, "heteroscale_cycles_total", cluster="prod-east", outcome="ok") == 0
        overdue = [r for r in caplog.records if getattr(r, "event", "") == "cycle_overdue"]
        assert [r.cluster for r in overdue] == ["prod-east", "prod-east"]  # type: ignore[attr-defined]
        assert (
            overdue[0]
            .getMessage()
            .startswith(
                "cluster prod-east: CycleOverdue: still running after 0.5 s (deadline 0.5 s)"
            )
        )

        # It ends: its work stands (applied, its windows stored) and is accounted.
        east.gate.set()
        _wait_until(lambda: loop.runs is not None and not loop.runs.ages(), "the late cycle")
        assert len(east.applied) == 1 and "prod-east" in store.saved
        assert _metric(loop, "heteroscale_cycles_total", cluster="prod-east", outcome="ok") == 1
        assert _metric(loop, "heteroscale_cycle_running_seconds", cluster="prod-east") == 0
        ended = [r for r in caplog.records if getattr(r, "event", "") == "cycle_overdue_ended"]
        assert len(ended) == 1 and ended[0].outcome == "ok" and ended[0].applied  # type: ignore[attr-defined]
        third = loop.run_cycle()
    (late,) = third.finished_late
    assert late.cluster == "prod-east" and late.applied and late.outcome == "ok"
    assert late.duration_s >= DEADLINE_S
    assert [c.outcome for c in third.clusters] == ["ok", "ok"] and east.observed == 2
    assert not third.finished_late or loop.run_cycle().finished_late == []


def test_an_overdue_cycle_that_fails_counts_towards_the_clusters_backoff(
    state: DesiredState, gates: list[threading.Event], make_loop: Any
) -> None:
    east = BlockingBackend(
        "prod-east", fail_after_gate=ClusterUnavailable("the list took longer than its bound")
    )
    gates.append(east.gate)
    loop = make_loop(state, {"prod-east": east, "prod-west": RecordingBackend("prod-west")})
    loop.run_cycle()
    east.gate.set()
    _wait_until(lambda: loop.runs is not None and not loop.runs.ages(), "the late cycle")
    result = loop.run_cycle()  # the first failure retries at once, as in turn
    (late,) = result.finished_late
    assert late.outcome == "error" and "took longer than its bound" in (late.error or "")
    assert result.clusters[0].outcome == "error"  # started again and failed again
    _wait_until(lambda: loop.runs is not None and not loop.runs.ages(), "the second cycle")
    assert loop.run_cycle().clusters[0].outcome == "skipped"  # then it backs off
    assert (
        _metric(loop, "heteroscale_errors_total", cluster="prod-east", kind="ClusterUnavailable")
        == 2
    )


def test_a_cycle_still_running_at_the_stop_does_not_apply_after_it(
    state: DesiredState,
    gates: list[threading.Event],
    make_loop: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    east, west = BlockingBackend("prod-east"), RecordingBackend("prod-west")
    gates.append(east.gate)
    loop = make_loop(state, {"prod-east": east, "prod-west": west})
    loop.run_cycle()
    with caplog.at_level(logging.WARNING, logger="heteroscale.loop"):
        assert loop.stop_cycles(wait_s=0.1) == ["prod-east"]
        east.gate.set()  # its reads answer after the stop (and the Lease's release)
        _wait_until(lambda: loop.runs is not None and not loop.runs.ages(), "the late cycle")
    assert east.applied == [] and len(east.diffed) == 1
    events = {getattr(r, "event", ""): r.getMessage() for r in caplog.records}
    assert events["cycle_abandoned"].startswith(
        "cluster prod-east: its cycle still runs at the stop"
    )
    assert events["apply_withheld"] == "cluster prod-east: not applied: the loop is stopping"


def test_a_stop_in_the_middle_of_a_loop_cycle_is_seen_at_once_and_nothing_applies_after_it(
    state: DesiredState, gates: list[threading.Event], make_loop: Any
) -> None:
    """A signal sets run's stop while a loop cycle waits for a slow cluster: the wait
    ends at once (it waited out the cluster deadline, the interval by default, before
    the stop was seen), and the cycle, whose reads answer a second after the stop,
    applies nothing (one applied 12.8 s after a SIGTERM)."""
    east, west = BlockingBackend("prod-east"), RecordingBackend("prod-west")
    gates.append(east.gate)
    loop = make_loop(
        state,
        {"prod-east": east, "prod-west": west},
        cluster_deadline_s=8.0,
        interval_s=8.0,
        stop_wait_s=2.0,
    )
    stop = threading.Event()
    forever = threading.Thread(target=loop.run_forever, args=(stop,))
    forever.start()
    _wait_until(lambda: east.observed == 1, "east's cycle in flight")
    stopped_at = time.monotonic()
    stop.set()
    time.sleep(1.0)
    east.gate.set()  # its reads answer a second after the stop
    forever.join(30)
    assert time.monotonic() - stopped_at < 5.0, "the stop waited out the cluster deadline"
    assert not [at for at in east.applied_at if at > stopped_at], "applied after the stop"


def test_a_bug_in_one_clusters_cycle_is_that_clusters_error(
    state: DesiredState, make_loop: Any, caplog: pytest.LogCaptureFixture
) -> None:
    east = RecordingBackend("prod-east", fail_with=KeyError("a bug"))
    west = RecordingBackend("prod-west")
    loop = make_loop(state, {"prod-east": east, "prod-west": west})
    with caplog.at_level(logging.ERROR, logger="heteroscale.loop"):
        east_report, west_report = loop.run_cycle().clusters
    assert east_report.outcome == "error" and east_report.error == "KeyError: 'a bug'"
    assert west_report.applied
    (logged,) = [r for r in caplog.records if getattr(r, "event", "") == "cluster_error"]
    assert logged.exc_info is not None, "a bug is logged with its traceback"


def test_the_deadline_follows_the_interval(state: DesiredState, make_loop: Any) -> None:
    assert default_cluster_deadline(30.0) == 30.0
    assert default_cluster_deadline(300.0) == 300.0
    assert default_cluster_deadline(1.0) == MIN_DEFAULT_CLUSTER_DEADLINE_S == 10.0
    backends: dict[str, RecordingBackend] = {}
    for interval, given, expected in [(30.0, None, 30.0), (120.0, None, 120.0), (30.0, 5.0, 5.0)]:
        loop = make_loop(state, backends, interval_s=interval, cluster_deadline_s=given)
        assert loop.cluster_deadline_s == expected
    help_text = " ".join(
        CliRunner().invoke(app, ["run", "--help"], terminal_width=200).output.split()
    )
    row = help_text[help_text.index("--cluster-deadline") :][:400]
    assert f"default: the interval, at least {MIN_DEFAULT_CLUSTER_DEADLINE_S:g} s" in row
