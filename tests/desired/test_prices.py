"""GPU prices in a cluster file: ``gpu_types.<type>.cost_per_hour`` and ``currency``,
optional, and located like every other field when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo_edits import edit, line_of, problems

from reconciler.desired import load_desired_state

CLUSTER = "clusters/prod-east.yaml"


def test_the_example_prices_and_currency_load(repo_root: Path) -> None:
    cluster = load_desired_state(repo_root).clusters["prod-east"]
    assert cluster.currency == "USD"
    assert {name: t.cost_per_hour for name, t in cluster.gpu_types.items()} == {
        "h800": 2.5,
        "h20": 1.0,
        "l20": 0.7,
    }


def test_prices_and_currency_are_optional(example_repo: Path) -> None:
    cluster = example_repo / CLUSTER
    edit(cluster, "    cost_per_hour: 0.70\n", "")
    edit(cluster, "currency: USD\n", "")
    spec = load_desired_state(example_repo).clusters["prod-east"]
    assert spec.gpu_types["l20"].cost_per_hour is None
    assert spec.gpu_types["h20"].cost_per_hour == 1.0
    assert spec.currency == "USD"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-2.5", "must be greater than 0 (got -2.5)"),
        ("0", "must be greater than 0 (got 0)"),
        (".inf", "must be a finite number (got inf)"),
        ("1e7", "must be less than or equal to 1000000 (got 10000000.0)"),
        ("cheap", "must be a number, not a string (a number is written unquoted) (got 'cheap')"),
    ],
)
def test_a_bad_price_names_file_line_column_and_field(
    example_repo: Path, value: str, message: str
) -> None:
    cluster = example_repo / CLUSTER
    edit(cluster, "    cost_per_hour: 2.50", f"    cost_per_hour: {value}")
    line = line_of(cluster, f"cost_per_hour: {value}")
    assert problems(example_repo) == [
        f"{CLUSTER}:{line}:5: gpu_types.h800.cost_per_hour: {message}"
    ]


@pytest.mark.parametrize("value", ["usd", "DOLLAR", "US", "''"])
def test_a_currency_is_a_three_letter_code(example_repo: Path, value: str) -> None:
    cluster = example_repo / CLUSTER
    edit(cluster, "currency: USD", f"currency: {value}")
    line = line_of(cluster, f"currency: {value}")
    [message] = problems(example_repo)
    assert message.startswith(f"{CLUSTER}:{line}:1: currency: must match pattern '^[A-Z]{{3}}$'")


def test_a_misspelt_price_key_suggests_the_field(example_repo: Path) -> None:
    cluster = example_repo / CLUSTER
    edit(cluster, "    cost_per_hour: 1.00", "    cost_per_hr: 1.00")
    line = line_of(cluster, "cost_per_hr: 1.00")
    assert problems(example_repo) == [
        f"{CLUSTER}:{line}:5: gpu_types.h20.cost_per_hr: unknown key 'cost_per_hr'; "
        "did you mean 'cost_per_hour'?"
    ]
