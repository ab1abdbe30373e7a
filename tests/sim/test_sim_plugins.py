"""External autoscalers (``python:MODULE:CLASS``) in the simulator's loop, schedules
for another service, and ``simulate --export-workload``."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired import DesiredState
from reconciler.sim.engine import LoadProfile, SimConfig, synthetic_profile
from reconciler.sim.evaluate import EvaluationError, evaluate
from reconciler.sim.load import load_with_requests
from reconciler.sim.plugins import PlannerObservation
from reconciler.sim.workload import Workload, read_trace, synthetic_workload

SERVICE = "svc-b"  # min 2 prefill and 2 decode instances


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Plugins are imported from the working directory: run each test in its own."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_plugin(folder: Path, body: str) -> tuple[str, str]:
    """A module holding ``body`` (a class ``Planner``), under a fresh name so no test
    sees another's module; returns (module name, policy spec)."""
    module = f"planner_{uuid.uuid4().hex[:10]}"
    (folder / f"{module}.py").write_text(textwrap.dedent(body))
    return module, f"python:{module}:Planner"


FIXED = """
    SEEN = []

    class Planner:
        def __init__(self, service):
            self.service = service.name

        def decide(self, observation):
            SEEN.append(observation)
            return {prefill}, {decode}
"""


def short_load(hours: float = 0.1) -> LoadProfile:
    return synthetic_profile("b", hours=hours, peak_rps=6, seed=1, bursts=())


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("asked", "expected"),
    [((3, 5), (3, 5)), ((0, 4), (2, 4))],  # svc-b's min_instances is 2 for each role
    ids=["as-asked", "clamped-to-min"],
)
def test_a_plugin_gets_exactly_the_counts_it_asks_for_within_bounds(
    state: DesiredState,
    plugin_dir: Path,
    asked: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    module, spec = write_plugin(plugin_dir, FIXED.format(prefill=asked[0], decode=asked[1]))
    run = evaluate(state, SERVICE, short_load(), [spec]).policies[spec]
    assert run.failed is None
    assert np.asarray(run.timeline["prefill_instances"]).tolist() == [expected[0]] * 6
    assert np.asarray(run.timeline["decode_instances"]).tolist() == [expected[1]] * 6
    seen = sys.modules[module].SEEN
    assert [o.now_s for o in seen] == [30.0 * i for i in range(12)]  # every 30 s cycle
    assert seen[-1].prefill_ready == expected[0] and seen[-1].decode_ready == expected[1]


# --------------------------------------------------------------------------- observations


def step_load(low_rps: float, high_rps: float, minutes: int) -> LoadProfile:
    """``low_rps`` for ``minutes``, then ``high_rps`` as long; every request 2,000
    prompt and 200 output tokens."""
    rng = np.random.default_rng(7)
    half_s = minutes * 60.0
    arrivals = np.sort(
        np.concatenate(
            [
                rng.uniform(0, half_s, rng.poisson(low_rps * half_s)),
                rng.uniform(half_s, 2 * half_s, rng.poisson(high_rps * half_s)),
            ]
        )
    )
    n = arrivals.size
    workload = Workload(arrivals, np.full(n, 2000), np.full(n, 200), name="step")
    return LoadProfile.from_workload(workload)


def test_the_observation_follows_the_load(state: DesiredState, plugin_dir: Path) -> None:
    module, spec = write_plugin(plugin_dir, FIXED.format(prefill=4, decode=8))
    # Exact readings: every decode step here is under vLLM's first inter-token bucket
    # (10 ms), so a histogram quantile reads the same at both loads.
    exact = SimConfig(prometheus_like=False)
    run = evaluate(state, SERVICE, step_load(2.0, 8.0, minutes=10), [spec], config=exact)
    assert run.policies[spec].failed is None
    seen: list[PlannerObservation] = sys.modules[module].SEEN

    first = seen[0]
    assert first.now_s == 0.0 and first.requests_per_s is None and first.ttft_p90_ms is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.now_s = 1.0  # type: ignore[misc]

    # Cycles well inside each half (one window after the step has passed).
    low = [o for o in seen if 180 <= o.now_s < 600]
    high = [o for o in seen if 780 <= o.now_s < 1200]
    low_rps = np.mean([o.requests_per_s for o in low])
    high_rps = np.mean([o.requests_per_s for o in high])
    assert low_rps == pytest.approx(2.0, rel=0.2) and high_rps == pytest.approx(8.0, rel=0.2)
    low_tps = np.mean([o.prompt_tokens_per_s for o in low])
    high_tps = np.mean([o.prompt_tokens_per_s for o in high])
    assert low_tps == pytest.approx(2.0 * 2000, rel=0.2)
    assert high_tps == pytest.approx(8.0 * 2000, rel=0.2)
    assert np.mean([o.output_tokens_per_s for o in high]) > 3 * np.mean(
        [o.output_tokens_per_s for o in low]
    )
    for o in low + high:
        assert o.mean_prompt_tokens == pytest.approx(2000) and o.mean_output_tokens == 200
        assert o.ttft_p50_ms is not None and o.ttft_p90_ms is not None
        assert 0 < o.ttft_p50_ms <= o.ttft_p90_ms
        assert o.tbt_p50_ms is not None and o.tbt_p90_ms is not None
        assert 0 < o.tbt_p50_ms <= o.tbt_p90_ms
        assert (o.prefill_ready + o.prefill_starting, o.decode_ready + o.decode_starting) == (4, 8)
    # More sequences per decode instance: each decode step takes longer.
    assert np.mean([o.tbt_p50_ms for o in high]) > np.mean([o.tbt_p50_ms for o in low])


# --------------------------------------------------------------------------- bad plugins

BAD_PLUGINS = {
    "raises": (
        """
        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                if observation.now_s >= 60:
                    raise RuntimeError("boom")
                return 3, 5
        """,
        r"decide\(\) raised RuntimeError: boom in the cycle at t=60 s",
    ),
    "negative": (
        """
        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                return -1, 2
        """,
        r"decide\(\) returned \(-1, 2\) in the cycle at t=0 s; expected "
        r"\(prefill_instances, decode_instances\), two non-negative integers",
    ),
    "string": (
        """
        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                return "3,5"
        """,
        r"decide\(\) returned '3,5' in the cycle at t=0 s",
    ),
    "constructor": (
        """
        class Planner:
            def __init__(self, service):
                raise ValueError("no config for " + service.name)

            def decide(self, observation):
                return 3, 5
        """,
        r"Planner\(service\) raised ValueError: no config for svc-b \(constructing it",
    ),
    "import": (None, r"cannot import module 'planner_missing_\w+' \(ModuleNotFoundError"),
    # Plugin code all the way down: each of these ended the whole command before.
    "exits": (  # the command ended at exit code 0, printing no result
        """
        import sys

        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                sys.exit(0)
        """,
        r"decide\(\) raised SystemExit: 0 in the cycle at t=0 s",
    ),
    "exits-constructing": (
        """
        import sys

        class Planner:
            def __init__(self, service):
                sys.exit("no config")

            def decide(self, observation):
                return 3, 5
        """,
        r"Planner\(service\) raised SystemExit: no config \(constructing it",
    ),
    "unprintable-exception": (  # its __str__ raised inside the report: a traceback
        """
        class Unprintable(Exception):
            def __str__(self):
                raise ValueError("no")

        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                raise Unprintable()
        """,
        r"decide\(\) raised Unprintable: \(its message cannot be shown: str\(\) raised "
        r"ValueError\) in the cycle at t=0 s",
    ),
    "unprintable-result": (  # its __repr__ raised inside the report: a traceback
        """
        class Odd:
            def __repr__(self):
                raise ValueError("no")

        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                return Odd()
        """,
        r"decide\(\) returned a Odd \(repr\(\) raised ValueError\) in the cycle at t=0 s",
    ),
    "count-that-is-no-number": (  # an int subclass whose __int__ raises: a traceback
        """
        class Count(int):
            def __int__(self):
                raise ValueError("no")

        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                return Count(3), 5
        """,
        r"decide\(\) returned \(3, 5\) in the cycle at t=0 s; expected",
    ),
    "forging-message": (  # printed whole: an escape sequence, a forged line, 10 KB
        """
        class Planner:
            def __init__(self, service):
                pass

            def decide(self, observation):
                raise RuntimeError("boom\\x1b[2J\\nerror: forged " + "x" * 10_000)
        """,
        r"decide\(\) raised RuntimeError: boom\\x1b\[2J\\nerror: forged x{250,300}… in "
        r"the cycle at t=0 s$",
    ),
}


def bad_plugin(folder: Path, kind: str) -> tuple[str, str]:
    """(spec, expected message pattern) of the bad plugin ``kind``."""
    body, pattern = BAD_PLUGINS[kind]
    if body is None:
        spec = f"python:planner_missing_{uuid.uuid4().hex[:8]}:Planner"
    else:
        _module, spec = write_plugin(folder, body)
    return spec, f"^{spec}: .*{pattern}" if body is None else f"^{spec}: {pattern}"


@pytest.mark.parametrize("kind", list(BAD_PLUGINS))
def test_a_failing_plugin_is_marked_failed_and_the_others_still_run(
    state: DesiredState, plugin_dir: Path, kind: str
) -> None:
    spec, pattern = bad_plugin(plugin_dir, kind)
    result = evaluate(state, SERVICE, short_load(), [spec, "static-peak"])
    failed = result.policies[spec]
    assert failed.failed is not None
    assert _matches(pattern, failed.failed)
    static = result.policies["static-peak"]
    assert static.failed is None and static.gpu_hours > 0
    document = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert document["policies"][spec]["failed"] == failed.failed
    assert "gpu_hours" not in document["policies"][spec]  # no figure of a run that failed
    assert document["policies"]["static-peak"]["failed"] is None


def _matches(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


def _trace(folder: Path, hours: float = 0.1) -> Path:
    path = folder / "trace.csv"
    synthetic_workload("b", hours=hours, peak_rps=4, seed=2).to_csv(path)
    return path


@pytest.mark.parametrize("kind", ["raises", "negative", "string", "import", "exits"])
def test_simulate_prints_the_table_then_exits_1_when_a_plugin_fails(
    repo_root: Path, plugin_dir: Path, kind: str
) -> None:
    spec, pattern = bad_plugin(plugin_dir, kind)
    out_json = plugin_dir / "result.json"
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--trace",
            str(_trace(plugin_dir)),
            "--service",
            SERVICE,
            "--policies",
            f"static-peak,{spec}",
            "--json",
            str(out_json),
            "--repo",
            str(repo_root),
        ],
    )
    assert result.exit_code == 1, result.output
    output = result.output
    assert "GPU-hours" in output and "static-peak" in output  # the table was printed
    row = next(line for line in output.splitlines() if line.startswith(f"│ {spec}"))
    assert row.split("│")[2].strip() == "failed"
    assert _matches(pattern.lstrip("^"), output.replace("\n", ""))
    assert "1 of 2 policies failed" in output
    document = json.loads(out_json.read_text())
    assert _matches(pattern, document["policies"][spec]["failed"])
    assert document["policies"]["static-peak"]["failed"] is None
    assert document["policies"]["static-peak"]["gpu_hours"] > 0


# --------------------------------------------------------------------------- schedules


def test_a_schedule_for_one_other_service_is_replayed_with_a_note(
    state: DesiredState, tmp_path: Path
) -> None:
    path = tmp_path / "plan-chat.csv"
    path.write_text("t_s,service,prefill,decode\n0,chat,3,5\n180,chat,4,6\n")
    result = evaluate(state, SERVICE, short_load(), [f"schedule:{path}"])
    assert list(result.policies) == ["schedule:plan-chat.csv"]  # the file name, not the path
    run = result.policies["schedule:plan-chat.csv"]
    assert np.asarray(run.timeline["prefill_instances"]).tolist() == [3, 3, 3, 4, 4, 4]
    assert np.asarray(run.timeline["decode_instances"]).tolist() == [5, 5, 5, 6, 6, 6]
    assert any(
        "names only service 'chat', not 'svc-b'" in note and "replayed for 'svc-b'" in note
        for note in run.notes
    )


def test_a_schedule_naming_several_other_services_is_an_error(
    state: DesiredState, tmp_path: Path
) -> None:
    path = tmp_path / "plan.csv"
    path.write_text("t_s,service,prefill,decode\n0,chat,3,5\n0,svc-a,2,2\n")
    with pytest.raises(
        EvaluationError, match=r"no rows for service 'svc-b'.*2 other services \(chat, svc-a\)"
    ):
        evaluate(state, SERVICE, short_load(), [f"schedule:{path}"])


# --------------------------------------------------------------------------- export


def _simulate(repo_root: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app,
        [
            "simulate",
            "--service",
            SERVICE,
            "--policies",
            "static-peak",
            "--repo",
            str(repo_root),
            *args,
        ],
    )
    return result.exit_code, result.output


def test_the_exported_workload_replays_the_same_requests(
    state: DesiredState, repo_root: Path, tmp_path: Path
) -> None:
    trace = _trace(tmp_path, hours=0.05)
    exported, first_json, second_json = (
        tmp_path / "out" / "workload.csv",
        tmp_path / "a.json",
        tmp_path / "b.json",
    )
    # The replay's first request does not arrive at 0 s (at ~0.26 s with seed 3), so an
    # export that shifted times to start at 0 would fail the equality below.
    shaping = ["--rate-scale", "2.5", "--diurnal-hours", "0.2", "--seed", "3"]
    code, output = _simulate(
        repo_root,
        "--trace",
        str(trace),
        *shaping,
        "--export-workload",
        str(exported),
        "--json",
        str(first_json),
    )
    assert code == 0, output
    first = json.loads(first_json.read_text())
    lines = exported.read_text().splitlines()
    assert lines[0] == "arrival_s,prompt_tokens,output_tokens"
    assert len(lines) - 1 == first["requests"] > 0

    # Exactly the requests the simulation replayed: tiled, thinned and scaled.
    replayed = load_with_requests(state, SERVICE, trace, 2.5, 0.2, 3, SimConfig()).workload
    assert replayed is not None and replayed.arrival_s[0] > 0.0
    back = read_trace(exported)
    assert back.requests == replayed.requests
    assert int(back.prompt_tokens.sum()) == int(replayed.prompt_tokens.sum())
    assert int(back.output_tokens.sum()) == int(replayed.output_tokens.sum())
    assert np.array_equal(back.arrival_s, replayed.arrival_s)

    code, output = _simulate(repo_root, "--trace", str(exported), "--json", str(second_json))
    assert code == 0, output
    second = json.loads(second_json.read_text())
    assert (second["requests"], second["horizon_s"]) == (first["requests"], first["horizon_s"])
    assert second["policies"] == first["policies"]  # the same replay, figure for figure


def test_a_load_without_per_request_arrays_cannot_be_exported(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exported = tmp_path / "workload.csv"
    code, output = _simulate(
        repo_root, "--diurnal-hours", "0.05", "--export-workload", str(exported)
    )
    assert code == 1
    assert "--export-workload: the synthetic load (no --trace)" in output.replace("\n", "")
    assert not exported.exists()

    from reconciler.sim import load

    monkeypatch.setattr(load, "MAX_REQUEST_ARRAYS", 10)
    code, output = _simulate(
        repo_root,
        "--trace",
        str(_trace(tmp_path, hours=0.05)),
        "--rate-scale",
        "2",
        "--export-workload",
        str(exported),
    )
    assert code == 1
    assert "scaled as a fluid, without per-request arrays" in output.replace("\n", "")
    assert not exported.exists()
