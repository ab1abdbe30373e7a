"""P/D ratios as people write them: ``"1:3"`` is one prefill instance per three decode
instances. Internally a ratio is the float ``prefill / decode`` (``"1:3"`` -> 0.333...).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

MIN_RATIO = 1e-3
MAX_RATIO = 1e3
_RATIO_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")


def parse_ratio(value: Any) -> float:
    """``"1:3"`` -> 0.333..., ``"3:1"`` -> 3.0, ``0.5`` -> 0.5. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a P/D ratio is 'P:D' (e.g. '1:3') or a positive number")
    # The value itself is not quoted here: the loader adds it to the message, cut to a
    # bounded length (a hostile value may be megabytes).
    if isinstance(value, int | float):
        ratio = float(value)
    elif isinstance(value, str):
        match = _RATIO_RE.match(value)
        if match:
            prefill, decode = float(match.group(1)), float(match.group(2))
            if decode == 0:
                raise ValueError("a P/D ratio needs decode instances (D > 0)")
            ratio = prefill / decode
        else:
            try:
                ratio = float(value)
            except ValueError:
                raise ValueError("a P/D ratio is 'P:D' (e.g. '1:3') or a number") from None
    else:
        raise ValueError("a P/D ratio is 'P:D' (e.g. '1:3') or a positive number")
    if not ratio > 0 or ratio == float("inf"):
        raise ValueError("a P/D ratio must be positive and finite")
    if not MIN_RATIO <= ratio <= MAX_RATIO:
        # No service runs a thousand instances of one role per instance of the other.
        raise ValueError("a P/D ratio must lie between 1:1000 and 1000:1")
    return ratio


@lru_cache(maxsize=4096)  # messages format the same few ratios every cycle
def format_ratio(ratio: float) -> str:
    """0.333 -> '1:3', 2.0 -> '2:1', 0.4 -> '2:5' (small integers where exact enough)."""
    from fractions import Fraction

    frac = Fraction(ratio).limit_denominator(20)
    if abs(float(frac) - ratio) <= 1e-3 * ratio:
        return f"{frac.numerator}:{frac.denominator}"
    return f"{ratio:.3g}:1"


PDRatio = Annotated[
    float,
    BeforeValidator(parse_ratio),
    PlainSerializer(format_ratio, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*:\s*\d+(\.\d+)?\s*$"},
                {"type": "number", "minimum": MIN_RATIO, "maximum": MAX_RATIO},
            ],
            "description": "prefill:decode instances, e.g. '1:3', or prefill/decode as a number; "
            "between 1:1000 and 1000:1",
        }
    ),
]
