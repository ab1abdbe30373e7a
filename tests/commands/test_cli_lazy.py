"""The command line imports what the command it runs needs, and no more: starting it
and validating must not pay for the simulator, numpy or the Kubernetes client."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from reconciler import cli

# Packages only some commands need (the simulator, placement, policies, the loop and
# the Kubernetes and Prometheus clients), by the name a module of them starts with.
HEAVY = (
    "numpy",
    "networkx",
    "ortools",
    "matplotlib",
    "kubernetes",
    "prometheus_client",
    "prometheus_api_client",
    "reconciler.sim",
    "reconciler.placement",
    "reconciler.policy",
    "reconciler.topology",
    "reconciler.loop",
    "reconciler.apply",
    "reconciler.review",
)
HEAVY_PREFIXES = tuple(f"{name}." for name in HEAVY)


def heavy_modules_after(code: str) -> list[str]:
    """The HEAVY modules (and their submodules) a fresh interpreter holds after
    running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(proc.stdout.splitlines()[-1])
    return [m for m in loaded if m in HEAVY or m.startswith(HEAVY_PREFIXES)]


def test_importing_the_command_line_imports_no_command_module_nor_heavy_package() -> None:
    probe = (
        "import reconciler.cli, sys\n"
        "assert not [m for m in sys.modules if m.startswith('reconciler.commands.')"
        " and m != 'reconciler.commands._options'], 'a command module was imported'"
    )
    assert heavy_modules_after(probe) == []


def test_validate_imports_nothing_heavy(repo_root: Path) -> None:
    code = (
        "import sys\n"
        "from reconciler.cli import main\n"
        f"sys.argv = ['heteroscale', 'validate', {str(repo_root)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
    )
    assert heavy_modules_after(code) == []


def test_the_table_helper_imports_nothing_heavy() -> None:
    """Any command may print a table: the helper must not pull in the simulator."""
    assert heavy_modules_after("import reconciler.tables, reconciler.commands._table") == []


def registered_by(module: str) -> list[str]:
    scratch = typer.Typer()
    __import__(f"reconciler.commands.{module}", fromlist=["register"]).register(scratch)
    return list(typer.main.get_group(scratch).commands)


def test_the_command_table_names_the_module_of_every_command() -> None:
    """A command missing from COMMAND_MODULES still runs, after importing every
    module; the table keeps each command to its own."""
    found = {name: module for module in cli._command_modules() for name in registered_by(module)}
    assert found == cli.COMMAND_MODULES


def test_help_lists_every_command_in_one_order() -> None:
    """This file's commands first, then by module name, whatever ran before."""
    runner = CliRunner()
    assert runner.invoke(cli.app, ["status", "--help"]).exit_code == 0  # loads one module
    result = runner.invoke(cli.app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # A row is indented by two spaces; wrapped help continues further in.
    section = result.output.split("Commands:\n", 1)[1]
    listed = [
        line.split()[0] for line in section.splitlines() if line[:2] == "  " and line[2] != " "
    ]
    expected = ["validate", "schema"] + [
        name for module in cli._command_modules() for name in registered_by(module)
    ]
    assert [name for name in listed if name in expected] == expected


def modules_importing_the_cli() -> set[str]:
    root = Path(cli.__file__).resolve().parent
    found = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if "reconciler.cli" in names:
                found.add(path.relative_to(root.parent).as_posix())
    return found


def test_nothing_in_the_package_imports_the_command_line() -> None:
    """What commands share is in reconciler.commands._options; a module importing
    reconciler.cli would load it twice under `python -m reconciler.cli`."""
    assert modules_importing_the_cli() == set()
