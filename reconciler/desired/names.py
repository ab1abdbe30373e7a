"""Compact name ranges, so a 20,000-GPU fleet stays readable:
``h20-[0001-0512]`` is 512 names, zero-padded to the width of the first bound;
``leaf-[1-4,7]`` is five names. One bracket per name.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BRACKET_RE = re.compile(r"^(?P<prefix>[^\[\]]*)\[(?P<body>[^\[\]]+)\](?P<suffix>[^\[\]]*)$")
_PART_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
MAX_RANGE = 100_000


@lru_cache(maxsize=4096)
def expand_range(pattern: str) -> tuple[str, ...]:
    """Expand ``prefix[a-b,c]suffix``; a name without brackets is itself. Raises
    ValueError on a malformed or descending range."""
    if "[" not in pattern and "]" not in pattern:
        return (pattern,)
    match = _BRACKET_RE.match(pattern)
    if not match:
        raise ValueError(f"malformed name range {pattern!r} (expected e.g. 'gpu-[001-016]')")
    names: list[str] = []
    for part in match.group("body").split(","):
        part_match = _PART_RE.match(part)
        if not part_match:
            raise ValueError(f"malformed range part {part!r} in {pattern!r}")
        first, last = part_match.group(1), part_match.group(2) or part_match.group(1)
        start, stop = int(first), int(last)
        if stop < start:
            raise ValueError(f"descending range {part!r} in {pattern!r}")
        if stop - start + 1 + len(names) > MAX_RANGE:
            raise ValueError(f"range {pattern!r} expands to more than {MAX_RANGE} names")
        width = len(first) if first.startswith("0") else 0
        names += [
            f"{match.group('prefix')}{i:0{width}d}{match.group('suffix')}"
            for i in range(start, stop + 1)
        ]
    return tuple(names)
