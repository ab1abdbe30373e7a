"""The review builds each synthetic load profile once: the simulated fleet one per
service of base (its warm-up day), the what-if one per replayed service, which both
revisions replay. A profile costs ~0.1 s at fleet scale (a 200,000-request sample),
so one built per revision would double the review's largest cost."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

import reconciler.review.whatif as whatif
import reconciler.sim.default as sim_default
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ServicePolicy
from reconciler.placement.greedy import GreedyPlacer
from reconciler.policy import make_autoscaler
from reconciler.review.config_diff import config_diff
from reconciler.review.fleet_diff import WARM_DAY_HOURS, review_fleet
from reconciler.review.review import ReviewOptions, changed_services, replay_services
from reconciler.sim.engine import LoadProfile
from reconciler.sim.evaluate import EvaluationResult
from tests.review.test_review import edit

REPLAY_HOURS = 0.25


@pytest.fixture(scope="module")
def revisions(
    tmp_path_factory: pytest.TempPathFactory, repo_root: Path
) -> tuple[DesiredState, DesiredState]:
    """base: the example desired state; head: chat's tolerance changed (the load does
    not read it) and svc-a's prefill bound lowered (it moves the load's peak sizing)."""
    states = []
    for name in ("base", "head"):
        root = tmp_path_factory.mktemp(name)
        for sub in ("policies", "clusters", "templates"):
            shutil.copytree(repo_root / sub, root / sub)
        if name == "head":
            edit(root / "policies/chat.yaml", "  tolerance: 0.1", "  tolerance: 0.2")
            edit(root / "policies/svc-a.yaml", "  max_instances: 128", "  max_instances: 96")
        states.append(load_desired_state(root))
    return states[0], states[1]


def test_each_load_is_built_once_and_both_revisions_replay_the_same_one(
    revisions: tuple[DesiredState, DesiredState], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, head = revisions
    built: list[tuple[str, str, float]] = []  # (revision, service, hours)
    build = sim_default.synthetic_load_for

    def counting(state: DesiredState, policy: ServicePolicy, **kwargs: Any) -> LoadProfile:
        built.append(("base" if state is base else "head", policy.name, kwargs["hours"]))
        return build(state, policy, **kwargs)

    replayed: dict[str, list[LoadProfile]] = defaultdict(list)
    evaluate = whatif.evaluate

    def recording(
        state: DesiredState, service: str, load: LoadProfile, *args: Any, **kwargs: Any
    ) -> EvaluationResult:
        replayed[service].append(load)
        return evaluate(state, service, load, *args, **kwargs)

    monkeypatch.setattr(sim_default, "synthetic_load_for", counting)
    monkeypatch.setattr(whatif, "evaluate", recording)

    review_fleet(
        base,
        head,
        autoscaler_factory=lambda: make_autoscaler("heteroscale"),
        placer=GreedyPlacer(),
    )
    assert built == [("base", name, WARM_DAY_HOURS) for name in sorted(base.policies)]

    built.clear()
    services = changed_services(tuple(config_diff(base, head)), base, head)
    assert services == ["chat", "svc-a"]
    replay_services(base, head, services, ReviewOptions(diurnal_hours=REPLAY_HOURS))
    # One load per service, sized from base (the traffic it serves today, which the
    # change under review does not move), and the very same profile replayed under base
    # and head, also where the revisions size it differently (svc-a).
    assert built == [("base", name, REPLAY_HOURS) for name in services]
    assert sorted(replayed) == services
    for loads in replayed.values():
        assert len(loads) == 2 and loads[0] is loads[1]
    sized_by_base = build(base, base.policies["svc-a"], hours=REPLAY_HOURS)
    sized_by_head = build(head, head.policies["svc-a"], hours=REPLAY_HOURS)
    assert replayed["svc-a"][0].requests == sized_by_base.requests > sized_by_head.requests
