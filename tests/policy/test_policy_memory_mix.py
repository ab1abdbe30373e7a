"""The planner remembers the request mix it read, not what a cycle computed from it
(``RequestMix.bare``): the same bounds and counts, and the same decisions when a later
cycle has to size from it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from policy_testkit import length_buckets

from reconciler.desired import load_desired_state
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.policy.base import PolicyHistory
from reconciler.policy.capacity import RequestMix
from reconciler.policy.planner import PlannerMemory, clear_caches, perf_context, plan_decide
from reconciler.state import RoleCount, Sample, ServiceFleet, ServiceMetrics

REPO = Path(__file__).resolve().parents[2]


def _chat() -> tuple[ServicePolicy, ClusterSpec]:
    state = load_desired_state(REPO)
    policy = state.policies["chat"]
    scaling = policy.scaling.model_copy(
        update={"target_per_instance": None, "prefill_target_per_instance": None}
    )
    return policy.model_copy(update={"scaling": scaling}), state.clusters[policy.cluster]


def _metrics(now_s: float, prompt_median: float) -> ServiceMetrics:
    rng = np.random.default_rng(3)
    prompts = rng.lognormal(math.log(prompt_median), 0.6, 4000)
    outputs = rng.lognormal(math.log(200), 0.5, 4000)
    return ServiceMetrics(
        "chat",
        prefill_tps=Sample(200_000.0, now_s),
        decode_tps=Sample(30_000.0, now_s),
        prompt_tokens=length_buckets(prompts, now_s),
        output_tokens=length_buckets(outputs, now_s),
    )


def _memos(mix: RequestMix) -> list[object]:
    """What ``cached_on`` keeps with the mix and its histograms."""
    return [o.__dict__["_memo"] for o in (mix, mix.prompt, mix.output) if "_memo" in o.__dict__]


def test_a_bare_mix_is_the_same_mix_without_what_was_cached_on_it() -> None:
    mix = RequestMix.from_samples([900.0, 1_200.0, 5_000.0], [150.0, 300.0, 420.0])
    assert mix.prompt_mean_tokens > 0 and mix.live_context_tokens > 0  # fills the memos
    bare = mix.bare()
    assert _memos(mix) and not _memos(bare)
    assert bare == mix
    assert bare.prompt.bounds is mix.prompt.bounds and bare.output.counts is mix.output.counts
    assert bare.prompt_mean_tokens == mix.prompt_mean_tokens
    assert bare.live_context_tokens == mix.live_context_tokens


def test_the_memory_keeps_the_mix_read_bare_and_a_cycle_without_one_sizes_alike() -> None:
    policy, cluster = _chat()
    perf = perf_context(policy, cluster)
    assert perf is not None
    fleet = ServiceFleet("chat", RoleCount(20), RoleCount(20))
    first = plan_decide(policy, fleet, _metrics(0.0, 1_000.0), PolicyHistory(), 0.0, perf)
    memory = first.history.planner
    assert isinstance(memory, PlannerMemory) and memory.mix is not None
    assert not _memos(memory.mix)
    # A later cycle whose histograms are missing sizes from the remembered mix: the same
    # decision as from an equal mix with what a cycle computed kept on it.
    missing = replace(_metrics(30.0, 1_000.0), prompt_tokens=None, output_tokens=None)
    read = _metrics(0.0, 1_000.0)
    assert read.prompt_tokens is not None and read.output_tokens is not None
    with_memos = RequestMix.from_cumulative_columns(
        read.prompt_tokens.le,
        read.prompt_tokens.cumulative,
        read.output_tokens.le,
        read.output_tokens.cumulative,
    )
    assert with_memos is not None and with_memos == memory.mix

    def decide(remembered: RequestMix) -> str:
        clear_caches()
        history = replace(first.history, planner=replace(memory, mix=remembered))
        return repr(plan_decide(policy, fleet, missing, history, 30.0, perf))

    decide(with_memos)  # fills its memos
    assert _memos(with_memos)
    from_bare = decide(memory.mix)
    assert "request mix missing" in from_bare
    assert from_bare == decide(with_memos)
