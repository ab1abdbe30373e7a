"""The simulator follows the policy's GPU-type ranking: its pools are listed in that
order, so oracle-min and static peak size the type the planner sizes and placement
fills first (``reconciler.policy.gpu_economics``)."""

from __future__ import annotations

from reconciler.desired import DesiredState
from reconciler.sim.engine import LoadProfile, ServiceSim
from reconciler.sim.evaluate import role_capacity
from reconciler.sim.workload import synthetic_workload


def test_pools_and_static_sizing_follow_the_ranking(state: DesiredState) -> None:
    workload = synthetic_workload(
        "b", hours=5 / 60, peak_rps=5.0, seed=0, trough_ratio=1.0, bursts=()
    )
    profile = LoadProfile.from_workload(workload)
    chat = state.policies["chat"]
    by_cost = chat.model_copy(
        update={"decode": chat.decode.model_copy(update={"gpu_choice": "cost"})}
    )
    cluster = state.clusters[chat.cluster]
    for policy, first in ((chat, "h20"), (by_cost, "h800")):
        sim = ServiceSim(policy, cluster, profile)
        assert [pool.gpu_type for pool in sim.decode_pools] == [first, *({"h20", "h800"} - {first})]
        assert role_capacity(state, policy, profile).decode_gpu_type == first
