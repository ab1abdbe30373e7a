"""JSON that reads one way only: an object that names a key twice is refused.

``json.loads`` keeps the last of two equal keys, while another reader (a reviewer, a
diff tool, an older reconciler) may take the first: what one reads and what another
acts on could differ. A saved plan and the durable state are both read back from
places others can write, so both are read through :func:`loads_unique`.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """An object in the document names ``key`` twice."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(f"key {key!r} appears twice in one object")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: the object, or ``DuplicateKeyError``."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(key)
        obj[key] = value
    return obj


def loads_unique(text: str | bytes, **options: Any) -> Any:
    """``json.loads(text, **options)``, refusing any object with a key twice
    (``DuplicateKeyError``, a ``ValueError``; the others ``json.loads`` raises)."""
    return json.loads(text, object_pairs_hook=unique_keys, **options)
