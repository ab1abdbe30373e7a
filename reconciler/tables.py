"""The one way heteroscale prints a table (``simulate``, ``tune``, ``plan``,
``status``), so the tables look alike and each column is declared in one place:

- a column is a ``Column(header, cell, justify)``: ``cell`` turns a row into its
  plain text (the formatters below, so a figure reads the same in every table);
- ``render(title, columns, rows)`` builds the table: the title and every cell are
  escaped (names come from users' files), a failed row shows ``failed`` instead of
  figures, and a cell too wide for the terminal wraps instead of being cut;
- ``print_table(console, table)`` fits it to the terminal, or, off a terminal
  (logs, CI, pipes), prints it at its full width: one line per row;
- ``plain_lines(columns, rows)`` lays the same columns out as aligned plain text,
  for reports that are plain text throughout (``plan``, ``status``).

Below the commands (``reconciler.apply`` and ``reconciler.review`` use it too), and
rich is imported only when a rich table is built: this module stays cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeGuard, TypeVar

from reconciler.cost import money

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

Row = TypeVar("Row")
Justify = Literal["left", "right"]

MISSING = "-"  # a figure that is unknown, or means nothing for this row
FAILED = "[red]failed[/red]"  # markup: the one cell the renderer writes itself
HIGHLIGHT_STYLE = "bold green"
# Wide enough for any table: off a terminal, a table prints at its natural width.
UNBOUNDED_WIDTH = 10_000


@dataclass(frozen=True)
class Column(Generic[Row]):
    """One column: its header, its alignment (figures right, words left), and the
    text of a row's cell (plain text: ``render`` escapes it)."""

    header: str
    cell: Callable[[Row], str]
    justify: Justify = "right"


def render(
    title: str,
    columns: Sequence[Column[Row]],
    rows: Iterable[Row],
    *,
    failed: Callable[[Row], bool] | None = None,
    highlighted: Callable[[Row], bool] | None = None,
) -> Table:
    """A table of ``rows``, one cell per column. A ``failed`` row keeps its first
    cell (its name) and shows ``failed`` then ``-``: none of its figures means
    anything. A ``highlighted`` row (the best one) is bold green."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), title_justify="left")
    for column in columns:
        # "fold" wraps a cell that does not fit; the default ("ellipsis") would cut
        # the digits off a figure on a narrow terminal.
        table.add_column(escape(column.header), justify=column.justify, overflow="fold")
    for row in rows:
        name = escape(columns[0].cell(row))
        if failed is not None and failed(row):
            table.add_row(name, FAILED, *[MISSING] * (len(columns) - 2))
            continue
        table.add_row(
            name,
            *(escape(column.cell(row)) for column in columns[1:]),
            style=HIGHLIGHT_STYLE if highlighted is not None and highlighted(row) else None,
        )
    return table


def print_table(console: Console, table: Table) -> None:
    """On a terminal the table fits its width (cells wrap); elsewhere each row stays
    on one line, however wide, so logs can be read and searched row by row."""
    if console.is_terminal:
        console.print(table)
        return
    from rich.console import Console

    # Console.print cannot widen past the console's width: print through one wide
    # enough for any table (which takes no more than its natural width), same file.
    Console(file=console.file, width=UNBOUNDED_WIDTH, highlight=False, emoji=False).print(table)


COLUMN_GAP = "  "


def plain_lines(
    columns: Sequence[Column[Row]], rows: Iterable[Row], *, header: bool = True
) -> list[str]:
    """``rows`` as aligned plain text, one line per row (after a line of upper-case
    headers when ``header``): each column as wide as its widest cell, figures right,
    words left, no trailing spaces."""
    table = [[column.header.upper() for column in columns]] if header else []
    table += [[column.cell(row) for column in columns] for row in rows]
    widths = [max((len(line[i]) for line in table), default=0) for i in range(len(columns))]
    return [
        COLUMN_GAP.join(
            cell.ljust(width) if column.justify == "left" else cell.rjust(width)
            for cell, width, column in zip(line, widths, columns, strict=True)
        ).rstrip()
        for line in table
    ]


# -------------------------------------------------------- figures, read alike


def _known(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def decimal(value: float | None, digits: int = 1) -> str:
    """``1,234.5``: GPU-hours and rates with one decimal, multiples with two."""
    return f"{value:,.{digits}f}" if _known(value) else MISSING


def whole(value: float | None) -> str:
    """``12,345``: counts, milliseconds, tokens per second."""
    return f"{value:,.0f}" if _known(value) else MISSING


def percent(share: float | None, digits: int = 1) -> str:
    """A share (0.123) as ``12.3%``."""
    return f"{share * 100:.{digits}f}%" if _known(share) else MISSING


def small_percent(share: float | None) -> str:
    """A share that may be tiny, to two significant digits (0.0000085 as ``0.00085%``),
    but never as an exponent (all of them as ``100%``, not ``1e+02%``)."""
    if not _known(share):
        return MISSING
    value = share * 100
    return f"{value:.2g}%" if abs(value) < 10 else f"{value:.3g}%"


def signed_percent(change: float | None) -> str:
    """A relative change (-0.065) as ``-6.5%``."""
    return f"{change * 100:+.1f}%" if _known(change) else MISSING


def cost(amount: float | None, digits: int = 2) -> str:
    """Money, ``-`` when unknown (a GPU type without a price)."""
    return money(amount, digits) if _known(amount) else MISSING


def transition(before: object, after: object) -> str:
    """A value and what it becomes, in one cell: ``3->4``."""
    return f"{before}->{after}"


def pair(first: str, second: str) -> str:
    """Two figures of one kind in one cell, prefill's first: ``42.8% / 89.7%``."""
    return f"{first} / {second}"
