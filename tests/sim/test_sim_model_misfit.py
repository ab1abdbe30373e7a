"""A model its GPUs cannot hold (validate refuses it; a state built in code or an older
revision may still carry one): the simulated engines have no KV cache and serve
nothing, and reading their metrics must not divide by that empty cache."""

from __future__ import annotations

from dataclasses import replace

from reconciler.desired import DesiredState
from reconciler.sim.default import default_simulated_fleet


def chat_at(state: DesiredState, params_b: float) -> DesiredState:
    """Only chat, its model at ``params_b`` billion parameters (not validated)."""
    chat = state.policies["chat"]
    model = chat.model.model_copy(update={"params_b": params_b})
    return replace(state, policies={"chat": chat.model_copy(update={"model": model})})


def test_engines_without_kv_room_serve_nothing_and_report_no_kv_usage(
    state: DesiredState,
) -> None:
    too_big = chat_at(state, 200.0)
    fleet = default_simulated_fleet(too_big, 0, time_origin_s=0.0, hours=0.1, sample_until_s=200)
    fleet.advance_to(120)
    metrics = fleet.fetch(list(too_big.policies.values()), 120)["chat"]
    assert metrics.decode_kv_usage is None  # no cache to be used, not a division by 0
    assert metrics.decode_tps is not None and metrics.decode_tps.value == 0.0
    assert metrics.prefill_tps is not None and metrics.prefill_tps.value == 0.0
    assert "chat: the model does not fit a decode instance of 4 h20 GPUs (no capacity)" in (
        fleet.notes
    )
