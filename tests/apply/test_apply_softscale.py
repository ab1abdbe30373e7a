"""Soft scale-in as a pure function of one workload's state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.apply.softscale import PodView, plan_scale, slo_status
from reconciler.desired import load_desired_state
from reconciler.state import Sample, ServiceMetrics

HASH = "h1"


def pod(
    i: int, ready: bool = True, template_hash: str = HASH, drained_at_s: float | None = None
) -> PodView:
    return PodView(f"p{i}", ready, f"2026-01-01T00:00:{i:02d}Z", template_hash, drained_at_s)


def scale(**kwargs):  # type: ignore[no-untyped-def]
    defaults = {
        "serving": [],
        "drained": [],
        "template_hash": HASH,
        "slo": "held",
        "now_s": 1000.0,
        "window_s": 60.0,
    }
    return plan_scale(**{**defaults, **kwargs})


def test_scale_in_drains_the_newest_ready_pods_and_keeps_them_running() -> None:
    plan = scale(desired=2, live_replicas=4, serving=[pod(1), pod(2), pod(3), pod(4)])
    assert plan.replicas == 2
    assert plan.drain == ("p4", "p3")
    assert plan.finish == ()


def test_unready_pods_are_removed_by_replicas_alone() -> None:
    plan = scale(desired=2, live_replicas=4, serving=[pod(1), pod(2), pod(3, ready=False), pod(4)])
    assert plan.replicas == 2 and plan.drain == ("p4",)


def test_drained_pods_are_deleted_after_the_window_if_slos_held() -> None:
    drained = [pod(5, drained_at_s=900.0), pod(6, drained_at_s=990.0)]
    plan = scale(desired=2, live_replicas=2, serving=[pod(1), pod(2)], drained=drained)
    assert plan.finish == ("p5",) and plan.replicas == 2
    assert any("deleted in 50 s" in n for n in plan.notes)
    unknown = scale(
        desired=2, live_replicas=2, serving=[pod(1), pod(2)], drained=drained, slo="unknown"
    )
    assert unknown.finish == () and unknown.put_back == ()


def test_an_slo_breach_puts_every_drained_pod_back_and_holds_scale_in() -> None:
    drained = [pod(5, drained_at_s=990.0), pod(6, drained_at_s=900.0, template_hash="old")]
    plan = scale(
        desired=1, live_replicas=2, serving=[pod(1), pod(2)], drained=drained, slo="broken"
    )
    assert plan.put_back == ("p5",), "only Pods on the current template can rejoin"
    assert plan.replicas == 3 and plan.drain == () and plan.finish == ()


def test_scale_out_puts_drained_pods_back_before_creating_new_ones() -> None:
    drained = [pod(5, drained_at_s=900.0), pod(6, drained_at_s=990.0)]
    plan = scale(desired=3, live_replicas=2, serving=[pod(1), pod(2)], drained=drained)
    assert plan.put_back == ("p6",) and plan.replicas == 3
    assert plan.finish == ("p5",), "the other one's window passed"


def test_no_window_means_drain_and_delete_in_one_cycle() -> None:
    plan = scale(desired=1, live_replicas=2, serving=[pod(1), pod(2)], window_s=0.0)
    assert plan.drain == ("p2",) and plan.finish == ("p2",)


def test_a_workload_leaving_the_placement_is_drained_then_deleted() -> None:
    plan = scale(desired=0, live_replicas=2, serving=[pod(1), pod(2)], template_hash=None)
    assert plan.delete_workload and plan.replicas == 0 and sorted(plan.drain) == ["p1", "p2"]


pods = st.lists(st.booleans(), max_size=8).map(
    lambda flags: [pod(i, ready) for i, ready in enumerate(flags)]
)
drained_pods = st.lists(
    st.tuples(st.floats(0, 2000), st.sampled_from([HASH, "old"])), max_size=5
).map(lambda items: [pod(50 + i, True, h, at) for i, (at, h) in enumerate(items)])


@given(
    desired=st.integers(0, 10),
    serving=pods,
    drained=drained_pods,
    slo=st.sampled_from(["held", "broken", "unknown"]),
    window_s=st.sampled_from([0.0, 60.0, 600.0]),
)
@settings(max_examples=300, deadline=None)
def test_invariants(
    desired: int, serving: list[PodView], drained: list[PodView], slo: str, window_s: float
) -> None:
    live = len(serving)
    plan = scale(
        desired=desired,
        live_replicas=live,
        serving=serving,
        drained=drained,
        slo=slo,
        window_s=window_s,
    )
    drained_names = {p.name for p in drained}
    serving_names = {p.name for p in serving}
    # Names stay in their lanes; nothing is both put back and deleted.
    assert set(plan.drain) <= serving_names and set(plan.put_back) <= drained_names
    assert not set(plan.put_back) & set(plan.finish)
    assert set(plan.finish) <= drained_names | set(plan.drain)
    if slo == "broken":
        # Capacity is never reduced while SLOs are broken, and nothing is deleted.
        assert plan.replicas >= max(desired, live) and not plan.drain and not plan.finish
    else:
        assert plan.replicas == desired
        assert len(plan.drain) <= max(0, live - desired)
        assert len(plan.put_back) <= max(0, desired - live)
        if desired >= live:
            assert not plan.drain
    if slo != "held":
        assert not plan.finish, "deletion needs SLOs that held"
    for name in plan.put_back:
        assert next(p for p in drained if p.name == name).template_hash == HASH


def test_slo_status_needs_fresh_ttft_and_tbt() -> None:
    from pathlib import Path

    policy = load_desired_state(Path(__file__).resolve().parents[2]).policies[
        "chat"
    ]  # TTFT 1500 ms, TBT 50 ms
    fresh = lambda v: Sample(v, 100.0)  # noqa: E731
    assert (
        slo_status(policy, ServiceMetrics("chat", ttft=fresh(900), tbt=fresh(40)), 100.0) == "held"
    )
    assert (
        slo_status(policy, ServiceMetrics("chat", ttft=fresh(1600), tbt=fresh(40)), 100.0)
        == "broken"
    )
    assert slo_status(policy, ServiceMetrics("chat", ttft=fresh(900)), 100.0) == "unknown"
    assert (
        slo_status(policy, ServiceMetrics("chat", ttft=fresh(900), tbt=fresh(40)), 100.0 + 3600)
        == "unknown"
    )
    assert slo_status(policy, None, 0.0) == "unknown"
    # A broken reading is no evidence the SLO held (it would let soft scale-in drain):
    # a negative latency, or one beyond any real reading, as the policies refuse them.
    for broken in (-5.0, 5e295):
        metrics = ServiceMetrics("chat", ttft=fresh(broken), tbt=fresh(40))
        assert slo_status(policy, metrics, 100.0) == "unknown"
