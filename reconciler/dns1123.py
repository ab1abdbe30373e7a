"""Kubernetes object names as the API server accepts them (DNS-1123), checked before
a name becomes part of an API URL or is trusted from a file; label keys and values
likewise, checked where the desired state declares them.

A name is a path segment of the request URL (``/api/v1/namespaces/NS/pods/NAME``):
one that holds ``/`` or ``..`` would address another object than the one named
(``quote`` keeps ``/``), so every URL builder refuses a name that is not valid.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from reconciler.errors import PermanentError

MAX_LABEL = 63
MAX_SUBDOMAIN = 253

_LABEL_TEXT = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN_TEXT = rf"{_LABEL_TEXT}(\.{_LABEL_TEXT})*"
# The name part of a label key, and a label value (which may also be empty).
_QUALIFIED_TEXT = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL = re.compile(_LABEL_TEXT)
_SUBDOMAIN = re.compile(_SUBDOMAIN_TEXT)
_QUALIFIED = re.compile(_QUALIFIED_TEXT)
# A label value's rule as a whole-string pattern, its length aside, for the JSON
# Schema (editors).
LABEL_VALUE_PATTERN = rf"^({_QUALIFIED_TEXT})?$"


class InvalidObjectName(PermanentError, ValueError):
    """A namespace or object name that Kubernetes would not accept (and that could
    address another object in an API URL)."""

    def __init__(self, what: str, value: object, problem: str):
        self.what = what
        self.value = value
        self.problem = problem
        super().__init__(f"{what} {value!r} is not a valid Kubernetes name: {problem}")


def label_problem(value: object) -> str | None:
    """Why ``value`` is not a DNS-1123 label (a namespace), or None when it is."""
    return _name_problem(
        value,
        _LABEL,
        MAX_LABEL,
        "lower-case letters, digits and '-' only, a letter or digit at both ends",
    )


def subdomain_problem(value: object) -> str | None:
    """Why ``value`` is not a DNS-1123 subdomain (an object name), or None when it is."""
    return _name_problem(
        value,
        _SUBDOMAIN,
        MAX_SUBDOMAIN,
        "lower-case letters, digits, '-' and '.' only, each dot-separated part "
        "starting and ending with a letter or digit",
    )


def label_key_problem(value: object) -> str | None:
    """Why ``value`` is not a Kubernetes label key, or None when it is: an optional
    prefix that is a DNS-1123 subdomain and a '/', then a name as a label value holds
    it (``label_value_problem``) but not empty (the API server's rule)."""
    if not isinstance(value, str):
        return "not a string"
    parts = value.split("/")
    if len(parts) > 2:
        return "at most one '/', between a DNS prefix and the name"
    if len(parts) == 2:
        problem = "empty" if not parts[0] else subdomain_problem(parts[0])
        if problem is not None:
            return f"prefix {parts[0]!r}: {problem}"
    name = parts[-1]
    problem = "empty" if not name else label_value_problem(name)
    return None if problem is None else f"name {name!r}: {problem}"


def label_value_problem(value: object) -> str | None:
    """Why ``value`` is not a Kubernetes label value, or None when it is (the empty
    value is one)."""
    if value == "":
        return None
    return _name_problem(
        value,
        _QUALIFIED,
        MAX_LABEL,
        "letters, digits, '-', '_' and '.' only, a letter or digit at both ends",
    )


def _name_problem(value: object, pattern: re.Pattern[str], limit: int, rule: str) -> str | None:
    if not isinstance(value, str):
        return "not a string"
    if len(value) > limit:
        return f"{len(value)} characters, over {limit}"
    return None if pattern.fullmatch(value) else rule


def namespace_segment(namespace: str) -> str:
    """``namespace`` as a URL path segment; raises ``InvalidObjectName`` unless it is a
    DNS-1123 label."""
    problem = label_problem(namespace)
    if problem is not None:
        raise InvalidObjectName("namespace", namespace, problem)
    return quote(namespace, safe="")  # a no-op on a valid name; kept as a backstop


def name_segment(name: str, kind: str = "object") -> str:
    """``name`` as a URL path segment; raises ``InvalidObjectName`` unless it is a
    DNS-1123 subdomain (which excludes ``/``, ``..`` and anything to encode)."""
    problem = subdomain_problem(name)
    if problem is not None:
        raise InvalidObjectName(f"{kind} name", name, problem)
    return quote(name, safe="")
