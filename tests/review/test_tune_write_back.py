"""``tune --write``'s edit of a service file (``reconciler.review.tune.write_back``):
only the values change, the comments beside them are replaced by one note, a second
identical write changes nothing, and the file's layout (flow or block style, line
endings, BOM, final newline, indentation) is kept. A file it cannot edit safely is
refused, located, never corrupted."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from reconciler.desired import roundtrip
from reconciler.errors import ConfigError
from reconciler.review.tune import ValueChange, apply_changes, write_back

NOTE = "heteroscale tune: verified on day (99.0% within both SLOs, 12.0 GPU-hours)"
FILE = "policies/chat.yaml"
DECODE = ValueChange(("scaling", "target_per_instance"), "1200", "1300", 1300)
PREFILL = ValueChange(("scaling", "prefill_target_per_instance"), "20000", "21000", 21000)
RATIO = ValueChange(("pd_ratio", "target"), "3:4", "1:1", "1:1")


def parsed(text: str) -> Any:
    return YAML(typ="safe", pure=True).load(io.StringIO(text))


@pytest.fixture(params=[False, True], ids=["C parser", "pure parser"])
def either_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The editor with the C parser (where ruamel.yaml.clib is installed) or the pure
    one (where it is not): their marks and styles differ."""
    pure: bool = request.param
    monkeypatch.setattr(roundtrip, "_parser", lambda: YAML(typ="safe", pure=pure))


def written(text: str, *changes: ValueChange) -> str:
    return write_back(text, changes or (DECODE, PREFILL), NOTE, path=FILE)


# --------------------------------------------------------------------------- flow style


def test_a_flow_mapping_on_one_line_keeps_its_style_and_loses_its_stale_comment() -> None:
    before = (
        "name: chat\n"
        "# 1200 and 20000 were set by hand\n"
        "scaling: {target_per_instance: 1200, prefill_target_per_instance: 20000}  # by hand\n"
        "affinity: s2\n"
    )
    assert written(before) == (
        "name: chat\n"
        f"# {NOTE}\n"
        "scaling: {target_per_instance: 1300, prefill_target_per_instance: 21000}\n"
        "affinity: s2\n"
    )


def test_a_flow_mapping_over_lines_keeps_its_layout_and_loses_its_stale_comments() -> None:
    before = (
        "name: chat\n"
        "scaling: {\n"
        "  metric: decode_tps,   # what is scaled on\n"
        "  # decode, by hand\n"
        "  target_per_instance: 1200,   # 1200 was a guess\n"
        "  # prefill floor, by hand\n"
        "  prefill_target_per_instance: 20000,\n"
        "  tolerance: 0.1,   # the band\n"
        "}\n"
    )
    assert written(before) == (
        "name: chat\n"
        "scaling: {\n"
        "  metric: decode_tps,   # what is scaled on\n"
        f"  # {NOTE}\n"
        "  target_per_instance: 1300,\n"
        f"  # {NOTE}\n"
        "  prefill_target_per_instance: 21000,\n"
        "  tolerance: 0.1,   # the band\n"
        "}\n"
    )


def test_a_missing_key_goes_into_a_flow_mapping_after_its_sibling() -> None:
    before = "scaling: {metric: decode_tps, target_per_instance: 1200, tolerance: 0.1}\n"
    insert = ValueChange(("scaling", "prefill_target_per_instance"), "unset", "9000", 9000)
    assert apply_changes(before, [insert], path=FILE) == (
        "scaling: {metric: decode_tps, target_per_instance: 1200, "
        "prefill_target_per_instance: 9000, tolerance: 0.1}\n"
    )


def test_a_comment_on_the_keys_line_goes_when_the_value_is_on_the_next() -> None:
    before = "scaling:\n  target_per_instance:   # by hand\n    1200\n  tolerance: 0.1\n"
    assert written(before, DECODE) == (
        f"scaling:\n  # {NOTE}\n  target_per_instance:\n    1300\n  tolerance: 0.1\n"
    )


# --------------------------------------------------------------------------- idempotence


SAMPLES = {
    "block": (
        "pd_ratio:\n"
        '  target: "3:4"   # why 3:4\n'
        "scaling:\n"
        "  metric: decode_tps\n"
        "  # decode, by hand\n"
        "  target_per_instance: 1200   # by hand\n"
        "  prefill_target_per_instance: 20000\n"
    ),
    "flow on one line": (
        'pd_ratio: {target: "3:4", min: "1:3"}   # why 3:4\n'
        "scaling: {metric: decode_tps, target_per_instance: 1200, "
        "prefill_target_per_instance: 20000}   # by hand\n"
    ),
    "flow over lines": (
        'pd_ratio: {target: "3:4"}\n'
        "scaling: {\n"
        "  # decode, by hand\n"
        "  target_per_instance: 1200,  # by hand\n"
        "  prefill_target_per_instance: 20000  # by hand\n"
        "}\n"
    ),
}


@pytest.mark.parametrize("before", SAMPLES.values(), ids=SAMPLES.keys())
def test_writing_the_same_values_twice_leaves_the_file_as_the_first_write_did(
    before: str,
) -> None:
    once = written(before, RATIO, DECODE, PREFILL)
    assert written(once, RATIO, DECODE, PREFILL) == once
    assert once.count(NOTE) == written(once, RATIO, DECODE, PREFILL).count(NOTE)
    assert "by hand" not in once and "why 3:4" not in once


# --------------------------------------------------------------------------- layout


def test_crlf_line_endings_a_bom_and_no_final_newline_are_kept() -> None:
    before = (
        "\ufeffname: chat\r\n"
        "scaling:\r\n"
        "  # decode, by hand\r\n"
        "  target_per_instance: 1200   # by hand\r\n"
        "  tolerance: 0.1"
    )
    assert written(before, DECODE) == (
        "\ufeffname: chat\r\n"
        "scaling:\r\n"
        f"  # {NOTE}\r\n"
        "  target_per_instance: 1300\r\n"
        "  tolerance: 0.1"
    )


def test_odd_indentation_and_tabs_outside_the_values_are_kept() -> None:
    before = (
        "name:\tchat\n"
        "scaling:\n"
        "     metric: decode_tps\n"
        "     target_per_instance:\t1200\t# by hand\n"
        "     latency_tiers:\n"
        "     -   {metric: tbt, above: 1.0, step_percent: 10}\n"
    )
    assert written(before, DECODE) == (
        "name:\tchat\n"
        "scaling:\n"
        "     metric: decode_tps\n"
        f"     # {NOTE}\n"
        "     target_per_instance:\t1300\n"
        "     latency_tiers:\n"
        "     -   {metric: tbt, above: 1.0, step_percent: 10}\n"
    )


def test_an_empty_null_value_is_written_one_space_after_its_colon(
    either_parser: None,
) -> None:
    # The pure parser marks an empty value at the next token (the next line's key),
    # the C one just after the colon (`key:21000` would be one plain key).
    before = (
        "scaling:\n  target_per_instance: 1200\n  prefill_target_per_instance:\n  tolerance: 0.1\n"
    )
    assert written(before, PREFILL) == (
        "scaling:\n"
        "  target_per_instance: 1200\n"
        f"  # {NOTE}\n"
        "  prefill_target_per_instance: 21000\n"
        "  tolerance: 0.1\n"
    )


def test_an_empty_null_value_before_a_comment_or_in_a_flow_mapping_is_written(
    either_parser: None,
) -> None:
    before = "scaling:\n  prefill_target_per_instance:  # by hand\n  tolerance: 0.1\n"
    assert apply_changes(before, [PREFILL], path=FILE) == (
        "scaling:\n  prefill_target_per_instance: 21000  # by hand\n  tolerance: 0.1\n"
    )
    before = "scaling: {prefill_target_per_instance: , tolerance: 0.1}\n"
    assert apply_changes(before, [PREFILL], path=FILE) == (
        "scaling: {prefill_target_per_instance: 21000 , tolerance: 0.1}\n"
    )


@pytest.mark.parametrize(
    ("old", "new"),
    [("3:4", "1:1"), ("'3:4'", "'1:1'"), ('"3:4"', '"1:1"')],
    ids=["plain", "single-quoted", "double-quoted"],
)
def test_a_string_keeps_the_old_values_quoting(either_parser: None, old: str, new: str) -> None:
    before = f"pd_ratio:\n  target: {old}\n"
    assert apply_changes(before, [RATIO], path=FILE) == f"pd_ratio:\n  target: {new}\n"


def test_a_plain_string_that_would_read_as_another_value_is_double_quoted(
    either_parser: None,
) -> None:
    change = ValueChange(("scaling", "metric"), "decode_tps", "true", "true")
    before = "scaling:\n  metric: decode_tps\n"
    assert apply_changes(before, [change], path=FILE) == 'scaling:\n  metric: "true"\n'


def test_a_number_replacing_a_quoted_one_is_written_unquoted(either_parser: None) -> None:
    # The models take a number written as one only ("a number is written unquoted"):
    # keeping the quotes would keep the file invalid.
    before = "scaling:\n  target_per_instance: '1200'\n"
    assert apply_changes(before, [DECODE], path=FILE) == "scaling:\n  target_per_instance: 1300\n"


def test_added_lines_end_with_the_files_newline_not_a_unicode_line_separator() -> None:
    # U+2028 breaks a line for ruamel (YAML 1.1) but not for YAML 1.2 readers: a note
    # ended by it would comment out the key after it.
    before = "description: 'first\u2028second'\nscaling:\n  target_per_instance: 1200  # by hand\n"
    assert written(before, DECODE) == (
        f"description: 'first\u2028second'\nscaling:\n  # {NOTE}\n  target_per_instance: 1300\n"
    )


def test_a_quoted_strings_line_that_starts_with_a_hash_is_not_a_comment() -> None:
    before = 'scaling:\n  metric_note: "a\n  # not a comment"\n  target_per_instance: 1200\n'
    assert written(before, DECODE) == (
        "scaling:\n"
        '  metric_note: "a\n'
        '  # not a comment"\n'
        f"  # {NOTE}\n"
        "  target_per_instance: 1300\n"
    )


# --------------------------------------------------------------------------- refusals


def refusal(before: str, *changes: ValueChange) -> str:
    with pytest.raises(ConfigError) as raised:
        written(before, *changes)
    (issue,) = raised.value.issues
    assert issue.file == FILE
    return str(issue)


def test_a_value_shared_through_an_anchor_is_refused_at_the_anchor() -> None:
    before = "name: chat\nhand: &hand {target_per_instance: 1200}\nscaling: *hand\n"
    message = refusal(before, DECODE)
    assert message.startswith(f"{FILE}:2:")
    assert "scaling.target_per_instance" in message and "&hand" in message


def test_a_value_from_a_merge_key_is_refused_at_the_merge() -> None:
    before = "hand: &hand\n  target_per_instance: 1200\nscaling:\n  <<: *hand\n  tolerance: 0.1\n"
    message = refusal(before, DECODE)
    assert message.startswith(f"{FILE}:4:")
    assert "<<" in message


def test_anchors_elsewhere_in_the_file_do_not_stop_the_edit() -> None:
    before = (
        "tiers: &tiers [{metric: tbt, above: 1.0, step_percent: 10}]\n"
        "scaling:\n"
        "  target_per_instance: 1200\n"
        "  latency_tiers: *tiers\n"
    )
    assert written(before, DECODE) == (
        "tiers: &tiers [{metric: tbt, above: 1.0, step_percent: 10}]\n"
        "scaling:\n"
        f"  # {NOTE}\n"
        "  target_per_instance: 1300\n"
        "  latency_tiers: *tiers\n"
    )


def test_a_file_of_several_documents_is_refused_at_the_second() -> None:
    before = (
        "name: chat\n"
        "scaling:\n"
        "  target_per_instance: 1200\n"
        "---\n"
        "name: summarize\n"
        "scaling:\n"
        "  target_per_instance: 1200\n"
    )
    message = refusal(before, DECODE)
    assert message.startswith(f"{FILE}:4:")
    assert "document" in message


def test_a_character_yaml_does_not_allow_is_refused_where_it_is(either_parser: None) -> None:
    before = "name: ünïcödé\nscaling:\n  target_per_instance: 12\x0700\n"
    message = refusal(before, DECODE)
    assert message.startswith(f"{FILE}:3:26:")
    assert "#x0007" in message


# --------------------------------------------------------------------------- properties


NEWLINES = st.sampled_from(["\n", "\r\n"])
STYLES = st.sampled_from(["block", "flow", "flow over lines"])
TARGETS = st.integers(min_value=1, max_value=600).map(lambda k: k * 50)


def policy_text(
    style: str,
    newline: str,
    bom: bool,
    final_newline: bool,
    indent: int,
    comments: bool,
    has_prefill: bool,
) -> str:
    """A small service file in one of the layouts tune meets (an older one without
    ``prefill_target_per_instance`` unless ``has_prefill``)."""
    pad = " " * indent
    by_hand = "   # by hand" if comments else ""
    prefill = "prefill_target_per_instance: 20000" if has_prefill else ""
    if style == "block":
        lines = [
            "name: chat",
            "scaling:",
            f"{pad}metric: decode_tps",
            *([f"{pad}# decode, by hand"] if comments else []),
            f"{pad}target_per_instance: 1200{by_hand}",
            *([f"{pad}{prefill}{by_hand}"] if has_prefill else []),
            f"{pad}tolerance: 0.1",
            'pd_ratio: {target: "3:4", min: "1:3"}',
        ]
    elif style == "flow":
        lines = [
            "name: chat",
            *(["# the targets, by hand"] if comments else []),
            "scaling: {metric: decode_tps, target_per_instance: 1200, "
            f"{prefill + ', ' if has_prefill else ''}tolerance: 0.1}}{by_hand}",
            'pd_ratio: {target: "3:4", min: "1:3"}',
        ]
    else:
        lines = [
            "name: chat",
            "scaling: {",
            f"{pad}metric: decode_tps,",
            *([f"{pad}# decode, by hand"] if comments else []),
            f"{pad}target_per_instance: 1200,{by_hand}",
            *([f"{pad}{prefill},{by_hand}"] if has_prefill else []),
            f"{pad}tolerance: 0.1",
            "}",
            'pd_ratio: {target: "3:4", min: "1:3"}',
        ]
    return ("\ufeff" if bom else "") + newline.join(lines) + (newline if final_newline else "")


@settings(max_examples=60, deadline=None)
@given(
    style=STYLES,
    newline=NEWLINES,
    bom=st.booleans(),
    final_newline=st.booleans(),
    indent=st.integers(min_value=1, max_value=5),
    comments=st.booleans(),
    has_prefill=st.booleans(),
    decode=TARGETS,
    prefill=TARGETS,
    ratio=st.sampled_from(["1:1", "2:3", "3:4", "5:2"]),
)
def test_a_write_changes_exactly_the_values_and_keeps_the_files_layout(
    style: str,
    newline: str,
    bom: bool,
    final_newline: bool,
    indent: int,
    comments: bool,
    has_prefill: bool,
    decode: int,
    prefill: int,
    ratio: str,
) -> None:
    before = policy_text(style, newline, bom, final_newline, indent, comments, has_prefill)
    changes = (
        ValueChange(("scaling", "target_per_instance"), "1200", str(decode), decode),
        ValueChange(("scaling", "prefill_target_per_instance"), "20000", str(prefill), prefill),
        ValueChange(("pd_ratio", "target"), "3:4", ratio, ratio),
    )
    after = write_back(before, changes, NOTE, path=FILE)
    expected = parsed(before)
    expected["scaling"].update(target_per_instance=decode, prefill_target_per_instance=prefill)
    expected["pd_ratio"]["target"] = ratio
    assert parsed(after) == expected
    # The layout: line endings, BOM, final newline; nothing of the old comments.
    assert after.startswith("\ufeff") == bom
    assert after.endswith(newline) == final_newline
    assert "\n" not in after.replace(newline, "") and "\r" not in after.replace(newline, "")
    assert "by hand" not in after
    # Idempotent, and the values alone rewrite nothing when they are already there.
    assert write_back(after, changes, NOTE, path=FILE) == after
    assert apply_changes(after, changes, path=FILE) == after
