"""Whatever answers at the API server's address (a proxy, a broken aggregated API, a
hostile middlebox) is read as bounded, checked input: a bad answer makes the cluster
unavailable (typed, the cycle holds and says why), never a traceback, never an
unbounded read."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fakeapiserver import FakeApiServer, Reply, Script, in_turn

pytestmark = pytest.mark.fault

StartServer = Callable[[Script], FakeApiServer]


@pytest.fixture
def fake_apiserver() -> Iterator[StartServer]:
    servers: list[FakeApiServer] = []

    def start(script: Script) -> FakeApiServer:
        servers.append(FakeApiServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# ------------------------------------------------------------------------ Retry-After


def test_a_retry_after_that_is_not_ascii_digits_is_ignored(fake_apiserver: StartServer) -> None:
    # "²" is a digit to str.isdigit, not to float(): it crashed the request.
    busy = Reply(status=503, body=b"{}", headers={"Retry-After": "\xb2"})
    server = fake_apiserver(in_turn(busy, Reply(body=b'{"kind": "Pod"}')))
    assert server.client().get("/api/v1/pods/x") == {"kind": "Pod"}
    assert len(server.requests) == 2
