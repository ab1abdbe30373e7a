"""Request workloads for the simulator: trace readers, time scaling and synthetic load.

A :class:`Workload` is three aligned numpy arrays, one entry per request: arrival time
(seconds from the first request), prompt tokens and output tokens. Nothing here makes a
Python object per request.

Readers (:func:`read_trace`; the format is detected from the file's content):

- **Azure LLM inference CSV** (``TIMESTAMP,ContextTokens,GeneratedTokens``; the 2023 and
  2024 public traces), timestamps ``YYYY-MM-DD HH:MM:SS.fffffff``.
- **Mooncake JSON Lines** (optionally gzip-compressed): ``timestamp`` in milliseconds,
  ``input_length``, ``output_length`` (``hash_ids`` and other fields are ignored).
  The public conversation trace quantises arrivals to ~3-second ticks. Replay spreads
  the requests of each tick uniformly at random (seeded) over the tick's interval, so
  the simulator does not see a burst every 3 s that the real service never had; the
  tick is detected as the most common gap between distinct timestamps when at least
  half the requests share a timestamp with another.
- **BurstGPT CSV** (``Timestamp,Model,Request tokens,Response tokens,...``; seconds).
- **Plain CSV** ``arrival_s,prompt_tokens,output_tokens`` (what :meth:`Workload.to_csv`
  and ``heteroscale simulate --export-workload`` write): seconds from the start of the
  load, kept as written (not shifted to start at 0), so an exported workload replays
  on the same seconds.

Bad input raises :class:`TraceError` naming the file and line: an empty file or a
header with no rows, a truncated file (cut mid-row or a gzip stream that ends early),
a malformed row (JSON nested deeper than Python parses or an integer of more digits
than it converts included), a row longer than :data:`MAX_TRACE_ROW_CHARS`, unknown
columns, negative token counts or more than any request has
(:data:`MAX_TOKENS_PER_REQUEST`), no prompt tokens at all, an Azure timestamp with a
time zone, a number written as Python reads it but no trace writes it (``1_000``,
non-ASCII digits, a JSON string or boolean), a file that is not a regular file, or
more text than :data:`MAX_TRACE_TEXT_BYTES` (after gunzip). Timestamps out of order are
repaired by a stable sort and reported in ``Workload.notes``; zero output tokens are
counted as one (every request produces its first token) and also noted.

Time scaling:

- :meth:`Workload.rate_scaled` multiplies the arrival rate by K, deterministically for a
  seed: every request is kept ``floor(K)`` times plus once more with probability
  ``K - floor(K)`` (K < 1 thins). Each extra copy arrives up to +-5 min (``jitter_s``)
  from its original and takes the token counts (prompt and output, as a pair) of a
  request drawn from the trace within that same neighbourhood. A K-times larger
  population is K times as many independent users, not K clones: clones keep the
  original's relative noise (the Azure conversation trace's ~330 requests a minute
  make prompt tokens/s jump ~9% from one minute to the next, and K clones of a long
  prompt arrive together), where K times the users average it down by ``sqrt(K)``.
  What survives is what the trace says about the population: its token-length
  distribution, its pairs, and its rate and mix curves at scales above ten minutes.
- :meth:`Workload.diurnal` tiles the trace over H hours, every other tile mirrored in
  time (so each boundary joins the trace to its own neighbourhood, not its last minute
  to its first), and thins it under a diurnal curve
  ``trough + (1 - trough) * sin^2(pi t / H)``: the H hours are one compressed day,
  trough (default one third of peak) at both ends, peak in the middle, where the rate
  equals the original trace's. A day that would tile more than
  :data:`MAX_REQUEST_ARRAYS` requests before thinning is refused (``WorkloadError``).
- :func:`synthetic_workload` draws a non-homogeneous Poisson process with the same
  diurnal curve plus optional bursts, and log-normal prompt/output lengths; the
  :data:`SERVICE_SHAPES` ``"a"`` (~3000/350 tokens) and ``"b"`` (~7800/700) are the
  paper's services A and B.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import warnings
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from reconciler.atomic_write import replaced
from reconciler.bounded_read import GZIP_MAGIC, BoundedReadError, gunzip_bounded, read_regular_file
from reconciler.errors import PermanentError
from reconciler.text_safety import cut, listed, visible


class TraceError(PermanentError):
    """A trace file cannot be read; names the file and, where known, the line. Whoever
    wrote the trace (a pull request's file, a download) wrote what the message quotes,
    and the file's name may hold anything a path can: the message shows its control and
    invisible characters escaped (``text_safety.visible``), and its detail is cut to
    ``DETAIL_CHARS`` (each quoted value is cut shorter where it is quoted, ``_quoted``,
    so what follows it survives)."""

    DETAIL_CHARS = 1000

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.detail = cut(message, self.DETAIL_CHARS)
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(visible(f"{where}: {self.detail}"))


# The most characters of a value a trace holds that an error quotes, and the most
# values (column names, a record's keys) it lists.
_QUOTED_CHARS = 60
_QUOTED_VALUES = 8


def _quoted(value: str) -> str:
    """A value from the trace as an error quotes it: its start, as a Python literal."""
    return repr(cut(value, _QUOTED_CHARS))


def _quoted_list(values: list[str]) -> str:
    """Values from the trace as an error lists them: the first few, each quoted."""
    return f"[{listed(values, _quoted, _QUOTED_VALUES)}]"


class WorkloadError(PermanentError, ValueError):
    """A workload cannot be scaled or tiled as asked (a ``ValueError`` too: the
    arguments are wrong for this workload). The message names the workload, a trace's
    file name: its control and invisible characters are shown escaped."""

    def __init__(self, message: str):
        super().__init__(visible(message))


@dataclass(frozen=True)
class Workload:
    """Requests as aligned arrays, sorted by arrival time (seconds, first request at 0
    unless the workload was cut from a longer one)."""

    arrival_s: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64, >= 1
    name: str = "workload"
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_tokens) == len(self.output_tokens) == n):
            raise ValueError("arrival_s, prompt_tokens and output_tokens must have one length")

    @property
    def requests(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """From time 0 to the last arrival."""
        return float(self.arrival_s[-1]) if self.requests else 0.0

    def with_note(self, note: str) -> Workload:
        return replace(self, notes=(*self.notes, note))

    def rate_scaled(self, factor: float, seed: int = 0, jitter_s: float = 600.0) -> Workload:
        """K times the arrival rate (see the module docstring); ``WorkloadError`` beyond
        :data:`MAX_REQUEST_ARRAYS` requests (``sim.load`` scales the binned load there)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise WorkloadError(f"rate scale must be a positive number, got {factor}")
        if not jitter_s >= 0:
            raise WorkloadError(f"jitter must not be negative, got {jitter_s}")
        if factor == 1.0 or self.requests == 0:
            return self
        if self.requests * factor > MAX_REQUEST_ARRAYS:
            raise WorkloadError(
                f"{self.name}: rate scale x{factor:g} of its {self.requests:,} requests is "
                f"~{self.requests * factor:,.0f} requests, more than the "
                f"{MAX_REQUEST_ARRAYS:,} a load holds as arrays"
            )
        rng = np.random.default_rng([seed, 0x5CA1E])
        whole = math.floor(factor)
        extra = rng.random(self.requests) < (factor - whole)
        copies = np.full(self.requests, whole, dtype=np.int64) + extra
        index = np.repeat(np.arange(self.requests), copies)
        # The first copy of each kept request is the original; the others are moved by a
        # uniform jitter of +-jitter_s/2 and take the lengths of a request of the same
        # neighbourhood (module docstring): independent users, not clones.
        first = (
            np.concatenate(([True], index[1:] != index[:-1])) if index.size else index.astype(bool)
        )
        shift = (rng.random(index.size) - 0.5) * jitter_s
        arrival = self.arrival_s[index] + np.where(first, 0.0, shift)
        mean_gap_s = self._mean_gap_s()
        # Requests within the jitter of each other; all of them when they all arrive at
        # one time (a trace spanning zero seconds has no gap to count in).
        reach = round(jitter_s / 2 / mean_gap_s) if mean_gap_s > 0 else self.requests - 1
        neighbour = index + rng.integers(-reach, reach + 1, index.size)
        neighbour = np.clip(neighbour, 0, self.requests - 1)
        lengths_of = np.where(first, index, neighbour)
        end = self.duration_s
        arrival = np.where(arrival < 0, -arrival, arrival)  # reflect at the ends
        arrival = np.where(arrival > end, 2 * end - arrival, arrival)
        arrival = np.clip(arrival, 0.0, end)
        order = np.argsort(arrival, kind="stable")
        return Workload(
            arrival[order],
            self.prompt_tokens[lengths_of][order],
            self.output_tokens[lengths_of][order],
            name=f"{self.name} x{factor:g}",
            notes=(
                *self.notes,
                f"rate scaled x{factor:g} (seed {seed}, copies jittered by up to "
                f"+-{jitter_s / 2:g} s, lengths from requests within it): "
                f"{self.requests} -> {index.size} requests",
            ),
        )

    def _mean_gap_s(self) -> float:
        return self.duration_s / max(self.requests - 1, 1) if self.requests > 1 else 1.0

    def diurnal(self, hours: float, seed: int = 0, trough_ratio: float = 1.0 / 3.0) -> Workload:
        """Tile over ``hours`` and thin under a diurnal curve (see the module docstring)."""
        if not (hours > 0 and math.isfinite(hours)):
            raise WorkloadError(f"diurnal hours must be positive, got {hours}")
        if not 0.0 < trough_ratio <= 1.0:
            raise WorkloadError(f"trough ratio must be in (0, 1], got {trough_ratio}")
        if self.requests == 0:
            return self
        if self.requests > 1 and self.duration_s == 0:
            # Tiles are one trace long: a trace of zero seconds has no length to tile.
            raise WorkloadError(
                f"{self.name}: all {self.requests} requests arrive at one time, a trace "
                "spanning zero seconds cannot be tiled over a diurnal day"
            )
        horizon_s = hours * 3600.0
        period_s = self.duration_s + self._mean_gap_s()
        # Every tile's requests are drawn before the curve thins them: a short trace
        # over a long day is many tiles (requests 1e-9 s apart over a week asked for
        # 2 PiB, a thousand in one second for 4.5 GiB a column).
        tiled = self.requests * max(1.0, horizon_s / period_s)  # inf for a subnormal period
        if tiled > MAX_REQUEST_ARRAYS:
            raise WorkloadError(
                f"{self.name}: {hours:g} h of its {self.requests:,} requests over "
                f"{self.duration_s:g} s is {tiled:,.0f} requests before the diurnal curve "
                f"thins them, more than the {MAX_REQUEST_ARRAYS:,} a load holds as arrays: "
                "tile it over fewer hours, or give a trace that spans more of the day"
            )
        tiles = max(1, math.ceil(horizon_s / period_s))
        offsets = np.repeat(np.arange(tiles) * period_s, self.requests)
        # Odd tiles run the trace backwards (a mirror), so every boundary joins a
        # stretch of the trace to its own neighbourhood: end to end, start to start.
        # End to start would put the trace's last minute next to its first, a step in
        # rate and mix the trace never had (the Azure conversation trace's first
        # minutes carry ~1.7x the prompt tokens/s of its last), once per tile.
        backwards = np.repeat(np.arange(tiles) % 2 == 1, self.requests)
        within = np.tile(self.arrival_s, tiles)
        arrival = np.where(backwards, self.duration_s - within, within) + offsets
        keep_in_horizon = arrival < horizon_s
        rng = np.random.default_rng([seed, 0xD1A1])
        curve = diurnal_curve(arrival, horizon_s, trough_ratio)
        keep = keep_in_horizon & (rng.random(arrival.size) < curve)
        order = np.argsort(arrival[keep], kind="stable")
        prompt = np.tile(self.prompt_tokens, tiles)[keep][order]
        output = np.tile(self.output_tokens, tiles)[keep][order]
        return Workload(
            arrival[keep][order],
            prompt,
            output,
            name=f"{self.name} over {hours:g} h",
            notes=(
                *self.notes,
                f"tiled {tiles}x over {hours:g} h, every other tile mirrored, under a "
                f"diurnal curve (trough {trough_ratio:.2f} of peak, seed {seed}): "
                f"{int(keep.sum())} requests",
            ),
        )

    def window(self, start_s: float, end_s: float) -> Workload:
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s])
        return replace(
            self,
            arrival_s=self.arrival_s[lo:hi],
            prompt_tokens=self.prompt_tokens[lo:hi],
            output_tokens=self.output_tokens[lo:hi],
        )

    def to_csv(self, path: Path) -> None:
        """Write the plain CSV that :func:`read_trace` reads back as this workload:
        arrival times as they are and at full (round-trip) precision, so a replay bins
        every request into the same second. Whole or not at all (``atomic_write``): a
        write cut short (a full disk) left a shorter workload that read back as valid."""
        rows = zip(
            self.arrival_s.tolist(),
            self.prompt_tokens.tolist(),
            self.output_tokens.tolist(),
            strict=True,
        )
        with replaced(path) as handle:
            handle.write("arrival_s,prompt_tokens,output_tokens\n")
            handle.writelines(f"{a!r},{int(p)},{int(o)}\n" for a, p, o in rows)


def diurnal_curve(t_s: np.ndarray, horizon_s: float, trough_ratio: float = 1.0 / 3.0) -> np.ndarray:
    """Relative load in [trough, 1]: trough at 0 and ``horizon_s``, peak in the middle."""
    return (
        trough_ratio
        + (1.0 - trough_ratio) * np.sin(np.pi * np.asarray(t_s, dtype=float) / horizon_s) ** 2
    )


# --------------------------------------------------------------------------- readers

# The longest span a trace may cover: the simulator steps every second (a week is
# ~600,000 steps, minutes per policy on two cores); a longer one, or a timestamp years
# away from the rest, would have it allocate per-second arrays without bound.
MAX_TRACE_SPAN_S = 7 * 24 * 3600
# The most text a trace may hold (after gunzip; the file itself is read up to the same
# size). The repository's traces are 0.7 MB; 128 MiB is ~6.7 million rows of plain CSV
# (~19 bytes a row) or ~3.5 million Azure rows (~37), a day of the Azure conversation
# trace's rate several times over. Reading holds the file's bytes, its text and ~32
# bytes of arrays a row (rows are converted in chunks, no Python object per row), so a
# trace at the limit takes ~0.5 GB; before the limit a 188 MB CSV took 3.6 GB and a
# 305 KB gzip bomb 1.9 GB.
MAX_TRACE_TEXT_BYTES = 128 * 1024 * 1024
# No real request has more prompt or output tokens than this: it is beyond any model's
# context window. A larger count is a broken row, and a count of billions would have
# the simulator allocate per-token arrays (an output length of 3e8 took 7 GB).
MAX_TOKENS_PER_REQUEST = 10_000_000
# The longest row (a CSV record or a JSON line) a trace may hold. A real one holds a
# few numbers (Azure's ~40 characters), a Mooncake line its block hashes too (~2 KB in
# the public trace; ~200 KB for a request of MAX_TOKENS_PER_REQUEST tokens). Parsing a
# longer row whole built its millions of fields or keys: a 120 MB CSV row of 42 million
# fields took 3.3 GB and 11 s to refuse, a 120 MB JSON object 2 GB and 18 s.
MAX_TRACE_ROW_CHARS = 1 << 20
# The most requests a load holds as arrays (~24 bytes each, several times that while a
# load is scaled or tiled), and so the most a trace may hold: more than any public trace
# (BurstGPT's largest release ~5 million) and than a day of the evaluation's scaled
# traces (Azure x50 over 8 h, ~5 million). MAX_TRACE_TEXT_BYTES of the shortest rows
# ("0,1,1") would be 22 million: 1.6 GB to validate, 2 GB to simulate. Rate scaling
# beyond it is done on the binned load (``sim.load``).
MAX_REQUEST_ARRAYS = 12_000_000
# Rows converted to arrays at a time: their strings are freed chunk by chunk.
_CHUNK_ROWS = 1 << 16
_FIRST_NON_SPACE = re.compile(r"\S")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
PLAIN_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
BURSTGPT_COLUMNS = (
    "Timestamp",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
)
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")
KNOWN_FORMATS = (
    "Azure CSV (TIMESTAMP,ContextTokens,GeneratedTokens), "
    "Mooncake JSON Lines (timestamp,input_length,output_length; .gz or plain), "
    "BurstGPT CSV (Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type), "
    "plain CSV (arrival_s,prompt_tokens,output_tokens)"
)


def read_trace(path: str | Path, *, seed: int = 0) -> Workload:
    """Read a trace file of any supported format (detected from its content)."""
    path = Path(path)
    text = _trace_text(path)
    first = _FIRST_NON_SPACE.search(text)
    if first is None:
        raise TraceError(path, "empty trace: no requests", line=1)
    workload = _read_jsonl(path, text, seed) if first.group() == "{" else _read_csv(path, text)
    return replace(workload, name=path.name)


def _trace_text(path: Path) -> str:
    """The file's text, gunzipped if it is gzip, within :data:`MAX_TRACE_TEXT_BYTES`."""
    limit = f"{MAX_TRACE_TEXT_BYTES // (1024 * 1024)} MiB"
    try:
        raw = read_regular_file(path, MAX_TRACE_TEXT_BYTES)
    except FileNotFoundError:
        raise TraceError(path, "no such file") from None
    except BoundedReadError as exc:
        hint = ": sample or split the trace" if exc.over_limit else ""
        raise TraceError(path, f"{exc.reason}{hint}") from None
    except OSError as exc:
        raise TraceError(path, f"cannot be read ({exc.strerror or exc})") from None
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gunzip_bounded(raw, MAX_TRACE_TEXT_BYTES)
        except BoundedReadError as exc:
            if exc.partial:
                # Say where the stream stops: the line the data ends in.
                lines = exc.partial.count(b"\n") + 1
                raise TraceError(
                    path, f"truncated gzip stream: data ends in line {lines}", line=lines
                ) from None
            if exc.over_limit:
                raise TraceError(
                    path,
                    f"gzip stream inflates to more than the {limit} limit: sample or split "
                    "the trace",
                ) from None
            raise TraceError(path, exc.reason) from None
        try:
            return raw.decode("utf-8-sig")  # a BOM reads as it does uncompressed
        except UnicodeDecodeError as exc:
            raise TraceError(path, f"not a readable gzip file ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TraceError(
            path, f"not UTF-8 text (byte {exc.start}); expected one of: {KNOWN_FORMATS}"
        ) from None


class _Lines:
    """The lines of a trace's text, split on ``\\n`` only, each with its ``\\n`` (as
    iterating an ``io.StringIO`` gives them, without its copy of the text at four bytes a
    character): JSON strings and CSV fields may hold U+2028 and the other characters
    ``str.splitlines`` also breaks at. A row (a JSON line; a CSV record, which quoted
    line breaks may spread over several lines) longer than :data:`MAX_TRACE_ROW_CHARS`
    is refused at its first line before it is cut out of the text; the reader calls
    ``next_row`` where each row ends."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.text = text
        self.offset = 0  # where the next line begins
        self.line = 0  # the number of the last line given
        self.row_offset = 0  # where the current row began
        self.row_line = 1

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        text, start = self.text, self.offset
        if start >= len(text):
            raise StopIteration
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        if end - self.row_offset > MAX_TRACE_ROW_CHARS:
            raise TraceError(
                self.path,
                f"a row of more than {MAX_TRACE_ROW_CHARS:,} characters: no request's row is "
                "this long (a row of a real trace holds a few numbers, a Mooncake line its "
                "block hashes too)",
                line=self.row_line,
            )
        self.offset = end
        self.line += 1
        return text[start:end]

    def next_row(self) -> None:
        """The next line begins a row."""
        self.row_offset = self.offset
        self.row_line = self.line + 1


def _rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """CSV rows with their 1-based line numbers (blank lines skipped)."""
    lines = _Lines(path, text)
    reader = csv.reader(lines)
    for row in reader:  # the reader takes no line beyond the row it returns
        lines.next_row()
        if not row or all(not cell.strip() for cell in row):
            continue
        yield reader.line_num, row


def _read_csv(path: Path, text: str) -> Workload:
    rows = _rows(path, text)
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise TraceError(path, "empty trace: no requests", line=1) from None
    except csv.Error as exc:
        raise TraceError(path, f"malformed CSV header: {exc}", line=1) from None
    columns = tuple(cell.strip() for cell in header)
    if columns == AZURE_COLUMNS:
        kind = "azure"
    elif columns == PLAIN_COLUMNS:
        kind = "plain"
    elif columns == BURSTGPT_COLUMNS:
        kind = "burstgpt"
    else:
        known = set(AZURE_COLUMNS) | set(PLAIN_COLUMNS) | set(BURSTGPT_COLUMNS)
        unknown = [c for c in columns if c not in known]
        detail = (
            f"unknown columns {_quoted_list(unknown)}"
            if unknown
            else f"columns {_quoted_list(list(columns))} in an unexpected order"
        )
        raise TraceError(path, f"{detail}; expected one of: {KNOWN_FORMATS}", line=header_line)
    width = len(columns)
    time_column, prompt_column, output_column = (0, 2, 3) if kind == "burstgpt" else (0, 1, 2)
    chunks = _CsvColumns(path, azure_time=kind == "azure")
    ends_with_newline = text.endswith(("\n", "\r"))
    try:
        for line, row in rows:
            if len(row) != width:
                last = not ends_with_newline and line == text.count("\n") + 1
                hint = (
                    " (the file looks truncated: its last line is incomplete)"
                    if last and len(row) < width
                    else ""
                )
                raise TraceError(
                    path, f"expected {width} fields, found {len(row)}{hint}", line=line
                )
            chunks.add(line, row[time_column], row[prompt_column], row[output_column])
    except csv.Error as exc:
        raise TraceError(path, f"malformed CSV: {exc}") from None
    lines, arrival, prompt, output = chunks.arrays()
    if not lines.size:
        raise TraceError(path, "empty trace: a header but no requests", line=header_line)
    return _finish(path, arrival, prompt, output, lines, rebase=kind != "plain")


def _too_many_requests(path: Path, line: int) -> TraceError:
    return TraceError(
        path,
        f"more than {MAX_REQUEST_ARRAYS:,} requests, the most a load holds: sample or "
        "split the trace",
        line=line,
    )


class _CsvColumns:
    """A CSV trace's three columns and line numbers, converted to arrays every
    :data:`_CHUNK_ROWS` rows (three strings a row would take ~200 bytes; the arrays
    take 32). Each value converts as it would in one piece, so chunks change nothing."""

    def __init__(self, path: Path, *, azure_time: bool):
        self.path = path
        self.azure_time = azure_time
        self.lines: list[int] = []
        self.times: list[str] = []
        self.prompts: list[str] = []
        self.outputs: list[str] = []
        self.done: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.count = 0  # rows added

    def add(self, line: int, time: str, prompt: str, output: str) -> None:
        self.count += 1
        if self.count > MAX_REQUEST_ARRAYS:
            raise _too_many_requests(self.path, line)
        self.lines.append(line)
        self.times.append(time)
        self.prompts.append(prompt)
        self.outputs.append(output)
        if len(self.lines) >= _CHUNK_ROWS:
            self._convert()

    def _convert(self) -> None:
        path = self.path
        lines = np.asarray(self.lines, dtype=np.int64)
        times = (
            _parse_timestamps(path, self.times, lines)
            if self.azure_time
            else _parse_numbers(path, self.times, lines, "timestamp", float)
        )
        prompt = _parse_numbers(path, self.prompts, lines, "prompt tokens", int)
        output = _parse_numbers(path, self.outputs, lines, "output tokens", int)
        self.done.append((lines, times, prompt, output))
        self.lines, self.times, self.prompts, self.outputs = [], [], [], []

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Line numbers, arrival seconds, prompt and output tokens: Azure timestamps as
        seconds from the earliest."""
        if self.lines:
            self._convert()
        if not self.done:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty.astype(np.float64), empty, empty
        lines, times, prompt, output = (
            np.concatenate(parts) for parts in zip(*self.done, strict=True)
        )
        self.done = []
        if self.azure_time:
            times = (times - times.min()).astype("timedelta64[ns]").astype(np.int64) / 1e9
        return lines, times, prompt, output


@contextmanager
def _time_zones_refused() -> Iterator[None]:
    """numpy's warning that it converted a timestamp's offset to UTC raised as an
    error (its text has varied between versions, but names time zones)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*timezone")
        yield


def _parse_timestamps(path: Path, values: list[str], lines: np.ndarray) -> np.ndarray:
    """Azure timestamps as ``datetime64[ns]``. They are local times without an offset:
    numpy would convert one with an offset (``+05:00``, ``Z``) to UTC with a warning,
    moving that row hours away from the others, so an offset is refused."""
    try:
        with _time_zones_refused():
            # Read in microseconds, which hold any year written with four digits:
            # parsed straight to nanoseconds, a date past 2262 wrapped around silently
            # (2608-06-06 replayed as 2023-11-16, a hostile prober).
            stamps = np.array(
                [v.strip().replace(" ", "T", 1) for v in values], dtype="datetime64[us]"
            )
    except (ValueError, Warning):
        for value, line in zip(values, lines, strict=True):
            try:
                with _time_zones_refused():
                    np.datetime64(value.strip().replace(" ", "T", 1), "us")
            except Warning:
                raise TraceError(
                    path,
                    f"timestamp {_quoted(value)} has a time zone; Azure traces' timestamps have "
                    "none (convert them all to one time zone and drop the offsets)",
                    line=int(line),
                ) from None
            except ValueError:
                raise TraceError(
                    path,
                    f"timestamp {_quoted(value)} is not 'YYYY-MM-DD HH:MM:SS[.fffffff]'",
                    line=int(line),
                ) from None
        raise
    if np.isnat(stamps).any():
        line = int(lines[np.isnat(stamps)][0])
        raise TraceError(path, "missing timestamp", line=line)
    outside = (stamps < _NS_FIRST) | (stamps > _NS_LAST)
    if outside.any():
        where = np.flatnonzero(outside)[0]
        raise TraceError(
            path,
            f"timestamp {_quoted(values[where])} is outside the days nanosecond times hold "
            "(1677-09-22 to 2262-04-10)",
            line=int(lines[where]),
        )
    return stamps.astype("datetime64[ns]")


# The days ``datetime64[ns]`` holds whole (it runs from 1677-09-21 00:12:43 to
# 2262-04-11 23:47:16).
_NS_FIRST = np.datetime64("1677-09-22", "us")
_NS_LAST = np.datetime64("2262-04-10T23:59:59.999999", "us")


def _parse_numbers(
    path: Path, values: list[str], lines: np.ndarray, what: str, kind: type
) -> np.ndarray:
    dtype = np.int64 if kind is int else np.float64
    try:
        if not _as_traces_write_numbers("".join(values)):  # one check for the whole chunk
            raise ValueError
        array = np.array([kind(v) for v in values], dtype=dtype)
    except (ValueError, OverflowError):
        for value, line in zip(values, lines, strict=True):
            try:
                if not _as_traces_write_numbers(value):
                    raise ValueError
                number = kind(value)
            except ValueError:
                raise TraceError(
                    path,
                    f"{what} {_quoted(value.strip())} is not a{'n integer' if kind is int else ' number'}",
                    line=int(line),
                ) from None
            if kind is int and not _INT64_MIN <= number <= _INT64_MAX:
                raise _token_count_error(path, what, number, int(line)) from None
        raise
    if kind is float and not np.isfinite(array).all():
        raise TraceError(path, f"{what} is not finite", line=int(lines[~np.isfinite(array)][0]))
    return array


def _as_traces_write_numbers(text: str) -> bool:
    """int() and float() also take "1_000" and non-ASCII digits ("１２"): no trace
    writes those, so a cell holding them is a malformed one."""
    return text.isascii() and "_" not in text


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _token_count_error(path: Path, what: str, count: int, line: int) -> TraceError:
    """The error for a token count out of range (negative, or more than any request has)."""
    if count < 0:
        return TraceError(path, f"negative {what} ({count})", line=line)
    return TraceError(
        path,
        f"{what} {count} is more than {MAX_TOKENS_PER_REQUEST:,}, beyond any model's "
        "context window: not a real request",
        line=line,
    )


def _read_jsonl(path: Path, text: str, seed: int) -> Workload:
    # Typed arrays, not lists: 8 bytes a value instead of a Python object each.
    times = array("d")
    prompts = array("q")
    outputs = array("q")
    line_numbers = array("q")
    text_lines = _Lines(path, text)
    for raw_line in text_lines:
        text_lines.next_row()  # a JSON line is a row
        number = text_lines.line
        stripped = raw_line.strip()
        if not stripped:
            continue
        try:
            record = json.loads(stripped)
        except json.JSONDecodeError as exc:
            truncated = not raw_line.endswith("\n")  # the last line, cut mid-record
            hint = " (the file looks truncated: its last line is incomplete)" if truncated else ""
            raise TraceError(path, f"malformed JSON: {exc.msg}{hint}", line=number) from None
        except RecursionError:  # json's decoder recurses once per nested array or object
            raise TraceError(
                path, "malformed JSON: nested deeper than a trace record ever is", line=number
            ) from None
        except ValueError:  # an integer beyond Python's int conversion limit
            raise TraceError(
                path,
                f"malformed JSON: an integer of more than {sys.get_int_max_str_digits():,} digits",
                line=number,
            ) from None
        if not isinstance(record, dict):
            raise TraceError(path, "each line must be a JSON object", line=number)
        missing = [f for f in MOONCAKE_FIELDS if f not in record]
        if missing:
            raise TraceError(
                path,
                f"missing fields {missing} (found {_quoted_list(sorted(record))}); expected one of: {KNOWN_FORMATS}",
                line=number,
            )
        stamp, prompt, output = (record[f] for f in MOONCAKE_FIELDS)
        # JSON numbers only: float() would also take true, "1000" or "1_000".
        if not (_is_json_number(stamp) and _is_json_int(prompt) and _is_json_int(output)):
            raise TraceError(
                path,
                "timestamp must be a number and input_length/output_length integers",
                line=number,
            )
        try:
            timestamp = float(stamp)
        except OverflowError:  # an integer beyond any float
            timestamp = math.inf
        if not math.isfinite(timestamp):
            raise TraceError(path, "timestamp is not finite", line=number)
        for name, count in (("prompt tokens", prompt), ("output tokens", output)):
            if not _INT64_MIN <= count <= _INT64_MAX:
                raise _token_count_error(path, name, count, number)
        if len(line_numbers) >= MAX_REQUEST_ARRAYS:
            raise _too_many_requests(path, number)
        times.append(timestamp / 1000.0)
        prompts.append(prompt)
        outputs.append(output)
        line_numbers.append(number)
    if not line_numbers:
        raise TraceError(path, "empty trace: no requests", line=1)
    lines = np.asarray(line_numbers, dtype=np.int64)
    arrival = np.asarray(times, dtype=np.float64)
    arrival -= arrival.min()
    workload = _finish(
        path,
        arrival,
        np.asarray(prompts, dtype=np.int64),
        np.asarray(outputs, dtype=np.int64),
        lines,
    )
    return _spread_ticks(workload, seed)


def _is_json_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_json_number(value: object) -> bool:
    return isinstance(value, float) or _is_json_int(value)


def _spread_ticks(workload: Workload, seed: int) -> Workload:
    """Spread requests that share a quantised timestamp over the tick (see module doc)."""
    distinct, counts = np.unique(workload.arrival_s, return_counts=True)
    if (
        distinct.size < 2
        or (counts > 1).sum() == 0
        or counts[counts > 1].sum() < workload.requests / 2
    ):
        return workload
    gaps = np.round(np.diff(distinct), 3)
    values, freq = np.unique(gaps, return_counts=True)
    tick_s = float(values[np.argmax(freq)])
    if tick_s <= 0:
        return workload
    rng = np.random.default_rng([seed, 0x71C])
    arrival = workload.arrival_s + rng.random(workload.requests) * tick_s
    order = np.argsort(arrival, kind="stable")
    return Workload(
        arrival[order],
        workload.prompt_tokens[order],
        workload.output_tokens[order],
        name=workload.name,
        notes=(
            *workload.notes,
            f"timestamps quantised to {tick_s:g} s ticks ({distinct.size} distinct for {workload.requests} requests): "
            f"each tick's requests spread uniformly over its {tick_s:g} s (seed {seed})",
        ),
    )


def _finish(
    path: Path,
    arrival: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    lines: np.ndarray,
    *,
    rebase: bool = True,
) -> Workload:
    notes: list[str] = []
    for name, values in (("prompt tokens", prompt), ("output tokens", output)):
        negative = values < 0
        if negative.any():
            line = int(lines[negative][0])
            raise TraceError(
                path,
                f"negative {name} ({int(values[negative][0])}); {int(negative.sum())} such rows",
                line=line,
            )
        beyond = values > MAX_TOKENS_PER_REQUEST
        if beyond.any():
            where = np.flatnonzero(beyond)[0]
            raise _token_count_error(path, name, int(values[where]), int(lines[where]))
    if not prompt.any():
        # Prefill is sized by prompt tokens per second: a trace without any is no load
        # the simulator can size (and not a real service's traffic).
        raise TraceError(
            path,
            f"no prompt tokens at all: every one of the {prompt.size} requests has 0 prompt tokens",
        )
    if (arrival < 0).any():
        raise TraceError(path, "negative timestamp", line=int(lines[arrival < 0][0]))
    backwards = np.flatnonzero(np.diff(arrival) < 0)
    if backwards.size:
        order = np.argsort(arrival, kind="stable")
        notes.append(
            f"{path.name}: {backwards.size} rows earlier than the row before them (first at line "
            f"{int(lines[backwards[0] + 1])}); sorted by time"
        )
        arrival, prompt, output = arrival[order], prompt[order], output[order]
    zero_output = output == 0
    if zero_output.any():
        notes.append(
            f"{path.name}: {int(zero_output.sum())} requests with 0 output tokens counted as 1 (the first token)"
        )
        output = np.maximum(output, 1)
    if rebase:  # wall-clock timestamps: the first request arrives at 0
        arrival = arrival - arrival[0]
    beyond = arrival > MAX_TRACE_SPAN_S
    if beyond.any():
        where = np.flatnonzero(beyond)[0]
        line = int(lines[order[where]] if backwards.size else lines[where])
        raise TraceError(
            path,
            f"arrival {arrival[where]:g} s is beyond the longest span a trace may cover "
            f"({MAX_TRACE_SPAN_S // 86400} days from the start); split the trace",
            line=line,
        )
    return Workload(arrival, prompt, output, name=path.name, notes=tuple(notes))


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class LengthShape:
    """Mean prompt and output tokens and their coefficients of variation."""

    prompt_mean: float
    output_mean: float
    prompt_cv: float = 0.6
    output_cv: float = 0.5
    prompt_max: int = 32_768
    output_max: int = 4_096


SERVICE_SHAPES: dict[str, LengthShape] = {
    # The paper's service A (~3000 in / ~350 out) and B (~7800 / ~700).
    "a": LengthShape(prompt_mean=3000, output_mean=350),
    "b": LengthShape(prompt_mean=7800, output_mean=700),
    # Conversation traffic like the Azure 2023 trace (~1150 / ~210).
    "chat": LengthShape(
        prompt_mean=1150, output_mean=210, prompt_cv=0.8, output_cv=0.9, output_max=1000
    ),
    # Summarisation: long documents in, short summaries out.
    "summarize": LengthShape(prompt_mean=4000, output_mean=300, prompt_cv=0.7, output_cv=0.5),
}


def shape_for_service(service: str) -> str:
    """The synthetic shape a service name suggests: its own name, its last ``-part``
    (``svc-a`` -> ``a``), else ``chat``."""
    for key in (service, service.rsplit("-", 1)[-1]):
        if key in SERVICE_SHAPES:
            return key
    return "chat"


@dataclass(frozen=True)
class Burst:
    """A burst: ``factor`` x the load for ``duration_s`` from ``start_s``."""

    start_s: float
    duration_s: float
    factor: float


def _lognormal(
    rng: np.random.Generator, mean: float, cv: float, size: int, upper: int
) -> np.ndarray:
    sigma2 = math.log(1.0 + cv * cv)
    mu = math.log(mean) - sigma2 / 2.0
    values = np.rint(rng.lognormal(mu, math.sqrt(sigma2), size))
    return np.clip(values, 1, upper).astype(np.int64)


def default_bursts(hours: float, seed: int = 0, count: int = 3) -> tuple[Burst, ...]:
    """``count`` seeded bursts of 1.5-2x the load for 3-10 minutes inside ``hours``."""
    rng = np.random.default_rng([seed, 0xB0257])
    horizon_s = hours * 3600.0
    return tuple(
        Burst(
            start_s=float(rng.uniform(0.1, 0.9) * horizon_s),
            duration_s=float(min(rng.uniform(180, 600), 0.1 * horizon_s)),
            factor=float(rng.uniform(1.5, 2.0)),
        )
        for _ in range(count)
    )


def rate_curve(
    t_s: np.ndarray,
    horizon_s: float,
    peak_rps: float,
    trough_ratio: float,
    bursts: tuple[Burst, ...],
) -> np.ndarray:
    """Requests/s of the synthetic load at ``t_s``."""
    rate = peak_rps * diurnal_curve(t_s, horizon_s, trough_ratio)
    for burst in bursts:
        inside = (t_s >= burst.start_s) & (t_s < burst.start_s + burst.duration_s)
        rate = np.where(inside, rate * burst.factor, rate)
    return rate


# ``sim.engine.synthetic_profile`` takes these parameters too, on purpose: it is this
# load binned per second for fleets too large for per-request arrays, and passes them on.
def synthetic_workload(
    shape: str | LengthShape,
    *,
    hours: float,
    peak_rps: float,
    seed: int = 0,
    trough_ratio: float = 1.0 / 3.0,
    bursts: tuple[Burst, ...] | None = None,
    until_s: float | None = None,
) -> Workload:
    """A diurnal Poisson workload with log-normal lengths; ``bursts=None`` adds three
    seeded bursts (1.5-2x for 3-10 minutes), ``()`` none. ``until_s``: only the
    arrivals before it, of the same day (the same process, other draws than the whole
    day's: for callers that never look further)."""
    lengths = SERVICE_SHAPES[shape.lower()] if isinstance(shape, str) else shape
    if not (hours > 0 and peak_rps > 0):
        raise ValueError("synthetic workload needs positive hours and peak_rps")
    horizon_s = hours * 3600.0
    span_s = horizon_s if until_s is None else min(horizon_s, max(0.0, until_s))
    rng = np.random.default_rng([seed, 0x5E7])
    if bursts is None:
        bursts = default_bursts(hours, seed)
    # Thinning of a homogeneous process at the highest rate (exact for any curve).
    top = peak_rps * max([1.0, *[b.factor for b in bursts]])
    total = rng.poisson(top * span_s)
    candidates = np.sort(rng.random(total) * span_s)
    keep = rng.random(total) * top < rate_curve(
        candidates, horizon_s, peak_rps, trough_ratio, bursts
    )
    arrival = candidates[keep]
    n = arrival.size
    prompt = _lognormal(rng, lengths.prompt_mean, lengths.prompt_cv, n, lengths.prompt_max)
    output = _lognormal(rng, lengths.output_mean, lengths.output_cv, n, lengths.output_max)
    label = shape if isinstance(shape, str) else "custom"
    burst_text = ", ".join(
        f"{b.factor:.1f}x at {b.start_s / 3600:.1f} h for {b.duration_s / 60:.0f} min"
        for b in bursts
    )
    return Workload(
        arrival,
        prompt,
        output,
        name=f"synthetic-{label}",
        notes=(
            f"synthetic '{label}' load: {hours:g} h diurnal, peak {peak_rps:g} req/s, trough {trough_ratio:.2f} of peak, "
            + (f"arrivals of its first {span_s:g} s only, " if until_s is not None else "")
            + f"prompt ~{lengths.prompt_mean:g}, output ~{lengths.output_mean:g} tokens, seed {seed}"
            + (f"; bursts {burst_text}" if bursts else ""),
        ),
    )
