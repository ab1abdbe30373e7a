"""What no string from a pull request may carry to a reader (``reconciler.text_safety``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.text_safety import UNSAFE_RUN, cut, describe, redacted_url, unsafe_in_value, visible


@given(st.text())
def test_visible_text_holds_no_control_or_invisible_character(text: str) -> None:
    shown = visible(text)
    assert UNSAFE_RUN.search(shown) is None
    assert "\n" not in shown and "\t" not in shown


@given(st.text(alphabet=st.characters(codec="ascii", min_codepoint=0x20, max_codepoint=0x7E)))
def test_visible_leaves_printable_text_as_it_is(text: str) -> None:
    assert visible(text) == text


def test_visible_writes_each_character_as_its_escape() -> None:
    assert visible("a\x1b[31mb\r\nc\u202ed\te\u200bf") == "a\\x1b[31mb\\r\\nc\\u202ed\\te\\u200bf"


def test_a_value_may_hold_tabs_and_line_feeds_but_no_other_control() -> None:
    assert unsafe_in_value("one\ttwo\nthree é 漢字 🙂") is None
    for char in ("\x00", "\x1b", "\r", "\x7f", "\x85", "\u061c", "\u200d", "\u2028", "\u202e"):
        assert unsafe_in_value(f"a{char}b") == char
    assert unsafe_in_value("\ufeffname") == "\ufeff"
    assert describe("\x1b") == "U+001B"


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_cut_keeps_text_that_fits_and_marks_a_cut_with_an_ellipsis(text: str, limit: int) -> None:
    shown = cut(text, limit)
    if len(text) <= limit:
        assert shown == text
    else:
        assert len(shown) == limit and shown.endswith("…") and text.startswith(shown[:-1])


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:secretpw@127.0.0.1:1", "http://user:***@127.0.0.1:1"),
        ("https://token@prom.example/x", "https://***@prom.example/x"),
        ("prod=http://a:b@c:9", "prod=http://a:***@c:9"),
        ("http://a:b@c@d:1/x?y=z@w", "http://a:***@d:1/x?y=***"),
        ("https://prom.example/?token=abc&org=7", "https://prom.example/?token=***&org=***"),
        ("http://h:9090/api?flag#top", "http://h:9090/api?flag#top"),
        ("a=http://h/?t=1 b=http://g/?u=2", "a=http://h/?t=*** b=http://g/?u=***"),
        ("http://h:9090/path@x", "http://h:9090/path@x"),
        ("http://[::1]:9090", "http://[::1]:9090"),
    ],
)
def test_a_url_is_shown_without_its_credentials(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
