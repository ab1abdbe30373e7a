"""What several commands share, defined once so it reads alike everywhere: options,
the consoles, how invalid input is reported, and the repository-path check.

Light on purpose: the command line imports it before knowing which command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from typer.core import TyperCommand, TyperOption

if TYPE_CHECKING:
    from rich.console import Console

    from reconciler.errors import ConfigError


class _ConsoleOnFirstUse:
    """A rich Console built when first used: importing rich costs ~20 ms, which a
    command that never prints through it (a valid ``validate``) does not pay."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


# User text (values, file names, errors) goes through these: no :emoji: codes, and
# every print of it escapes markup or turns it off (a value may contain "[/red]").
console = cast("Console", _ConsoleOnFirstUse(highlight=False, emoji=False))
err_console = cast("Console", _ConsoleOnFirstUse(stderr=True, highlight=False, emoji=False))


def without_flag_types(params: list[Any]) -> list[Any]:
    """``params``, each flag given an empty metavar: a flag takes no value, yet
    typer's help would show ``<bool>`` where other options show their value's type.

    Parameters and contexts are Any: they are click's, which typer versions import
    from different places (some vendor click)."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class PlainFlagsCommand(TyperCommand):
    """Every command's class (``reconciler.cli`` gives it to each): help without
    ``<bool>`` after flags, ``--help`` included (click adds it in ``get_params``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return without_flag_types(super().get_params(ctx))


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


def checked_repository(path: Path, *, rev: str | None = None) -> Path:
    """``path`` if it can be the desired-state repository (read at Git revision
    ``rev`` when given, so only the directory must exist); otherwise
    ``error: PATH: why`` on stderr and a usage error (exit 2), worded alike by every
    command (``reconciler.desired.loader.repository_problem``)."""
    from reconciler.desired.loader import repository_problem

    problem = repository_problem(path, work_tree=rev is None)
    if problem is not None:
        err_console.print(f"error: {path}: {problem}", markup=False, soft_wrap=True)
        raise typer.Exit(2)
    return path


def report_config_error(exc: ConfigError) -> None:
    """One line per problem, on stderr, no traceback."""
    from rich.markup import escape

    for issue in exc.issues:
        err_console.print(f"[red]error[/red] {escape(str(issue))}", soft_wrap=True, markup=True)
    count = len(exc.issues)
    err_console.print(f"{count} problem{'s' if count != 1 else ''} found", soft_wrap=True)


__all__ = [
    "PLACERS",
    "PlacerOpt",
    "PlainFlagsCommand",
    "checked_placer",
    "checked_repository",
    "console",
    "err_console",
    "report_config_error",
    "without_flag_types",
]
