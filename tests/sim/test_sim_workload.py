"""Reading traces (both public formats, bad input), time scaling and synthetic load."""

from __future__ import annotations

import gzip
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.sim import workload as workload_module
from reconciler.sim.workload import (
    SERVICE_SHAPES,
    TraceError,
    Workload,
    diurnal_curve,
    read_trace,
    shape_for_service,
    synthetic_workload,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"


def _azure(
    tmp_path: Path, rows: list[str], name: str = "trace.csv", header: str = AZURE_HEADER
) -> Path:
    path = tmp_path / name
    path.write_text(header + "".join(rows))
    return path


def _jsonl(tmp_path: Path, records: list[dict], name: str = "trace.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------- real traces


def test_reads_the_azure_conversation_trace(azure_trace: Path) -> None:
    w = read_trace(azure_trace)
    assert w.requests == 19_366
    assert w.duration_s == pytest.approx(3_501.7, abs=0.1)
    assert w.prompt_tokens.mean() == pytest.approx(1_154.7, abs=0.1)
    assert w.output_tokens.mean() == pytest.approx(211.1, abs=0.1)
    assert w.notes == ()


def test_reads_the_mooncake_trace_spreading_its_3_second_ticks(mooncake_trace: Path) -> None:
    w = read_trace(mooncake_trace, seed=1)
    assert w.requests == 12_031
    assert w.prompt_tokens.mean() == pytest.approx(12_035.1, abs=0.1)
    assert any("3 s ticks" in note for note in w.notes)
    # Spread, not bunched: almost every request has its own arrival time.
    assert np.unique(w.arrival_s).size > 12_000
    assert np.all(np.diff(w.arrival_s) >= 0)
    assert read_trace(mooncake_trace, seed=1).arrival_s.tolist() == w.arrival_s.tolist()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        ("", 1, "empty trace"),
        (AZURE_HEADER, 1, "a header but no requests"),
        (
            AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:47.1",
            3,
            "truncated",
        ),
        (
            AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:47,abc,4\r\n",
            3,
            "prompt tokens 'abc'",
        ),
        (AZURE_HEADER + "yesterday,374,44\r\n", 2, "timestamp 'yesterday'"),
        (AZURE_HEADER + "2023-11-16 18:15:46,374,44,9\r\n", 2, "expected 3 fields, found 4"),
        (AZURE_HEADER + "2023-11-16 18:15:46,374,-4\r\n", 2, "negative output tokens"),
        ("when,prompt,completion\n1,2,3\n", 1, "unknown columns ['when', 'prompt', 'completion']"),
        ("arrival_s,prompt_tokens,output_tokens\n0.5,-10,3\n", 2, "negative prompt tokens"),
        # A timestamp years away: the simulator's per-second arrays would not fit memory
        # (7.45 GiB for 1e9 s; an OverflowError for 1e308 s).
        (
            "arrival_s,prompt_tokens,output_tokens\n0,100,10\n1e9,100,10\n",
            3,
            "arrival 1e+09 s is beyond the longest span a trace may cover (7 days",
        ),
        (
            AZURE_HEADER
            + "2023-11-16 18:15:46.6805900,374,44\r\n2093-11-16 18:15:50,5,44\r\n"
            + "2023-11-16 18:15:47,374,44\r\n",
            3,  # the line it was read from, though sorted last
            "beyond the longest span a trace may cover",
        ),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path: Path, content: str, line: int, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert info.value.line == line
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_bad_jsonl_names_file_and_line(tmp_path: Path) -> None:
    good = {"timestamp": 0, "input_length": 10, "output_length": 5}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"timestamp": 3000, "input_length": 1')
    with pytest.raises(TraceError, match=r"t.jsonl:2: malformed JSON.*truncated"):
        read_trace(path)
    path.write_text('{"timestamp": 0, "input_length": 1,}\n' + json.dumps(good) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:1: malformed JSON"):
        read_trace(path)
    path.write_text(
        json.dumps(good) + "\n" + json.dumps({"timestamp": 1, "input_length": 2}) + "\n"
    )
    with pytest.raises(TraceError, match=r"t.jsonl:2: missing fields \['output_length'\]"):
        read_trace(path)
    path.write_text(json.dumps({**good, "output_length": -1}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:1: negative output tokens"):
        read_trace(path)
    path.write_text(json.dumps({**good, "input_length": "many"}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:1: .*integers"):
        read_trace(path)


def test_truncated_gzip_is_reported(tmp_path: Path) -> None:
    records = [
        {"timestamp": i * 1000, "input_length": 100 + i, "output_length": 7} for i in range(2000)
    ]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated gzip stream"):
        read_trace(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="is a directory"):
        read_trace(tmp_path)


def test_unsorted_timestamps_are_sorted_with_a_note(tmp_path: Path) -> None:
    path = _azure(
        tmp_path,
        [
            "2023-11-16 18:15:50,300,30\r\n",
            "2023-11-16 18:15:46,100,10\r\n",
            "2023-11-16 18:15:48,200,20\r\n",
        ],
    )
    w = read_trace(path)
    assert w.prompt_tokens.tolist() == [100, 200, 300]
    assert w.arrival_s.tolist() == [0.0, 2.0, 4.0]
    assert any("sorted by time" in note and "line 3" in note for note in w.notes)


def test_zero_output_counts_as_one_token(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"timestamp": 0, "input_length": 10, "output_length": 0}])
    w = read_trace(path)
    assert w.output_tokens.tolist() == [1]
    assert any("0 output tokens" in note for note in w.notes)


def test_plain_and_burstgpt_csv(tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    Workload(np.array([0.0, 1.5]), np.array([10, 20]), np.array([3, 4])).to_csv(plain)
    w = read_trace(plain)
    assert w.arrival_s.tolist() == [0.0, 1.5] and w.output_tokens.tolist() == [3, 4]
    burst = tmp_path / "burst.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n7,GPT-4,1000,20,1020,API log\n"
    )
    w = read_trace(burst)
    assert w.arrival_s.tolist() == [0.0, 2.0] and w.prompt_tokens.tolist() == [472, 1000]


def test_a_byte_order_mark_reads_alike_plain_and_gzipped(tmp_path: Path) -> None:
    """Spreadsheet exports start with a BOM; gzipping the file must not change what it
    says (the gzipped one was refused: unknown columns ['\\ufeffarrival_s'])."""
    text = "\ufeffarrival_s,prompt_tokens,output_tokens\n0,10,3\n1.5,20,4\n"
    plain = tmp_path / "bom.csv"
    plain.write_text(text, encoding="utf-8")
    zipped = tmp_path / "bom.csv.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    for path in (plain, zipped):
        w = read_trace(path)
        assert w.arrival_s.tolist() == [0.0, 1.5] and w.prompt_tokens.tolist() == [10, 20]


def test_a_trace_of_more_requests_than_a_load_holds_is_refused_at_the_first_extra_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text bound alone let 22 million minimal rows ("0,1,1") through: 1.6 GB to
    validate. A trace holds at most MAX_REQUEST_ARRAYS requests (shortened here)."""
    monkeypatch.setattr(workload_module, "MAX_REQUEST_ARRAYS", 3)
    plain = tmp_path / "many.csv"
    plain.write_text("arrival_s,prompt_tokens,output_tokens\n" + "0,1,1\n" * 4)
    with pytest.raises(TraceError, match=r"many.csv:5: more than 3 requests, the most a load"):
        read_trace(plain)
    plain.write_text("arrival_s,prompt_tokens,output_tokens\n" + "0,1,1\n" * 3)
    assert read_trace(plain).requests == 3
    lines = tmp_path / "many.jsonl"
    record = {"timestamp": 0, "input_length": 1, "output_length": 1}
    lines.write_text((json.dumps(record) + "\n") * 4)
    with pytest.raises(TraceError, match=r"many.jsonl:4: more than 3 requests"):
        read_trace(lines)


# --------------------------------------------------------------------------- scaling


def _poisson_workload(n: int = 4000, seed: int = 3) -> Workload:
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(0.5, n))
    arrival -= arrival[0]
    return Workload(arrival, rng.integers(10, 4000, n), rng.integers(1, 800, n), name="p")


@settings(max_examples=15, deadline=None)
@given(factor=st.floats(0.2, 12.0), seed=st.integers(0, 2**16))
def test_rate_scaling_keeps_lengths_and_is_deterministic(factor: float, seed: int) -> None:
    base = _poisson_workload()
    scaled = base.rate_scaled(factor, seed=seed)
    assert scaled.requests == pytest.approx(base.requests * factor, rel=0.08, abs=30)
    assert np.all(np.diff(scaled.arrival_s) >= 0)
    assert scaled.arrival_s.min() >= 0 and scaled.arrival_s.max() <= base.duration_s
    # Every copy is a copy: the token pairs come from the original requests.
    pairs = set(zip(base.prompt_tokens.tolist(), base.output_tokens.tolist(), strict=True))
    assert (
        set(zip(scaled.prompt_tokens.tolist(), scaled.output_tokens.tolist(), strict=True)) <= pairs
    )
    assert abs(np.median(scaled.prompt_tokens) - np.median(base.prompt_tokens)) < 0.1 * np.median(
        base.prompt_tokens
    )
    again = base.rate_scaled(factor, seed=seed)
    assert np.array_equal(again.arrival_s, scaled.arrival_s)


def test_rate_scaling_smooths_sub_minute_bursts() -> None:
    base = _poisson_workload(n=2000)
    scaled = base.rate_scaled(40, seed=0)
    per_second = np.bincount(scaled.arrival_s.astype(int))[5:-5]
    # A 40x denser Poisson stream has relative noise ~ 1/sqrt(80): far below 40 copies of one.
    assert per_second.std() / per_second.mean() < 0.35


def test_rate_scaled_copies_are_independent_users_not_clones() -> None:
    """K times the users average the minute-to-minute noise of prompt tokens/s down
    by ~sqrt(K); K clones would keep the original's (long prompts arriving K at a
    time)."""
    base = _poisson_workload(n=20_000)  # ~2.8 h at 2 requests/s

    def minute_noise(workload: Workload) -> float:
        minutes = (workload.arrival_s // 60).astype(int)
        tokens = np.bincount(minutes, weights=workload.prompt_tokens)[2:-2]
        return float(np.abs(np.diff(tokens)).mean() / tokens.mean())

    scaled = base.rate_scaled(25, seed=3)
    assert minute_noise(scaled) < minute_noise(base) / 3
    # Lengths still come from the trace's own requests, in pairs.
    pairs = set(zip(base.prompt_tokens.tolist(), base.output_tokens.tolist(), strict=True))
    assert set(zip(scaled.prompt_tokens.tolist(), scaled.output_tokens.tolist(), strict=True)) <= (
        pairs
    )


def test_diurnal_tiling_has_a_trough_of_a_third_of_the_peak() -> None:
    base = _poisson_workload(n=8000)  # ~67 minutes at 2 requests/s
    day = base.diurnal(4.0, seed=0)
    assert day.duration_s <= 4 * 3600
    hours = np.bincount((day.arrival_s // 1800).astype(int), minlength=8)
    assert hours[0] / hours[3:5].mean() == pytest.approx(
        diurnal_curve(np.array([900.0]), 4 * 3600)[0], abs=0.1
    )
    assert hours[3:5].mean() / (1800 * base.requests / base.duration_s) == pytest.approx(
        0.97, abs=0.08
    )
    assert day.requests == pytest.approx(
        base.requests * 4 * 3600 / base.duration_s * 2 / 3, rel=0.05
    )


def test_diurnal_tiles_join_the_trace_to_its_own_neighbourhood() -> None:
    """A trace whose prompts grow through its hour: tiled end to start, each boundary
    would put its longest prompts right after its shortest. Mirrored, the prompts
    just after a boundary are those just before it."""
    n = 3600
    arrival = np.arange(n, dtype=float)
    prompt = np.linspace(100, 4000, n).round().astype(np.int64)
    base = Workload(arrival, prompt, np.full(n, 100, dtype=np.int64), name="growing")
    day = base.diurnal(3.0, seed=0, trough_ratio=1.0)
    assert np.all(np.diff(day.arrival_s) >= 0)
    period = base.duration_s + 1.0
    for boundary in (period, 2 * period):
        before = day.prompt_tokens[(day.arrival_s > boundary - 60) & (day.arrival_s < boundary)]
        after = day.prompt_tokens[(day.arrival_s >= boundary) & (day.arrival_s < boundary + 60)]
        assert abs(after.mean() - before.mean()) < 0.05 * before.mean()
    # Every request of the trace is still there once per tile (no thinning at trough 1).
    assert day.requests == pytest.approx(3 * n, abs=3)


def test_diurnal_curve_shape() -> None:
    t = np.array([0.0, 1800.0, 3600.0])
    assert diurnal_curve(t, 3600.0).tolist() == pytest.approx([1 / 3, 1.0, 1 / 3])


@pytest.mark.parametrize(("shape", "prompt", "output"), [("a", 3000, 350), ("b", 7800, 700)])
def test_synthetic_service_shapes(shape: str, prompt: float, output: float) -> None:
    w = synthetic_workload(shape, hours=1.0, peak_rps=20, seed=4)
    assert w.prompt_tokens.mean() == pytest.approx(prompt, rel=0.05)
    assert w.output_tokens.mean() == pytest.approx(output, rel=0.05)
    expected = 20 * 3600 * (1 + 1 / 3) / 2  # mean of the diurnal curve, bursts add a little
    assert expected * 0.95 < w.requests < expected * 1.3
    assert np.array_equal(
        synthetic_workload(shape, hours=1.0, peak_rps=20, seed=4).arrival_s, w.arrival_s
    )


def test_synthetic_bursts_raise_the_rate() -> None:
    from reconciler.sim.workload import Burst

    burst = Burst(start_s=1200, duration_s=600, factor=2.0)
    w = synthetic_workload("a", hours=1.0, peak_rps=10, seed=0, trough_ratio=1.0, bursts=(burst,))
    inside = np.sum((w.arrival_s >= 1200) & (w.arrival_s < 1800))
    before = np.sum((w.arrival_s >= 300) & (w.arrival_s < 900))
    assert inside / before == pytest.approx(2.0, rel=0.15)


def test_a_prefix_of_the_day_has_its_arrivals_at_the_days_rate() -> None:
    """``until_s`` draws only the day's first seconds: the same curve (the rate at 10
    minutes into a 2-hour day, not into a 15-minute one), the same density."""
    day = synthetic_workload("chat", hours=2.0, peak_rps=40, seed=4, bursts=())
    prefix = synthetic_workload("chat", hours=2.0, peak_rps=40, seed=4, bursts=(), until_s=900)
    assert prefix.requests > 0 and float(prefix.arrival_s.max()) < 900
    in_day = int(np.sum(day.arrival_s < 900))
    assert abs(prefix.requests - in_day) < 5 * np.sqrt(in_day)  # Poisson spread
    short_day = synthetic_workload("chat", hours=0.25, peak_rps=40, seed=4, bursts=())
    assert prefix.requests < 0.8 * short_day.requests  # not a day compressed into 900 s
    assert "first 900 s only" in prefix.notes[0]
    # Without it, the whole day, draw for draw as before.
    whole = synthetic_workload("chat", hours=2.0, peak_rps=40, seed=4, bursts=(), until_s=None)
    np.testing.assert_array_equal(whole.arrival_s, day.arrival_s)


def test_service_names_pick_shapes() -> None:
    assert shape_for_service("svc-a") == "a"
    assert shape_for_service("svc-b") == "b"
    assert shape_for_service("summarize") == "summarize"
    assert shape_for_service("anything") == "chat"
    assert set(SERVICE_SHAPES) >= {"a", "b", "chat"}


# --------------------------------------------------------------------------- hostile input


@pytest.fixture
def one_mib_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    """The text limit lowered to 1 MiB, so limits are tested without 128 MiB files."""
    monkeypatch.setattr(workload_module, "MAX_TRACE_TEXT_BYTES", 1 << 20)
    return 1 << 20


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path, one_mib_limit: int) -> None:
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress(b" " * (one_mib_limit * 8)))
    with pytest.raises(TraceError, match="inflates to more than the 1 MiB limit: sample or split"):
        read_trace(path)


def test_a_file_over_the_limit_is_refused(tmp_path: Path, one_mib_limit: int) -> None:
    path = tmp_path / "big.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "1,2,3\n" * one_mib_limit)
    with pytest.raises(TraceError, match="larger than the 1 MiB limit: sample or split"):
        read_trace(path)


def test_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)  # no writer: reading would block for ever
    with pytest.raises(TraceError, match="not a regular file"):
        read_trace(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        read_trace("/dev/zero")  # never ends


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        # np.bincount over output lengths would take 7 GB.
        ("300000000", "output tokens 300000000 is more than 10,000,000, beyond any model's"),
        ("99999999999999999999999", "output tokens 99999999999999999999999 is more than"),
        ("-99999999999999999999999", "negative output tokens (-99999999999999999999999)"),
        # int() takes these; no trace writes them.
        ("1_000", "output tokens '1_000' is not an integer"),
        ("\uff11\uff12", "output tokens '\uff11\uff12' is not an integer"),
    ],
)
def test_an_impossible_or_lax_token_count_is_refused_at_its_line(
    tmp_path: Path, cell: str, message: str
) -> None:
    path = _azure(
        tmp_path, ["2023-11-16 18:15:46,374,44\r\n", f"2023-11-16 18:15:47,374,{cell}\r\n"]
    )
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        read_trace(path)
    assert info.value.line == 3


def test_a_lax_timestamp_is_refused_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,1\n1_0.5,10,1\n")
    with pytest.raises(TraceError, match=r"plain.csv:3: timestamp '1_0.5' is not a number"):
        read_trace(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("output_length", 300_000_000, "output tokens 300000000 is more than 10,000,000"),
        ("input_length", 10**30, f"prompt tokens {10**30} is more than 10,000,000"),
        ("input_length", -(10**30), f"negative prompt tokens (-{10**30})"),
        ("timestamp", 10**400, "timestamp is not finite"),
        ("timestamp", True, "timestamp must be a number"),
        ("timestamp", "1000", "timestamp must be a number"),
    ],
)
def test_jsonl_values_out_of_range_or_of_the_wrong_type_are_refused_at_their_line(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    good = {"timestamp": 0, "input_length": 10, "output_length": 5}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, field: value}) + "\n")
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        read_trace(path)
    assert info.value.line == 2


@pytest.mark.parametrize(
    ("line_text", "message"),
    [
        # json's decoder recurses per level: RecursionError, not a JSONDecodeError.
        ("[" * 100_000 + "]" * 100_000, "nested deeper than a trace record ever is"),
        ('{"timestamp": ' + "[" * 100_000, "nested deeper than a trace record ever is"),
        # Python refuses to convert an integer this long: a ValueError, not a JSONDecodeError.
        (
            '{"timestamp": 1, "input_length": ' + "9" * 5_000 + ', "output_length": 5}',
            "an integer of more than 4,300 digits",
        ),
    ],
    ids=["nested-arrays", "nested-in-a-record", "long-integer"],
)
def test_a_json_line_python_cannot_parse_is_refused_at_its_line(
    tmp_path: Path, line_text: str, message: str
) -> None:
    good = {"timestamp": 0, "input_length": 10, "output_length": 5}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + line_text + "\n")
    with pytest.raises(TraceError, match=re.escape(f"t.jsonl:2: malformed JSON: {message}")):
        read_trace(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        # Millions of fields (csv.reader built every one before the width was checked).
        ("wide.csv", "arrival_s,prompt_tokens,output_tokens\n0,10,5\n" + "1," * 600_000 + "1\n"),
        # One record spread over many lines by quoted line breaks, each line short.
        (
            "quoted.csv",
            'arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,"' + '",1,"\n' * 200_000 + '"\n',
        ),
        # A JSON object of a million keys (json.loads built it, then listed them all).
        (
            "keys.jsonl",
            '{"timestamp": 0, "input_length": 10, "output_length": 5}\n{'
            + ",".join(f'"k{i}": 1' for i in range(150_000))
            + "}\n",
        ),
    ],
    ids=["wide-csv-row", "csv-record-over-many-lines", "json-object-of-many-keys"],
)
def test_a_row_longer_than_any_request_is_refused_at_its_first_line(
    tmp_path: Path, name: str, text: str
) -> None:
    assert len(text) > workload_module.MAX_TRACE_ROW_CHARS
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=r"a row of more than 1,048,576 characters") as info:
        read_trace(path)
    assert info.value.line == 3 if name.endswith(".csv") else 2
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "cell.csv",
            "arrival_s,prompt_tokens,output_tokens\n0,10,5\n1," + "7" * 100_000 + "x,5\n",
            "prompt tokens '77777",
        ),
        (
            "columns.csv",
            ",".join(f"column{i}" for i in range(50_000)) + "\n0,10,5\n",
            "unknown columns ['column0', 'column1',",
        ),
        (
            "keys.jsonl",
            '{"timestamp": 0, "input_length": 10, "output_length": 5}\n{'
            + ",".join(f'"k{i}": 1' for i in range(50_000))
            + "}\n",
            "missing fields ['timestamp', 'input_length', 'output_length'] (found ['k0', 'k1',",
        ),
    ],
    ids=["a-100-kb-cell", "50000-columns", "a-record-of-50000-keys"],
)
def test_an_error_quotes_the_traces_text_cut(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=re.escape(message)) as info:
        read_trace(path)
    assert len(str(info.value)) < len(str(path)) + 600
    if "expected one of" in info.value.detail:  # what follows the quoted values survives
        assert info.value.detail.endswith("plain CSV (arrival_s,prompt_tokens,output_tokens)")


def test_an_error_shows_control_characters_in_the_traces_name_escaped(tmp_path: Path) -> None:
    path = tmp_path / "t\x1b[2J\nerror: forged\u202e.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,-1,5\n")
    with pytest.raises(TraceError, match="negative prompt tokens") as info:
        read_trace(path)
    shown = str(info.value)
    assert "\x1b" not in shown and "\n" not in shown and "\u202e" not in shown
    assert "t\\x1b[2J\\nerror: forged\\u202e.csv:2: negative prompt tokens" in shown


def test_a_mooncake_line_of_a_long_requests_block_hashes_is_read(tmp_path: Path) -> None:
    # The longest request allowed lists ~20,000 block hashes: well within a row.
    hashes = list(range(10_000_000 // 512))
    record = {"timestamp": 0, "input_length": 10_000_000, "output_length": 5, "hash_ids": hashes}
    path = _jsonl(tmp_path, [record, {**record, "timestamp": 1000}])
    assert read_trace(path).prompt_tokens.tolist() == [10_000_000, 10_000_000]


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    # U+2028 (a line separator to str.splitlines) may stand unescaped in a JSON string.
    records = [
        {"timestamp": 0, "input_length": 10, "output_length": 5, "text": "a\u2028b\u0085c"},
        {"timestamp": 1000, "input_length": -1, "output_length": 5},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    with pytest.raises(TraceError, match=r"t.jsonl:2: negative prompt tokens"):
        read_trace(path)
    records[1]["input_length"] = 20
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    assert read_trace(path).prompt_tokens.tolist() == [10, 20]


@pytest.mark.parametrize("stamp", ["2023-11-16 18:15:47.68+05:00", "2023-11-16 18:15:47Z"])
def test_an_azure_timestamp_with_a_time_zone_is_refused_without_a_warning(
    tmp_path: Path, stamp: str
) -> None:
    # numpy would convert it to UTC with a warning, hours away from the other rows.
    path = _azure(tmp_path, ["2023-11-16 18:15:46,374,44\r\n", f"{stamp},374,44\r\n"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TraceError, match=r"trace.csv:3: timestamp .* has a time zone"):
            read_trace(path)


@pytest.mark.parametrize(
    "stamp", ["2608-06-06 12:00:00", "2300-01-01 00:00:00", "1600-01-01 00:00:00"]
)
def test_an_azure_timestamp_nanoseconds_cannot_hold_is_refused_at_its_line(
    tmp_path: Path, stamp: str
) -> None:
    """Parsed straight to nanoseconds, 2608-06-06 wrapped around to 2023-11-16 and was
    replayed there; 2300 was called a negative timestamp at another row's line."""
    rows = [f"2023-11-16 18:15:{i:02d},374,44\r\n" for i in range(40)]
    path = _azure(tmp_path, [*rows, f"{stamp},374,44\r\n", "2023-11-16 18:16:00,374,44\r\n"])
    with pytest.raises(TraceError, match=r"trace.csv:42: timestamp .* is outside the days"):
        read_trace(path)


def test_a_trace_without_any_prompt_tokens_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,0,5\n1,0,7\n")
    with pytest.raises(TraceError, match="no prompt tokens at all: every one of the 2 requests"):
        read_trace(path)
