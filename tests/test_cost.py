"""``reconciler.cost``: GPU counts and GPU-hours to money, unknown (never 0) without a price."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.cost import (
    Cost,
    CostChange,
    GpuPrices,
    cost_of_gpu_hours,
    cost_per_hour,
    gpus_by_type,
    groups_cost_per_hour,
    money,
    per_million,
)
from reconciler.desired import load_desired_state
from reconciler.state import DeploymentGroup, GroupRole

PRICES = GpuPrices("USD", {"h800": 2.5, "h20": 1.0})
TYPES = ("h800", "h20")
hours = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=10_000)
sizes = st.integers(min_value=1, max_value=8)


@given(st.dictionaries(st.sampled_from(TYPES), hours))
def test_the_cost_of_gpu_hours_is_hours_times_price(by_type: dict[str, float]) -> None:
    cost = cost_of_gpu_hours(by_type, PRICES)
    expected = sum(h * PRICES.per_gpu_hour[t] for t, h in by_type.items())
    assert cost.amount == pytest.approx(expected)
    assert (cost.currency, cost.unpriced_types) == ("USD", ())


@given(
    st.dictionaries(st.sampled_from(TYPES), hours), st.dictionaries(st.sampled_from(TYPES), hours)
)
def test_cost_adds_up_over_any_split_of_the_hours(a: dict[str, float], b: dict[str, float]) -> None:
    both = {t: a.get(t, 0.0) + b.get(t, 0.0) for t in {*a, *b}}
    split = cost_of_gpu_hours(a, PRICES) + cost_of_gpu_hours(b, PRICES)
    assert split.amount == pytest.approx(cost_of_gpu_hours(both, PRICES).amount)


@given(hours.filter(lambda h: h > 0), st.dictionaries(st.sampled_from(TYPES), hours))
def test_hours_on_a_type_without_a_price_make_the_cost_unknown_never_zero(
    l20_hours: float, priced: dict[str, float]
) -> None:
    cost = cost_of_gpu_hours({**priced, "l20": l20_hours}, PRICES)
    assert cost.amount is None
    assert cost.unpriced_types == ("l20",)
    assert cost.why_unknown() == "no price for l20"
    # Unknown stays unknown in any sum, and still names the type.
    total = cost + cost_of_gpu_hours({"h800": 1.0}, PRICES)
    assert (total.amount, total.unpriced_types) == (None, ("l20",))


def test_a_type_without_a_price_and_without_hours_needs_no_price() -> None:
    assert cost_of_gpu_hours({"l20": 0.0, "h20": 2.0}, PRICES) == Cost(2.0, "USD")
    assert cost_of_gpu_hours({}, PRICES) == Cost(0.0, "USD")


@pytest.mark.parametrize("bad", [-1.0, float("inf"), float("nan")])
def test_negative_or_non_finite_hours_are_a_bug_not_a_cost(bad: float) -> None:
    with pytest.raises(ValueError, match="h20"):
        cost_of_gpu_hours({"h20": bad}, PRICES)


@given(
    st.dictionaries(
        st.tuples(st.sampled_from(TYPES), st.sampled_from(("prefill", "decode"))), counts
    ),
    sizes,
    sizes,
)
def test_cost_per_hour_is_instances_times_gpus_times_price(
    instances: dict[tuple[str, str], int], prefill_gpus: int, decode_gpus: int
) -> None:
    gpus_per_instance = {"prefill": prefill_gpus, "decode": decode_gpus}
    cost = cost_per_hour(instances, gpus_per_instance, PRICES)  # type: ignore[arg-type]
    expected = sum(
        n * gpus_per_instance[role] * PRICES.per_gpu_hour[t] for (t, role), n in instances.items()
    )
    assert cost.amount == pytest.approx(expected)
    # An hour of those GPUs costs the same as that many GPU-hours.
    by_type = gpus_by_type(instances, gpus_per_instance)  # type: ignore[arg-type]
    assert cost == cost_of_gpu_hours({t: float(n) for t, n in by_type.items()}, PRICES)


def _group(service: str, prefill: GroupRole, decode: GroupRole, gid: str = "g1") -> DeploymentGroup:
    return DeploymentGroup(service, "c", gid, "pod-a", None, prefill, decode)


def test_groups_are_priced_at_the_policys_size_else_the_observed_one() -> None:
    groups = [
        _group("svc", GroupRole("h800", 2, gpus_per_instance=8), GroupRole("h20", 3)),
        _group("svc", GroupRole("h800", 1), GroupRole("h20", 0), gid="g2"),
        _group("orphan", GroupRole("h20", 0), GroupRole("h20", 5, gpus_per_instance=2)),
    ]
    sizes = {("svc", "prefill"): 4, ("svc", "decode"): 2}
    cost = groups_cost_per_hour(groups, sizes, PRICES)  # type: ignore[arg-type]
    # svc: (2 + 1) prefill x 4 GPUs x 2.50 + 3 decode x 2 x 1.00; orphan: 5 x 2 x 1.00.
    assert cost == Cost(3 * 4 * 2.5 + 3 * 2 * 1.0 + 5 * 2 * 1.0, "USD")


def test_groups_of_unknown_size_make_the_cost_unknown() -> None:
    groups = [_group("orphan", GroupRole("h20", 0), GroupRole("h20", 5))]
    cost = groups_cost_per_hour(groups, {}, PRICES)
    assert cost.amount is None
    assert cost.why_unknown() == "GPUs per instance unknown for orphan/decode"


def test_costs_in_two_currencies_do_not_add() -> None:
    with pytest.raises(ValueError, match="USD and EUR"):
        Cost(1.0, "USD") + Cost(1.0, "EUR")


def test_a_change_is_planned_minus_current_when_both_are_known() -> None:
    assert CostChange(Cost(10.0, "USD"), Cost(12.5, "USD")).delta == 2.5
    assert CostChange(Cost(10.0, "USD"), Cost(None, "USD", ("l20",))).delta is None


@given(st.floats(min_value=0, max_value=1e9), st.floats(min_value=1, max_value=1e15))
def test_per_million_tokens(amount: float, tokens: float) -> None:
    assert per_million(amount, tokens) == pytest.approx(amount * 1e6 / tokens)


@pytest.mark.parametrize(("amount", "tokens"), [(None, 1e6), (5.0, 0.0), (5.0, float("nan"))])
def test_per_million_tokens_is_unknown_without_an_amount_or_tokens(
    amount: float | None, tokens: float
) -> None:
    assert per_million(amount, tokens) is None


def test_money_reads_unknown_rather_than_zero() -> None:
    assert money(1234.5) == "1,234.50"
    assert money(-2.0, signed=True) == "-2.00"
    assert money(None) == "unknown"


def test_the_example_cluster_prices_every_type_with_realistic_ratios(repo_root: Path) -> None:
    prices = GpuPrices.of_cluster(load_desired_state(repo_root).clusters["prod-east"])
    assert prices.currency == "USD"
    per_hour = prices.per_gpu_hour
    assert set(per_hour) == {"h800", "h20", "l20"}
    assert 2.0 <= per_hour["h800"] / per_hour["h20"] <= 3.0
    assert per_hour["l20"] < per_hour["h20"]
