"""Edit desired-state YAML without disturbing it: comments, key order, quoting and
layout survive a load/dump, so a tool-written change reviews as a one-line diff.

Used by ``heteroscale tune`` to write recommended values back into a service file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def load_roundtrip(text: str) -> Any:
    """Parse keeping comments and order (a CommentedMap for a mapping document)."""
    return _yaml().load(io.StringIO(text))


def dump_roundtrip(document: Any) -> str:
    out = io.StringIO()
    _yaml().dump(document, out)
    return out.getvalue()


def set_value(text: str, key_path: Sequence[str | int], value: Any) -> str:
    """Return ``text`` with the value at ``key_path`` replaced (the key must exist, or
    its parent mapping must), everything else byte-for-byte where ruamel allows."""
    document = load_roundtrip(text)
    node: Any = document
    for part in key_path[:-1]:
        node = node[part]
    if not isinstance(node, CommentedMap | CommentedSeq):
        raise KeyError(f"{'.'.join(map(str, key_path[:-1]))} is not a mapping or list")
    node[key_path[-1]] = value
    return dump_roundtrip(document)
