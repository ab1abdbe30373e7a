"""Options several commands share, defined once so they are spelled alike everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

PLACERS = ("cp-sat", "greedy")

PlacerOpt = Annotated[
    str,
    typer.Option(
        "--placer",
        help="cp-sat (the topology-aware placement model) or greedy (the paper's scheduler)",
    ),
]


def checked_placer(placer: str) -> str:
    """``placer`` if it is one of ``PLACERS``; a usage error (exit 2) naming them
    otherwise."""
    if placer not in PLACERS:
        raise typer.BadParameter(
            f"must be {' or '.join(PLACERS)}, got '{placer}'", param_hint="--placer"
        )
    return placer


__all__ = ["PLACERS", "PlacerOpt", "checked_placer"]
