"""The table renderer and figure formatters, for the commands: they live in
``reconciler.tables``, below the commands, so reports there (plan's, the review's)
print figures the same way.
"""

from reconciler.tables import (
    FAILED,
    HIGHLIGHT_STYLE,
    MISSING,
    UNBOUNDED_WIDTH,
    Column,
    Justify,
    cost,
    decimal,
    pair,
    percent,
    plain_lines,
    print_table,
    render,
    signed_percent,
    transition,
    whole,
)

__all__ = [
    "FAILED",
    "HIGHLIGHT_STYLE",
    "MISSING",
    "UNBOUNDED_WIDTH",
    "Column",
    "Justify",
    "cost",
    "decimal",
    "pair",
    "percent",
    "plain_lines",
    "print_table",
    "render",
    "signed_percent",
    "transition",
    "whole",
]
