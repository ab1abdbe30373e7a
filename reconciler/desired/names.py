"""Compact name ranges, so a 20,000-GPU fleet stays readable:
``h20-[0001-0512]`` is 512 names, zero-padded to the width of the first bound;
``leaf-[1-4,7]`` is five names. One bracket per name.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BRACKET_RE = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<body>[^\[\]]+)\](?P<suffix>[^\[\]]*)$")
# At most nine digits per bound: int() of a longer one could hit Python's digit limit.
_PART_RE = re.compile(r"^\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?$")
MAX_RANGE = 100_000
_CACHED_UP_TO = 4_096  # bigger expansions are not kept: the cache must stay small


def _parts(pattern: str) -> tuple[str, str, list[tuple[str, int, int]]] | None:
    """Prefix, suffix and (first text, start, stop) per part; None without brackets.
    Raises ValueError on a malformed or descending range."""
    if "[" not in pattern and "]" not in pattern:
        return None
    match = _BRACKET_RE.match(pattern)
    if not match:
        raise ValueError(f"malformed name range {pattern!r} (expected e.g. 'gpu-[001-016]')")
    parts: list[tuple[str, int, int]] = []
    for part in match.group("body").split(","):
        part_match = _PART_RE.match(part)
        if not part_match:
            raise ValueError(f"malformed range part {part!r} in {pattern!r}")
        first, last = part_match.group(1), part_match.group(2) or part_match.group(1)
        start, stop = int(first), int(last)
        if stop < start:
            raise ValueError(f"descending range {part!r} in {pattern!r}")
        parts.append((first, start, stop))
    return match.group("prefix"), match.group("suffix"), parts


def range_size(pattern: str) -> int:
    """How many names ``pattern`` expands to, without expanding it. Raises ValueError
    like ``expand_range``."""
    parsed = _parts(pattern)
    return 1 if parsed is None else sum(stop - start + 1 for _first, start, stop in parsed[2])


def expand_range(pattern: str) -> tuple[str, ...]:
    """Expand ``prefix[a-b,c]suffix``; a name without brackets is itself. Raises
    ValueError on a malformed or descending range, or one over ``MAX_RANGE`` names."""
    size = range_size(pattern)
    if size > MAX_RANGE:
        raise ValueError(f"range {pattern!r} expands to more than {MAX_RANGE} names")
    return _expand_cached(pattern) if size <= _CACHED_UP_TO else _expand(pattern)


@lru_cache(maxsize=1024)
def _expand_cached(pattern: str) -> tuple[str, ...]:
    return _expand(pattern)


def _expand(pattern: str) -> tuple[str, ...]:
    parsed = _parts(pattern)
    if parsed is None:
        return (pattern,)
    prefix, suffix, parts = parsed
    names: list[str] = []
    for first, start, stop in parts:
        width = len(first) if first.startswith("0") else 0
        names += [f"{prefix}{i:0{width}d}{suffix}" for i in range(start, stop + 1)]
    return tuple(names)
