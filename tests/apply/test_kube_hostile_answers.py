"""Whatever answers at the API server's address (a proxy, a broken aggregated API, a
hostile middlebox) is read as bounded, checked input: a bad answer makes the cluster
unavailable (typed, the cycle holds and says why), never a traceback, never an
unbounded read."""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result
from fakeapiserver import FakeApiServer, Reply, Script, always, endless, in_turn
from kubetestkit import make_desired_state
from typer.testing import CliRunner

from reconciler.apply import kubeclient
from reconciler.apply.kubeclient import (
    MAX_ANSWER_BYTES,
    MAX_LIST_ITEMS,
    MAX_LIST_PAGES,
    ApiRejected,
    FieldOwnershipConflict,
    KubeClient,
    ResourceConflict,
)
from reconciler.cli import app
from reconciler.errors import ClusterUnavailable
from reconciler.text_safety import UNSAFE_RUN

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


def test_a_redirect_is_not_followed_and_says_where_it_pointed(fake_apiserver: StartServer) -> None:
    # Before: an ApiRejected ("HTTP 302 : "), as if the API server had refused the request.
    where = "https://elsewhere.example/login\x1b[2J"
    server = fake_apiserver(always(Reply(status=302, body=b"", headers={"Location": where})))
    with pytest.raises(ClusterUnavailable) as caught:
        server.client().get("/api/v1/pods")
    message = str(caught.value)
    assert "HTTP 302, a redirect to 'https://elsewhere.example/login\\x1b[2J', not followed" in (
        message
    )
    assert len(server.requests) == 1  # neither followed nor asked again


# ---------------------------------------------------------------------- error bodies

FORGED = "\x1b[2J\x1b[31mAPPROVED\nfake line \u202e" + "A" * 100_000


def _status(code: int, **fields: object) -> Reply:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, **fields}
    return Reply(status=code, body=json.dumps(body).encode())


def _shown_safely(text: str) -> None:
    assert not UNSAFE_RUN.search(text), text[:200]
    assert len(text) < 1000


def test_a_status_message_is_quoted_escaped_and_cut(fake_apiserver: StartServer) -> None:
    server = fake_apiserver(always(_status(422, reason="Invalid" + FORGED, message=FORGED)))
    with pytest.raises(ApiRejected) as raised:
        server.client().get("/api/v1/pods/x")
    _shown_safely(str(raised.value))
    _shown_safely(raised.value.api_message)
    assert "\\x1b[2J\\x1b[31mAPPROVED\\nfake line \\u202e" in str(raised.value)


def test_a_server_error_s_body_is_quoted_escaped_and_cut(fake_apiserver: StartServer) -> None:
    page = Reply(status=502, body=("<html>" + FORGED + "</html>").encode())
    server = fake_apiserver(always(page))
    with pytest.raises(ClusterUnavailable) as raised:
        server.client().get("/api/v1/pods/x")
    _shown_safely(str(raised.value))
    assert "HTTP 502: <html>\\x1b[2J" in str(raised.value)  # text, not a bytes repr


@pytest.mark.parametrize(
    "details", ["oops", ["a"], {"causes": "oops"}, {"causes": ["a", None, {"reason": 3}]}]
)
def test_a_conflict_with_details_of_any_shape_is_a_conflict(
    fake_apiserver: StartServer, details: object
) -> None:
    server = fake_apiserver(always(_status(409, reason="Conflict", details=details)))
    with pytest.raises(ResourceConflict):
        server.client().get("/api/v1/pods/x")


def test_an_ownership_conflict_quotes_its_fields_escaped_and_cut(
    fake_apiserver: StartServer,
) -> None:
    cause = {"reason": "FieldManagerConflict", "field": FORGED, "message": FORGED}
    server = fake_apiserver(
        always(_status(409, reason="Conflict", message="x", details={"causes": [cause, "junk"]}))
    )
    with pytest.raises(FieldOwnershipConflict) as raised:
        server.client().get("/api/v1/pods/x")
    (conflict,) = raised.value.conflicts
    _shown_safely(conflict)


def test_plan_quotes_an_api_error_escaped_in_its_log_and_report(
    fake_apiserver: StartServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = fake_apiserver(always(_status(400, reason="BadRequest", message=FORGED)))
    result = _plan(server, tmp_path)
    assert result.exit_code == 1
    assert "ApiRejected: HTTP 400 BadRequest: \\x1b[2J" in result.output
    for line in result.output.splitlines():
        _shown_safely(line)
    logged = [record.getMessage() for record in caplog.records]
    assert any("ApiRejected: HTTP 400 BadRequest: \\x1b[2J" in line for line in logged)
    for line in logged:
        _shown_safely(line)


def _plan(server: FakeApiServer, root: Path) -> Result:
    """``heteroscale plan`` of a one-cluster desired state against ``server``."""
    make_desired_state(root / "repo", "c1")
    kubeconfig = server.kubeconfig(root / "kubeconfig")
    return CliRunner().invoke(
        app,
        [
            "plan",
            "--repo",
            str(root / "repo"),
            "--kubeconfig",
            str(kubeconfig),
            "--placer",
            "greedy",
        ],
    )


# ------------------------------------------------------------------ bounded answers


def _gzip_bomb(inflated_bytes: int) -> bytes:
    """A JSON object padded with spaces to ``inflated_bytes``, gzipped (~1000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [packer.compress(b'{"kind": "PodList", "items": []')]
    spaces = b" " * (1 << 20)
    for _ in range(inflated_bytes // len(spaces)):
        out.append(packer.compress(spaces))
    out.append(packer.compress(b"}") + packer.flush())
    return b"".join(out)


def test_an_answer_that_inflates_past_the_bound_is_refused_without_retrying(
    fake_apiserver: StartServer,
) -> None:
    bomb = _gzip_bomb(MAX_ANSWER_BYTES + (8 << 20))
    assert len(bomb) < 1 << 20
    server = fake_apiserver(always(Reply(body=bomb, headers={"Content-Encoding": "gzip"})))
    with pytest.raises(ClusterUnavailable) as raised:
        server.client().get("/api/v1/pods")
    assert "larger than the 128 MiB limit (max_answer_bytes)" in str(raised.value)
    assert len(server.requests) == 1  # asking again would read as much again


def test_an_endless_answer_is_read_no_further_than_the_bound(fake_apiserver: StartServer) -> None:
    server = fake_apiserver(always(Reply(chunks=endless(b" " * 65536))))
    with pytest.raises(ClusterUnavailable, match="max_answer_bytes"):
        server.client(max_answer_bytes=1 << 20).get("/api/v1/pods")


def _declaring(length: str) -> Reply:
    return Reply(body=b'{"kind": "Pod"}', headers={"Content-Length": length, "Connection": "close"})


def test_a_content_length_that_is_not_ascii_digits_is_not_trusted(
    fake_apiserver: StartServer,
) -> None:
    # "²" passes str.isdigit and crashes int(): the body is read as if undeclared.
    server = fake_apiserver(always(_declaring("\xb2")))
    assert server.client().get("/api/v1/pods/x") == {"kind": "Pod"}


def test_a_content_length_of_thousands_of_digits_is_refused_as_too_large(
    fake_apiserver: StartServer,
) -> None:
    # int() refuses more than 4,300 digits; such a length is past any bound anyway.
    server = fake_apiserver(always(_declaring("9" * 5000)))
    with pytest.raises(ClusterUnavailable) as raised:
        server.client().get("/api/v1/pods/x")
    assert "declares 99999" in str(raised.value) and len(str(raised.value)) < 300


def test_an_answer_trickling_in_past_the_deadline_is_unavailable(
    fake_apiserver: StartServer,
) -> None:
    body = b'{"kind": "PodList", "items": [], "metadata": {}}'

    def trickle() -> Iterator[bytes]:
        for byte in body:  # 2.5 s in all, never idle for the read timeout
            time.sleep(0.05)
            yield bytes([byte])

    server = fake_apiserver(always(Reply(chunks=trickle)))
    started = time.monotonic()
    with pytest.raises(ClusterUnavailable) as raised:
        server.client(timeout_s=(1.0, 0.3)).get("/api/v1/pods")
    # Two attempts, each bounded by twice the read timeout.
    assert time.monotonic() - started < 2.0
    assert "did not arrive in full within 0.6 s" in str(raised.value)


# --------------------------------------------------------- 2xx answers that are not the API


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"<html><body>502 Bad Gateway</body></html>", "body is not JSON (<html>"),
        (b'{"kind": "PodList", "items": [{"metad', "body is not JSON"),
        (b"\xff\xfe\x00garbage", "body is not JSON"),
        (b"", "body is empty"),
        (b"[1, 2]", "body is JSON list, not an object"),
        (b'"ok"', "body is JSON str, not an object"),
        (b"null", "body is JSON NoneType, not an object"),
    ],
)
def test_a_2xx_answer_that_is_not_a_json_object_makes_the_cluster_unavailable(
    fake_apiserver: StartServer, body: bytes, said: str
) -> None:
    server = fake_apiserver(always(Reply(body=body)))
    with pytest.raises(ClusterUnavailable, match=re.escape(said)) as raised:
        server.client().get("/api/v1/pods")
    _shown_safely(str(raised.value))
    assert len(server.requests) == 1


def test_plan_holds_and_says_why_when_a_proxy_answers_with_a_page(
    fake_apiserver: StartServer, tmp_path: Path
) -> None:
    # Before: a JSONDecodeError traceback out of plan.
    page = Reply(body=b"<html><body>\x1b[2JSign in to continue</body></html>")
    server = fake_apiserver(always(page))
    result = _plan(server, tmp_path)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "cluster c1: ERROR: ClusterUnavailable: API server" in result.output
    assert "HTTP 200 whose body is not JSON (<html><body>\\x1b[2JSign in" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- lists


def _page(items: list[object], token: str | None = None, version: str = "7") -> Reply:
    metadata = {"resourceVersion": version, **({"continue": token} if token else {})}
    return Reply(
        body=json.dumps({"kind": "PodList", "items": items, "metadata": metadata}).encode()
    )


def _pod(i: int) -> dict[str, object]:
    return {"metadata": {"name": f"p{i}", "namespace": "n"}}


def test_a_list_that_repeats_its_continue_token_is_refused(fake_apiserver: StartServer) -> None:
    # A broken aggregated API or proxy: the same token for ever (this one stops after
    # 300 pages, so the loop it caused before is measurable).
    def script(_method: str, _path: str, index: int) -> Reply:
        return _page([_pod(index)], token=None if index >= 300 else "same")

    server = fake_apiserver(script)
    client = server.client()
    with pytest.raises(ClusterUnavailable, match="gave the same continue token twice"):
        list(client.list("/api/v1/pods"))
    assert len(server.requests) == 2
    with pytest.raises(ClusterUnavailable, match="gave the same continue token twice"):
        client.list_with_version("/api/v1/pods")


def test_a_list_past_its_page_bound_is_refused(fake_apiserver: StartServer) -> None:
    # Empty pages with fresh tokens (this server stops after 300).
    def script(_method: str, _path: str, index: int) -> Reply:
        return _page([], token=None if index >= 300 else f"t{index}")

    server = fake_apiserver(script)
    with pytest.raises(ClusterUnavailable, match="goes on past 50 pages"):
        server.client(max_list_pages=50).list_with_version("/api/v1/pods")
    assert len(server.requests) == 50


def test_a_list_past_its_item_bound_is_refused(fake_apiserver: StartServer) -> None:
    def script(_method: str, _path: str, index: int) -> Reply:
        return _page([_pod(i) for i in range(60)], token=None if index >= 4 else f"t{index}")

    server = fake_apiserver(script)
    with pytest.raises(ClusterUnavailable, match="holds more than 100 items"):
        server.client(max_list_items=100).list_with_version("/api/v1/pods")
    assert len(server.requests) == 2


def test_the_list_bounds_admit_the_largest_fleet() -> None:
    # 20,000 Nodes and ~100,000 Pods (160,000 GPUs) fit many times over, in pages of
    # the default size.
    assert MAX_LIST_ITEMS >= 10 * 100_000
    assert MAX_LIST_PAGES * 1000 >= MAX_LIST_ITEMS


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"kind": "Status"}, "has no items"),
        ({"items": {"a": 1}}, "has items that are not a list"),
        ({"items": "abc"}, "has items that are not a list"),
        ({"items": [_pod(1), "p2"]}, "holds an item that is not an object"),
        ({"items": [None]}, "holds an item that is not an object"),
        ({"items": [], "metadata": ["x"]}, "has metadata that is not an object"),
        ({"items": [], "metadata": {"continue": 5}}, "continue token or resourceVersion"),
        ({"items": [], "metadata": {"resourceVersion": {}}}, "continue token or resourceVersion"),
    ],
)
def test_a_list_page_of_another_shape_makes_the_cluster_unavailable(
    fake_apiserver: StartServer, body: dict[str, object], said: str
) -> None:
    server = fake_apiserver(always(Reply(body=json.dumps(body).encode())))
    client = server.client()
    with pytest.raises(ClusterUnavailable, match=re.escape(said)):
        list(client.list("/api/v1/pods"))
    with pytest.raises(ClusterUnavailable, match=re.escape(said)):
        client.list_with_version("/api/v1/pods")


def test_a_list_that_takes_longer_than_its_bound_is_refused(fake_apiserver: StartServer) -> None:
    # Short pages with fresh tokens, each within every per-request bound: within the
    # page bound such a list held the cluster's read (and those after it) for days.
    def script(_method: str, _path: str, index: int) -> Reply:
        time.sleep(0.05)
        return _page([_pod(index)], token=f"t{index}")

    client = fake_apiserver(script).client(max_list_s=0.5)
    with pytest.raises(
        ClusterUnavailable, match=r"the list of /api/v1/pods takes longer than 0.5 s"
    ):
        client.list_with_version("/api/v1/pods")


def test_a_list_with_null_items_is_empty(fake_apiserver: StartServer) -> None:
    # Go writes an empty slice as null; the API server may send either.
    server = fake_apiserver(
        always(Reply(body=b'{"items": null, "metadata": {"resourceVersion": "9"}}'))
    )
    assert server.client().list_with_version("/api/v1/pods") == ([], "9")


def test_plan_holds_and_says_why_when_a_list_never_ends(
    fake_apiserver: StartServer, tmp_path: Path
) -> None:
    def script(_method: str, path: str, index: int) -> Reply:
        return _page([], token=None if index >= 1000 else "same")

    result = _plan(fake_apiserver(script), tmp_path)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "gave the same continue token twice" in result.output


@pytest.mark.parametrize(
    "item",
    [
        {"metadata": "x"},  # a string where the object's metadata is
        {"metadata": {"name": "p", "labels": ["a", "b"]}},
        {"metadata": {"name": "p"}, "status": {"conditions": ["Ready"]}},
    ],
    ids=["metadata-a-string", "labels-a-list", "conditions-of-strings"],
)
def test_plan_holds_and_says_why_when_an_item_is_not_of_an_objects_shape(
    fake_apiserver: StartServer, tmp_path: Path, item: dict[str, object]
) -> None:
    # Before: an AttributeError traceback out of plan (the client checks only that
    # each item is an object; the parsers read its fields).
    result = _plan(fake_apiserver(always(_page([item]))), tmp_path)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "ClusterUnavailable: the API server answered a" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- watches


def _watch(client: KubeClient, timeout_s: int = 5) -> list[dict[str, object]]:
    return list(client.watch("/api/v1/pods", resource_version="1", timeout_s=timeout_s))


def _stream(*lines: bytes, pause_s: float = 0.0) -> Reply:
    def chunks() -> Iterator[bytes]:
        for line in lines:
            time.sleep(pause_s)
            yield line

    return Reply(chunks=chunks)


ADDED = b'{"type": "ADDED", "object": {"metadata": {"name": "p", "resourceVersion": "2"}}}\n'


def test_a_watch_event_line_past_the_bound_is_refused(fake_apiserver: StartServer) -> None:
    server = fake_apiserver(always(_stream(ADDED, *[b"x" * 65536] * 100)))  # 6.5 MB, no newline
    events = []
    with pytest.raises(ClusterUnavailable, match="larger than 1,048,576 bytes"):
        for event in server.client(max_answer_bytes=1 << 20).watch(
            "/api/v1/pods", resource_version="1"
        ):
            events.append(event)
    assert [e["type"] for e in events] == ["ADDED"]


@pytest.mark.parametrize(
    "line",
    [
        b'{"type": "ADDED", "object": {"metad',
        b"<html>\x1b[2J</html>",
        b'["ADDED"]',
        b'{"type": "SURPRISE", "object": {"metadata": {"resourceVersion": "99"}}}',
        b'{"type": "ADDED", "object": "p"}',
        b'{"type": "DELETED"}',
    ],
)
def test_a_watch_line_that_is_not_an_event_is_refused(
    fake_apiserver: StartServer, line: bytes
) -> None:
    server = fake_apiserver(always(_stream(ADDED, line + b"\n", ADDED)))
    with pytest.raises(ClusterUnavailable, match="sent what is not an event") as raised:
        _watch(server.client())
    _shown_safely(str(raised.value))


def test_events_split_across_chunks_are_read_whole(fake_apiserver: StartServer) -> None:
    server = fake_apiserver(always(_stream(ADDED[:10], ADDED[10:] + ADDED[:40], ADDED[40:])))
    assert [e["type"] for e in _watch(server.client())] == ["ADDED", "ADDED"]


def test_a_watch_kept_alive_past_its_timeout_is_left(
    fake_apiserver: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A blank line every 0.1 s for 10 s: never idle long enough for the read timeout.
    monkeypatch.setattr(kubeclient, "WATCH_GRACE_S", 0.5, raising=False)
    server = fake_apiserver(always(_stream(ADDED, *[b"\n"] * 100, pause_s=0.1)))
    started = time.monotonic()
    assert [e["type"] for e in _watch(server.client(), timeout_s=1)] == ["ADDED"]
    assert time.monotonic() - started < 4.0
