"""``run --listen``: HOST:PORT checked before anything runs (a usage error naming the
option), and an address that cannot be served on said plainly (exit 1), never a
traceback after the first cycle."""

from __future__ import annotations

import socket

import pytest
import typer
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.commands.reconcile import listen_address

runner = CliRunner()
RUN = ["run", "--simulate", "--cycles", "1", "--interval", "0.1"]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9102", ("127.0.0.1", 9102)),
        (":9102", ("0.0.0.0", 9102)),
        ("9102", ("0.0.0.0", 9102)),
        ("127.0.0.1:0", None),
        (":0", None),
    ],
)
def test_a_listen_address_is_host_and_port_or_none_for_port_0(
    text: str, address: tuple[str, int] | None
) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize("text", ["garbage", "0.0.0.0:99999", "host:", "host:-1", "host:8o"])
def test_a_listen_address_without_a_port_in_range_is_a_usage_error(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="port from 0 to 65535"):
        listen_address(text)
    result = runner.invoke(app, [*RUN, "--listen", text], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "--listen" in result.output and "Traceback" not in result.output


def test_an_address_in_use_stops_run_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, [*RUN, "--listen", f"127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    assert f"cannot serve on --listen 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
