"""One table renderer for the commands' result tables (``simulate``, ``tune``): a
column is declared once, figures read alike in every table, user text prints
literally, failed rows show no figures, and a table fits the terminal without
cutting a figure, or, off a terminal, keeps each row on one line."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.table import Table

from reconciler.commands._table import (
    Column,
    cost,
    decimal,
    percent,
    print_table,
    render,
    signed_percent,
    whole,
)
from reconciler.tables import small_percent


@dataclass(frozen=True)
class Item:
    name: str
    hours: float | None
    share: float | None


COLUMNS: list[Column[Item]] = [
    Column("name", lambda item: item.name, "left"),
    Column("hours", lambda item: decimal(item.hours)),
    Column("share", lambda item: percent(item.share)),
]


def printed(table: Table, *, width: int = 200, terminal: bool = False) -> str:
    """What ``print_table`` writes to a console ``width`` columns wide, with the
    styles as ANSI codes when ``terminal``."""
    out = io.StringIO()
    console = Console(
        file=out,
        width=width,
        force_terminal=terminal,
        color_system="standard" if terminal else None,
        highlight=False,
    )
    print_table(console, table)
    return out.getvalue()


def cells(output: str, first_cell: str) -> list[str]:
    """The cells of the row whose first cell is ``first_cell``."""
    row = next(line for line in output.splitlines() if line.startswith(f"│ {first_cell} "))
    return [cell.strip() for cell in row.split("│")[1:-1]]


def test_each_column_gives_its_header_and_formats_its_cell_once() -> None:
    output = printed(render("title", COLUMNS, [Item("a", 1234.56, 0.1234)]))
    header = next(line for line in output.splitlines() if "name" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["name", "hours", "share"]
    assert cells(output, "a") == ["a", "1,234.6", "12.3%"]


def test_figures_align_right_and_words_left() -> None:
    output = printed(render("t", COLUMNS, [Item("a", 1.0, 0.5), Item("longer", 1000.0, 0.5)]))
    row = next(line for line in output.splitlines() if line.startswith("│ a "))
    name, hours = row.split("│")[1:3]
    assert name.startswith(" a ") and name.rstrip() == " a"
    assert hours.endswith(" 1.0 ") and hours.lstrip() == "1.0 "


@pytest.mark.parametrize(
    ("figure", "text"),
    [
        (decimal(1234.56), "1,234.6"),  # GPU-hours, rates
        (decimal(1.979, 2), "1.98"),  # multiples
        (whole(12812.6), "12,813"),  # counts, milliseconds, tokens/s
        (percent(0.1234), "12.3%"),  # shares
        (percent(0.1234, 2), "12.34%"),
        (signed_percent(-0.0654), "-6.5%"),  # changes
        (signed_percent(0.167), "+16.7%"),
        (cost(1234.5), "1,234.50"),
        (cost(7.51234, 3), "7.512"),
        (small_percent(0.0000085), "0.00085%"),  # tiny shares: significant digits
        (small_percent(0.0032), "0.32%"),
        (small_percent(0.123456), "12.3%"),
        (small_percent(1.0), "100%"),  # never "1e+02%"
    ],
)
def test_figures_read_alike_in_every_table(figure: str, text: str) -> None:
    assert figure == text


@pytest.mark.parametrize("unknown", [None, math.nan, math.inf])
def test_an_unknown_figure_reads_as_a_dash(unknown: float | None) -> None:
    assert {
        decimal(unknown),
        whole(unknown),
        percent(unknown),
        signed_percent(unknown),
        small_percent(unknown),
    } == {"-"}
    assert cost(None) == "-"


def test_names_and_titles_print_literally_even_when_they_look_like_markup() -> None:
    """Service and policy names come from users' files and plugins."""
    table = render("svc[b]: [red]day[/red]", COLUMNS, [Item("[red]x[/red]", 1.0, 0.5)])
    output = printed(table, terminal=True)
    assert "svc[b]: [red]day[/red]" in output
    assert "[red]x[/red]" in output
    assert "\x1b[31m" not in output  # nothing turned red


def test_a_failed_row_keeps_its_name_and_shows_failed_instead_of_figures() -> None:
    rows = [Item("ok", 1.0, 0.5), Item("broken", 2.0, 0.5)]
    table = render("t", COLUMNS, rows, failed=lambda item: item.name == "broken")
    output = printed(table)
    assert cells(output, "broken") == ["broken", "failed", "-"]
    assert cells(output, "ok") == ["ok", "1.0", "50.0%"]
    assert "\x1b[31mfailed" in printed(table, terminal=True)  # in red


def test_the_highlighted_row_is_bold_green_and_no_other() -> None:
    rows = [Item("plain", 1.0, 0.5), Item("best", 2.0, 0.5)]
    table = render("t", COLUMNS, rows, highlighted=lambda item: item.name == "best")
    lines = printed(table, terminal=True).splitlines()
    bold_green = "\x1b[1;32m"
    assert bold_green in next(line for line in lines if "best" in line)
    assert bold_green not in next(line for line in lines if "plain" in line)


ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")
WIDE = [Column(f"column {i}", lambda item, i=i: f"{item.hours}-{i}") for i in range(12)]


def test_off_a_terminal_every_row_stays_on_one_line_however_wide() -> None:
    """Logs and CI are read and searched row by row."""
    rows = [Item(name, 1234567.0 + n, None) for n, name in enumerate("abc")]
    output = printed(render("t", [COLUMNS[0], *WIDE], rows), width=60)
    body = [line for line in output.splitlines() if line.startswith("│")]
    assert len(body) == 3
    assert all(body[n].count("1234567.0") + body[n].count("1234568.0") for n in range(2))
    assert "…" not in output


def test_on_a_narrow_terminal_the_table_fits_and_no_figure_is_cut() -> None:
    """Cells wrap: a figure cut to "122,3…" would read as another number."""
    rows = [Item("a-long-policy-name", 123456789.0, 0.5)]
    table = render("t", [*COLUMNS, *WIDE[:6]], rows)
    output = re.sub(ANSI_STYLE, "", printed(table, width=60, terminal=True))
    assert max(len(line) for line in output.splitlines()) <= 60
    assert "…" not in output
    digits = sum(char.isdigit() for char in output)
    wide_output = printed(table, width=400)
    assert digits == sum(char.isdigit() for char in wide_output)  # every digit is shown


# ------------------------------------------------------------ the commands' tables


def policy_result(**figures: object):  # type: ignore[no-untyped-def]
    from reconciler.sim.evaluate import PolicyResult

    defaults: dict[str, object] = {
        "name": "p",
        "description": "",
        "gpu_hours": 233.84,
        "gpu_hours_prefill": 100.0,
        "gpu_hours_decode": 133.84,
        "mean_gpu_util_prefill": 0.428,
        "mean_gpu_util_decode": 0.897,
        "mean_sm_active_prefill": 0.427,
        "mean_sm_active_decode": 0.618,
        "ttft_attainment": 0.741,
        "tbt_attainment": 0.697,
        "slo_attainment": 0.599,
        "ttft_quantile_ms": 12812.6,
        "tbt_quantile_ms": 139.0,
        "requests": 1000.0,
        "dropped": 0.0,
        "scaling_actions": 20,
        "instance_changes": 20,
        "pd_ratio_min": 0.47,
        "pd_ratio_max": 0.88,
        "peak_prefill_instances": 4,
        "peak_decode_instances": 8,
        "placement_shortfalls": 0,
        "timeline": {},
        "tbt_token_quantile_ms": 139.2,
        "oracle_min_multiple": 1.979,
        "cost_usd": 362.144,
        "usd_per_mtok": 7.5123,
    }
    return PolicyResult(**{**defaults, **figures})  # type: ignore[arg-type]


def evaluation(policies: dict[str, object]):  # type: ignore[no-untyped-def]
    from reconciler.sim.evaluate import EvaluationResult

    return EvaluationResult(
        service="chat",
        workload="synthetic-chat",
        horizon_s=1800,
        requests=390791.0,
        slo={"ttft_ms": 1500, "tbt_ms": 50, "quantile": 0.9},
        policies=policies,  # type: ignore[arg-type]
    )


def test_simulate_shows_every_figure_of_a_policy_in_its_format() -> None:
    from reconciler.commands.simulate import render_table

    static = policy_result(gpu_hours=250.0, cost_usd=None, usd_per_mtok=None)
    output = printed(
        render_table(evaluation({"heteroscale": policy_result(), "static-peak": static}))
    )
    assert "chat: synthetic-chat, 0.5 h, 390,791 requests; SLO TTFT 1500 ms, TBT 50 ms at p90" in (
        output
    )
    assert cells(output, "heteroscale") == [
        "heteroscale",
        "233.8",  # GPU-hours
        "362.14",  # cost USD
        "7.512",  # USD/Mtok
        "1.98",  # x oracle-min
        "-6.5%",  # vs static
        "42.8% / 89.7%",  # util P / D
        "42.7% / 61.8%",  # SM P / D
        "74.1%",  # TTFT ok
        "69.7%",  # TBT ok
        "59.9%",  # both ok
        "0.0%",  # unattainable
        "12,813",  # TTFT p90 ms
        "139",  # TBT p90 ms
        "20",  # actions
        "0.47-0.88",  # P/D
        "0",  # dropped
    ]
    static_cells = cells(output, "static-peak")
    assert static_cells[2:4] == ["-", "-"]  # no price: cost unknown
    assert static_cells[5] == "-"  # static-peak is its own baseline


def test_simulate_compares_with_static_peak_only_when_it_ran() -> None:
    from reconciler.commands.simulate import render_table

    failed_static = replace(policy_result(), failed="no capacity")
    result = evaluation({"heteroscale": policy_result(), "static-peak": failed_static})
    output = printed(render_table(result))
    assert cells(output, "heteroscale")[5] == "-"
    assert cells(output, "static-peak")[:3] == ["static-peak", "failed", "-"]


def test_tunes_replay_reads_like_simulates_table() -> None:
    """The replay of the current against the recommended values: simulate's columns,
    one row per set of values."""
    from reconciler.commands.simulate import render_table
    from reconciler.commands.tune import render_verification
    from reconciler.review.tune import Verification

    verification = Verification(
        load="synthetic-chat, 0.5 h",
        horizon_s=1800,
        requests=390791.0,
        current=policy_result(),
        recommended=policy_result(gpu_hours=215.8),
        attainment_goal=0.995,
    )
    slo = SimpleNamespace(ttft_ms=1500, tbt_ms=50, quantile=0.9)
    replay = render_verification(
        verification,
        SimpleNamespace(service="chat"),  # type: ignore[arg-type]
        SimpleNamespace(slo=slo),  # type: ignore[arg-type]
        "heteroscale",
    )
    simulated = render_table(evaluation({"p": policy_result()}))
    assert [c.header for c in replay.columns] == [c.header for c in simulated.columns]
    output = printed(replay)
    assert "chat: heteroscale on synthetic-chat, 0.5 h, 0.5 h, 390,791 requests" in output
    assert cells(output, "current")[1:] == cells(printed(simulated), "p")[1:]
    assert cells(output, "recommended")[1] == "215.8"


def test_tunes_sweep_marks_the_best_split_and_reads_its_figures_alike() -> None:
    from reconciler.commands.tune import render_sweep
    from reconciler.review.tune import Probe, SplitResult, Sweep

    def split(prefill: int, decode: int, output_tps: float) -> SplitResult:
        best = Probe(
            rate_rps=output_tps / 200,
            ttft_attainment=1.0,
            tbt_attainment=1.0,
            output_tps=output_tps,
            prompt_tps=4 * output_tps,
            placement_shortfalls=0,
        )
        failing = replace(best, ttft_attainment=0.9)
        return SplitResult(prefill, decode, 4 * (prefill + decode), best, failing, 6, True)

    sweep = Sweep(
        service="chat[x]",
        workload="synthetic-chat",
        budget_gpus=1024,
        duration_s=180,
        attainment_goal=0.995,
        splits=(split(2, 6, 4282.4), split(3, 5, 6816.0), split(4, 4, 6528.0)),
    )
    output = printed(render_sweep(sweep))
    assert (
        "chat[x]: throughput under SLO per prefill/decode split of 1,024 GPUs (180 s flat "
        "load, lengths from synthetic-chat, TTFT and TBT attainment >= 99.5%)"
    ) in " ".join(line.strip() for line in output.splitlines())
    best = cells(output, "3:5")
    assert best[:9] == ["3:5", "3", "5", "32", "34.1", "TTFT", "6,816", "7", "1,363"]
    assert best[10] == "◀ best"
    assert cells(output, "1:3")[10] == ""
