"""Fuzz the loader with mutations of the repository's own files: whatever the bytes,
loading ends in a valid state or a ``ConfigError`` whose every issue has a line and
a column; never another exception, never unbounded memory or time.

The suite runs ``FUZZ_EXAMPLES`` examples (default 1,500, a few seconds). The full
run of 10,000 or more: ``HETEROSCALE_FUZZ_EXAMPLES=10000 python -m pytest
tests/desired/test_fuzz.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.desired.loader import load_from_source
from reconciler.desired.sources import SourceError
from reconciler.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("HETEROSCALE_FUZZ_EXAMPLES", "1500"))

# A one-S1 cluster the mutated policies refer to: small, so each example stays cheap.
SMALL_CLUSTER = b"""name: prod-east
gpu_types:
  h800: {memory_gib: 80, bf16_tflops: 989, memory_bandwidth_gbps: 3350}
  h20: {memory_gib: 96, bf16_tflops: 148, memory_bandwidth_gbps: 4000}
  l20: {memory_gib: 48, bf16_tflops: 119.5, memory_bandwidth_gbps: 864}
defaults: {gpus_per_node: 8}
s2:
  - name: pod-a
    s1:
      - name: mp-a1
        s0:
          - {name: "leaf-a1", defaults: {gpu_type: h800}, nodes: "h800-[1-2]"}
          - {name: "leaf-a2", defaults: {gpu_type: h20}, nodes: "h20-[1-2]"}
          - {name: "leaf-a3", defaults: {gpu_type: l20}, nodes: "l20-[1-2]"}
"""
SMALL_POLICY = (REPO / "policies/svc-a.yaml").read_bytes()
SEEDS = {
    path: (REPO / path).read_bytes()
    for path in sorted(
        str(p.relative_to(REPO))
        for d in ("policies", "clusters")
        for p in (REPO / d).glob("*.yaml")
    )
}
TEMPLATES = {str(p.relative_to(REPO)): p.read_bytes() for p in (REPO / "templates").glob("*.yaml")}


@dataclass
class MemorySource:
    """Files held in memory: the loader's Source protocol without a disk."""

    files: dict[str, bytes]
    label: str = "fuzz"
    _unused: list[str] = field(default_factory=list)

    def list_yaml(self, directory: str) -> list[str]:
        return sorted(p for p in self.files if p.startswith(directory + "/"))

    def read(self, path: str) -> bytes:
        if path not in self.files:
            raise SourceError(path, "no such file")
        return self.files[path]

    def exists(self, path: str) -> bool:
        return path in self.files


def _insert(data: bytes, at: float, piece: bytes) -> bytes:
    cut = int(at * len(data))
    return data[:cut] + piece + data[cut:]


CONTROL = [bytes([c]) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)] + [
    chr(c).encode() for c in (0x80, 0x9F, 0xFFFE, 0xFFFF)
]
LAUGHS = (
    b"\n".join(
        [b'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [
            f"l{i}: &l{i} [".encode() + b",".join([f"*l{i - 1}".encode()] * 9) + b"]"
            for i in range(1, 10)
        ]
    )
    + b"\n"
)
PIECES = st.one_of(
    st.sampled_from(CONTROL),
    st.integers(1, 3000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b"{" * n),
    st.integers(1, 3000).map(lambda n: b"- " * n),
    st.sampled_from(
        [
            b"]",
            b"}",
            b"&a ",
            b"*a",
            b"&a [1, 2]",
            b" *a ",
            b"<<: *a\n",
            b"? ",
            b"!!int ",
            b"!!python/object ",
            b"%TAG ! x\n",
            b"---\n",
            b"...\n",
            b"&",
            b"*",
            LAUGHS,
        ]
    ),
    st.integers(1, 6000).map(lambda n: b"9" * n),
    st.sampled_from(
        [
            b"1e18",
            b"1e16",
            b"-1e400",
            b".nan",
            b".inf",
            b"0x" + b"f" * 5000,
            b"2001-02-30",
            b"1_000_000_000_000",
        ]
    ),
    st.sampled_from(
        [
            b"[/red]",
            b"[bold",
            b"[red]x[/]",
            b":smile:",
            b"`",
            b"```",
            b"</details>",
            b"@org/admins",
            b"![x](https://example.invalid/p.png)",
        ]
    ),
    st.binary(min_size=1, max_size=8),
    st.text(max_size=8).map(str.encode),
)
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), PIECES),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
    st.tuples(st.just("empty"), st.just(0.0), st.just(b"")),
)


def mutate(data: bytes, mutations: list[tuple[str, float, object]]) -> bytes:
    for kind, at, arg in mutations:
        if kind == "flip" and data:
            i = min(int(at * len(data)), len(data) - 1)
            data = data[:i] + bytes([int(arg)]) + data[i + 1 :]  # type: ignore[call-overload]
        elif kind == "insert":
            data = _insert(data, at, arg)  # type: ignore[arg-type]
        elif kind == "truncate":
            data = data[: int(at * len(data))]
        elif kind == "empty":
            data = b""
    return data


def load_mutated(path: str, raw: bytes) -> None:
    files = dict(TEMPLATES)
    if path.startswith("policies/"):
        files |= {"clusters/prod-east.yaml": SMALL_CLUSTER, path: raw}
    else:
        files |= {"policies/svc-a.yaml": SMALL_POLICY, path: raw}
    try:
        load_from_source(MemorySource(files))
    except ConfigError as exc:
        unlocated = [str(i) for i in exc.issues if i.line is None or i.column is None]
        assert not unlocated, unlocated


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(st.sampled_from(sorted(SEEDS)), st.lists(MUTATION, min_size=1, max_size=4))
def test_the_loader_survives_mutated_files(
    path: str, mutations: list[tuple[str, float, object]]
) -> None:
    load_mutated(path, mutate(SEEDS[path], mutations))


def test_the_unmutated_seeds_load() -> None:
    for path, raw in SEEDS.items():
        load_mutated(path, raw)
