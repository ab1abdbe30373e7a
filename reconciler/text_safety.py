"""Characters that change what a reader sees without being seen, in one place.

Desired state comes from pull requests anyone may write. A string that carries a
terminal escape (``ESC[2J`` clears the screen, ``ESC[31m`` colours a forged
``APPROVED``), a carriage return or line break (a fake line after the real one), a
bidirectional override (``U+202E`` shows ``exe.gnp`` as ``png.exe``) or a zero-width
character (two names that look the same) must never reach a terminal or a review as
such. Three uses:

- the loader refuses such characters in every parsed key and value
  (``unsafe_in_value``), so no name, label or message built from the desired state
  carries them; YAML's escapes (``"\\e"``, ``"\\x1b"``, ``"\\u202e"``) write them in a
  file whose text is plain;
- plain-text output shows any that still arrive (a file name, a Git revision label,
  a message quoting one) as visible escapes (``visible``);
- the markdown review flattens them to spaces (``UNSAFE_RUN``, in
  ``reconciler.review.report``).

Such a string may also be long (10 KB in a Lease's holder, a label, a message):
what quotes it cuts it to a bounded length (``cut``), so it cannot flood a report.
Text a server answered with (an error message, a body) is both (``quoted``).

A URL given on the command line may carry credentials (``http://user:pw@host``):
wherever one is shown (a message, a log line, a status) it is shown without them
(``redacted_url``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# C0 controls (tab and line feed are checked apart: block scalars hold them), DEL and
# the C1 controls, the line and paragraph separators, the bidirectional marks,
# embeddings, overrides and isolates, and the zero-width and invisible formatting
# characters (zero-width space, joiners, word joiner, invisible operators, the BOM).
_FORMATTING = "\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
UNSAFE_RUN = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_FORMATTING}]+")
_UNSAFE_IN_VALUE = re.compile(f"[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f{_FORMATTING}]")
_UNSAFE_ON_A_LINE = re.compile(f"[\\x00-\\x1f\\x7f-\\x9f{_FORMATTING}]")


def unsafe_in_value(text: str) -> str | None:
    """The first character of ``text`` no configuration value may hold, or None. Tab
    and line feed pass (a block scalar, a script in a template's arguments)."""
    found = _UNSAFE_IN_VALUE.search(text)
    return found.group() if found is not None else None


def describe(char: str) -> str:
    """``U+001B`` for one character: how errors name it without printing it."""
    return f"U+{ord(char):04X}"


def visible(text: str) -> str:
    """``text`` for one line of a terminal: each unsafe character, tab and line feed
    included, shown as its Python escape (``\\x1b``, ``\\n``, ``\\u202e``), so it can
    neither act nor hide."""
    return _UNSAFE_ON_A_LINE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


QUOTED_CHARS = 300


def quoted(text: str, limit: int = QUOTED_CHARS) -> str:
    """Text from a server's answer (an error message quoting a label value, a proxy's
    page) as it may appear in a log line, an exception or a status: its first
    ``limit`` characters, every control or invisible one shown escaped."""
    return visible(cut(text, limit))


def listed(values: Sequence[str], show: Callable[[str], str], count: int = 8) -> str:
    """The first ``count`` of ``values``, each as ``show`` gives it, comma-separated,
    and how many more: a file's names or columns as an error lists them (a file may
    hold 100,000)."""
    shown = ", ".join(show(value) for value in values[:count])
    more = len(values) - count
    return shown + (f", ... {more:,} more" if more > 0 else "")


# scheme://userinfo@ : the userinfo runs to the authority's last "@" (as urlsplit reads it).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s]*)@")


# A URL's query (after ``?``, up to a fragment or white space): proxies in front of
# Prometheus take tokens there too (``?token=...``, ``?access_token=...``).
_QUERY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s?#]*\?)([^\s#]*)")


def redacted_url(url: str) -> str:
    """``url`` as it may be shown: a password in it replaced by ``***``
    (``http://user:***@host:9090``), a user part without one (which may itself be a
    token) by ``***`` alone, and every value of its query by ``***`` (``?token=***``;
    the names stay, to tell what was given). Read as text, so a URL no parser accepts
    is redacted too, and so is every URL in a longer text (``CLUSTER=URL``, a message
    quoting one)."""

    def hidden(found: re.Match[str]) -> str:
        user, sep, _password = found.group(2).partition(":")
        return f"{found.group(1)}{user + ':***' if sep else '***'}@"

    def query_hidden(found: re.Match[str]) -> str:
        pairs = (p.partition("=") for p in found.group(2).split("&"))
        return found.group(1) + "&".join(name + ("=***" if sep else "") for name, sep, _ in pairs)

    return _QUERY.sub(query_hidden, _USERINFO.sub(hidden, url))
