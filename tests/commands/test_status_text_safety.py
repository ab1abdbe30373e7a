"""Text the live cluster holds (a Lease's holder, a drift detail quoting an
annotation, a cluster error) reaches `status` and `plan` text only as visible
escapes: anyone with edit rights in a managed namespace writes it."""

from __future__ import annotations

from reconciler.apply import cyclereport
from reconciler.commands.status import AppliedRevision, ClusterStatus, Leader, Status, format_text
from reconciler.loop import ClusterOutcome, CycleResult
from reconciler.placement.base import PlacementResult
from reconciler.plan import Plan
from reconciler.state import FleetState

HOSTILE = "evil\x1b[2J\x1b[31mAPPROVED\r\nfake line\u202egnp.exe"


def _assert_inert(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "fake line" not in text.splitlines()[0:1] and not any(
        line.startswith("fake line") for line in text.splitlines()
    )


def test_status_shows_a_hostile_lease_holder_and_drift_as_escapes() -> None:
    cluster = ClusterStatus(
        "c", "ok", None, AppliedRevision("unknown"), drift=[f"node {HOSTILE}"], notes=[HOSTILE]
    )
    status = Status("src", "tgt", False, Leader(HOSTILE, None, ""), None, [cluster], [HOSTILE])
    text = format_text(status)
    _assert_inert(text)
    assert "leader: evil\\x1b[2J\\x1b[31mAPPROVED\\r\\nfake line\\u202egnp.exe" in text


def test_status_cuts_a_10_kb_lease_holder_to_a_kubernetes_name_still_escaped() -> None:
    holder = HOSTILE + "A" * 10_000
    status = Status("src", "tgt", False, Leader(holder, "t", ""), None, [], [])
    (line,) = [line for line in format_text(status).splitlines() if line.startswith("leader: ")]
    _assert_inert(line)
    # 253 characters of the identity (the last an ellipsis), each escape 4 to 6 long.
    assert line.startswith("leader: evil\\x1b[2J") and "A…" in line and "AAAA" * 64 not in line
    assert line.endswith("… (renewed t)") and len(line) < 300
    assert status.to_json()["leader"]["holder"] == holder  # JSON keeps the identity whole


def test_plan_text_shows_hostile_notes_and_cluster_errors_as_escapes() -> None:
    plan = Plan("c", {}, PlacementResult("c", ()), (), FleetState("c", ()), notes=(HOSTILE,))
    failed = ClusterOutcome(cluster="d", plan=None, error=HOSTILE, outcome="error")
    result = CycleResult(
        clusters=[ClusterOutcome(cluster="c", plan=plan), failed], source_label="t"
    )
    text = cyclereport.format_text(result, title="heteroscale plan")
    _assert_inert(text)
    assert "\\x1b[2J" in text
