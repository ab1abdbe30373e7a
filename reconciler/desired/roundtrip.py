"""Edit desired-state YAML as text, so a tool-written change reviews as a one-line diff.

Used by ``heteroscale tune`` to write recommended values back into a service file. A
value is replaced where it is written (the characters the parser's marks span), and a
missing key is added beside its sibling, so everything else stays byte for byte:
comments, key order, quoting, flow or block style, indentation and tabs, line endings
(CRLF stays CRLF), a BOM, a missing final newline. Loading and dumping the file
(ruamel's round trip) would re-indent it, turn CRLF into LF and lose the comments of a
flow mapping.

What cannot be edited safely is refused with a ``ConfigError`` naming the file, the
line and the field, the text left as it was: a file of several YAML documents, a value
shared through an anchor (an alias or a ``<<`` merge would change with it), a block
scalar. Every edit is checked by parsing its result: exactly the edited values differ.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, StreamMark, YAMLError
from ruamel.yaml.events import DocumentStartEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from reconciler.errors import ConfigError, ConfigIssue

KeyPath = Sequence[str]
Scalar = str | int | float | bool

_BOM = "\ufeff"
# The line breaks ruamel counts lines by (its marks' line numbers are in these lines).
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
# A line ending as every YAML 1.2 reader and editor takes it.
_LINE_ENDING = re.compile("\r\n|[\n\r]")
# A comment starts at a '#' at the start of a line or after a space or tab (YAML 1.2).
_COMMENT_START = re.compile(r"(?:^|(?<=[ \t]))#")
# The `:` after a key, past the spaces and line breaks an explicit (`? key`) or quoted
# key may leave before it.
_VALUE_INDICATOR = re.compile("[ \t\r\n\x85\u2028\u2029]*:")
# Characters that make a plain scalar mean something else in a flow mapping, or end it.
_FLOW_INDICATORS = set(",[]{}#")


def set_value(
    text: str,
    key_path: KeyPath,
    value: Scalar,
    *,
    path: str,
    insert_after: str | None = None,
) -> str:
    """``text`` (the file ``path``) with the scalar at ``key_path`` replaced by
    ``value``, a string in the old value's quoting (``_scalar_text``); when its mapping
    lacks the key, the key added after the sibling ``insert_after`` (else after the
    last key), on its own line in a block mapping, as one more entry in a flow
    mapping."""
    bom, body = _split_bom(text)
    root = _compose(body, path)
    found = _locate(root, key_path, path, body)
    if found.value is None:
        edited = _with_key(body, found.mapping, key_path[-1], value, insert_after)
    else:
        node = found.value
        if not isinstance(node, ScalarNode) or node.style in ("|", ">"):
            raise _refusal(
                path, node.start_mark, key_path, "is not a one-line value: edit it by hand"
            )
        if node.start_mark.index == node.end_mark.index:  # `key:` with no value (null)
            assert found.key is not None  # a value found has its key
            at = _after_value_indicator(body, found.key, key_path, path)
            # A space first (`key:21000` is one plain key), right at the colon: the
            # blanks before a `# comment` stay between it and the value.
            edited = body[:at] + " " + _scalar_text(value, None) + body[at:]
        else:
            start, end = node.start_mark.index, node.end_mark.index
            edited = body[:start] + _scalar_text(value, node.style) + body[end:]
    _check_edit(body, edited, {tuple(key_path): value}, path)
    return bom + edited


def refresh_comments(text: str, key_paths: Sequence[KeyPath], note: str, *, path: str) -> str:
    """``text`` (the file ``path``) with the comments that described the old values of
    ``key_paths`` gone and ``note`` above each key's line instead, so a comment never
    stays beside a value it no longer describes, and a second refresh with the same
    note changes nothing. What goes: the comment lines directly above the key's line at
    that line's indentation (they become the note), the end-of-line comments of the
    key's line and of the line the value ends on, and, for the first key of a mapping
    on lines of its own, the comment lines above the mapping's key. Keys sharing a line
    (a flow mapping on one line) share one note, above that line."""
    bom, body = _split_bom(text)
    root = _compose(body, path)
    lines = _LINE_BREAK.split(body)  # without breaks; breaks[i] ends lines[i]
    breaks = [m.group() for m in _LINE_BREAK.finditer(body)] + [""]
    noted: set[int] = set()  # lines that get the note above them
    stale_above: set[int] = set()  # lines whose comment block above goes
    stale_end: set[int] = set()  # lines whose end-of-line comment goes
    for key_path in key_paths:
        found = _locate(root, key_path, path, body)
        if found.key is None or found.value is None:
            raise _refusal(path, found.mapping.start_mark, key_path, "is not in the file")
        key_line = found.key.start_mark.line
        noted.add(key_line)
        stale_end |= {key_line, found.value.end_mark.line}  # `key:  # c` then the value
        first = found.mapping.value[0][0] is found.key
        if first and found.parent_key is not None:
            parent_line = found.parent_key.start_mark.line
            if parent_line != key_line:
                stale_above.add(parent_line)
    spans = sorted(_scalar_spans(root))
    starts = _line_starts(lines, breaks)
    for line in stale_end:
        lines[line] = _without_end_comment(lines[line], starts[line], spans)
    newline = _newline_of(body)
    for line in sorted(noted | stale_above, reverse=True):
        indent = _indentation(lines[line])
        start = _comment_block_start(lines, starts, line, indent, spans)
        replacement = [f"{indent}# {note}"] if line in noted else []
        lines[start:line] = replacement
        breaks[start:line] = [newline] * len(replacement)
    edited = "".join(line + brk for line, brk in zip(lines, breaks, strict=True))
    _check_edit(body, edited, {}, path)
    return bom + edited


# --------------------------------------------------------------------------- locating


@dataclass(frozen=True)
class _Found:
    """Where a key path is: its mapping, its key and value (None when the mapping lacks
    the key), and the key whose value the mapping is (None for the document's)."""

    mapping: MappingNode
    key: ScalarNode | None
    value: Node | None
    parent_key: ScalarNode | None


def _parser() -> YAML:
    # The loader's parser (reconciler.desired.loader): the C one where installed, which
    # takes what the pure-Python one refuses (a tab after `key:`). Either's marks are
    # character offsets into the text.
    return YAML(typ="safe", pure=False)


def _compose(body: str, path: str) -> MappingNode:
    """The node tree of the one document in ``body``, with the marks of every node."""
    yaml = _parser()
    try:
        starts = [e for e in yaml.parse(io.StringIO(body)) if isinstance(e, DocumentStartEvent)]
        if len(starts) > 1:
            raise _refusal(
                path,
                starts[1].start_mark,
                (),
                "a second YAML document: tune edits a file of one document (one service) "
                "only; edit it by hand",
            )
        root = yaml.compose(io.StringIO(body))
    except YAMLError as exc:
        raise _unreadable(exc, path, body) from None
    if not isinstance(root, MappingNode):
        raise ConfigError([ConfigIssue(path, 1, 1, "", "the document is not a mapping")])
    return root


def _locate(root: MappingNode, key_path: KeyPath, path: str, body: str) -> _Found:
    """Walk ``key_path`` from ``root`` (composed from ``body``); refuse a path through
    a node an alias shares, a key its mapping may take from a ``<<`` merge, and a
    missing mapping."""
    shared = _shared_nodes(root)
    mapping: Node = root
    parent_key: ScalarNode | None = None
    for depth, part in enumerate(key_path):
        here = key_path[: depth + 1]
        if not isinstance(mapping, MappingNode):
            raise _refusal(path, mapping.start_mark, key_path[:depth], "is not a mapping")
        _refuse_shared(mapping, shared, key_path, path, body)
        pair = next(
            ((k, v) for k, v in mapping.value if isinstance(k, ScalarNode) and k.value == part),
            None,
        )
        if pair is None:
            merge = next((k for k, _ in mapping.value if k.value == "<<"), None)
            if merge is not None:
                raise _refusal(
                    path,
                    merge.start_mark,
                    key_path,
                    "may come from the merge key '<<' here: tune does not write a value "
                    "another mapping may give; write it into this mapping by hand",
                )
            if depth == len(key_path) - 1:
                return _Found(mapping, None, None, parent_key)
            raise _refusal(path, mapping.start_mark, here, "is missing: add it by hand")
        key, value = pair
        if depth == len(key_path) - 1:
            _refuse_shared(value, shared, key_path, path, body)
            return _Found(mapping, key, value, parent_key)
        parent_key, mapping = key, value
    raise ValueError("an empty key path names no value")


def _shared_nodes(root: Node) -> set[int]:
    """The ids of the nodes reached from more than one place: an anchored node and its
    aliases compose to one node object (the C composer keeps no anchor name)."""
    seen: set[int] = set()
    shared: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            shared.add(id(node))
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return shared


_ANCHOR = re.compile(r"&[^\s,\[\]{}]+")


def _refuse_shared(node: Node, shared: set[int], key_path: KeyPath, path: str, body: str) -> None:
    if id(node) not in shared:
        return
    anchor = _ANCHOR.match(body, node.start_mark.index)  # the node starts at its anchor
    name = f"the anchor {anchor.group()}" if anchor is not None else "an anchor"
    raise _refusal(
        path,
        node.start_mark,
        key_path,
        f"is shared through {name} here: changing it would change every alias of it "
        "too; edit the file by hand",
    )


def _unreadable(exc: YAMLError, path: str, body: str) -> ConfigError:
    """``exc`` (from parsing ``body``) as a ConfigError located where known: the
    reader, which refuses a character YAML does not allow (a control character), gives
    no mark."""
    if isinstance(exc, MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        return _refusal(path, mark, (), f"YAML error: {problem}")
    if isinstance(exc, ReaderError):
        # Its position counts characters with the pure parser, UTF-8 bytes with the C
        # one; either reports the text's first refused character, so find that.
        at = body.find(chr(exc.character)) if isinstance(exc.character, int) else -1
        where = _mark_at(body, at) if at >= 0 else None
        problem = str(exc).splitlines()[0]  # the rest names the stream, not the file
        return _refusal(path, where, (), f"YAML error: {problem}")
    return _refusal(path, None, (), f"YAML error: {exc}")


def _mark_at(body: str, index: int) -> StreamMark:
    """The mark of offset ``index`` in ``body``, its line counted as ruamel counts."""
    line_start, line = 0, 0
    for brk in _LINE_BREAK.finditer(body, 0, index):
        line_start, line = brk.end(), line + 1
    return StreamMark("", index, line, index - line_start)


def _refusal(path: str, mark: StreamMark | None, key_path: KeyPath, message: str) -> ConfigError:
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return ConfigError([ConfigIssue(path, line, column, ".".join(key_path), message)])


# --------------------------------------------------------------------------- writing


def _scalar_text(value: Scalar, style: str | None) -> str:
    """``value`` as YAML. A string in the quoting ``style`` of the value it replaces
    (plain is None with the pure parser, '' with the C one), double-quoted where that
    quoting would not read back as the same string. A number or a boolean unquoted
    whatever the old value's quoting: the models take a number written as one only."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a value tune writes")
        return repr(value)
    if style == "'" and value.isprintable():  # single quotes escape nothing but '
        return "'" + value.replace("'", "''") + "'"
    if not style and _reads_back_plain(value):
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a double-quoted scalar


def _after_value_indicator(body: str, key: ScalarNode, key_path: KeyPath, path: str) -> int:
    """Where the empty value of ``key`` goes: just after the ``:`` that follows the key.
    The pure parser marks an empty value at the next token, maybe on the next line
    (the C one marks the colon's end)."""
    colon = _VALUE_INDICATOR.match(body, key.end_mark.index)
    if colon is None:  # `? key` with its `:` past a comment, or none
        raise _refusal(
            path, key.start_mark, key_path, "has an empty value tune cannot place: edit it by hand"
        )
    return colon.end()


def _reads_back_plain(value: str) -> bool:
    if not value or value != value.strip() or _FLOW_INDICATORS & set(value):
        return False
    try:
        return _parser().load(io.StringIO(value)) == value
    except YAMLError:  # a character YAML refuses, too
        return False


def _with_key(
    body: str, mapping: MappingNode, key: str, value: Scalar, insert_after: str | None
) -> str:
    """``body`` with ``key: value`` added to ``mapping`` after ``insert_after`` (else
    after its last key)."""
    entry = f"{_scalar_text(key, None)}: {_scalar_text(value, None)}"
    pairs = mapping.value
    sibling = next((p for p in pairs if p[0].value == insert_after), pairs[-1] if pairs else None)
    if mapping.flow_style:
        if sibling is None:  # `{}`: inside the brace
            at = mapping.start_mark.index + 1
            return body[:at] + entry + body[at:]
        at = sibling[1].end_mark.index
        return body[:at] + ", " + entry + body[at:]
    assert sibling is not None  # a block mapping has a key
    sibling_key = sibling[0]
    lines = _LINE_BREAK.split(body)
    breaks = [m.group() for m in _LINE_BREAK.finditer(body)] + [""]
    after = _last_line(sibling[1])
    key_line = lines[sibling_key.start_mark.line]
    indent = key_line[: sibling_key.start_mark.column]
    if indent.strip(" \t"):  # the key follows `- ` on its line
        indent = " " * sibling_key.start_mark.column
    newline = _newline_of(body)
    lines.insert(after + 1, indent + entry)
    if breaks[after]:
        breaks.insert(after + 1, breaks[after])
    else:  # the last line, without a final newline: the new one ends the file instead
        breaks[after] = newline
        breaks.insert(after + 1, "")
    return "".join(line + brk for line, brk in zip(lines, breaks, strict=True))


def _last_line(node: Node) -> int:
    """The line ``node``'s content ends on (a block collection's end mark is where the
    next key begins, maybe lines later, past comments that belong to that key)."""
    if isinstance(node, MappingNode | SequenceNode) and not node.flow_style and node.value:
        last = node.value[-1]
        return _last_line(last[1] if isinstance(node, MappingNode) else last)
    end = node.end_mark
    return end.line if end.column > 0 or end.line == node.start_mark.line else end.line - 1


def _without_end_comment(line: str, line_start: int, spans: Sequence[tuple[int, int]]) -> str:
    """``line`` less its end-of-line comment: the first '#' that starts a comment and
    lies in no scalar (a quoted value may hold ' #')."""
    for match in _COMMENT_START.finditer(line):
        at = line_start + match.start()
        if not any(start <= at < end for start, end in spans):
            return line[: match.start()].rstrip(" \t")
    return line


def _comment_block_start(
    lines: Sequence[str],
    starts: Sequence[int],
    line: int,
    indent: str,
    spans: Sequence[tuple[int, int]],
) -> int:
    """The first of the comment lines directly above ``line`` indented by ``indent``
    (``starts``: each line's offset). A line of a quoted scalar written over lines
    (its ``spans``) may start with '#' at that indentation too: it is no comment."""
    start = line
    while start > 0:
        above = lines[start - 1]
        if _indentation(above) != indent or not above[len(indent) :].startswith("#"):
            break
        hash_at = starts[start - 1] + len(indent)
        if any(begin <= hash_at < end for begin, end in spans):
            break
        start -= 1
    return start


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _scalar_spans(root: Node) -> Iterator[tuple[int, int]]:
    """Where each scalar (key or value) is written, as character offsets."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # an alias: walked at its anchor
            continue
        seen.add(id(node))
        if isinstance(node, ScalarNode):
            yield node.start_mark.index, node.end_mark.index
        elif isinstance(node, MappingNode):
            stack.extend(n for pair in node.value for n in pair)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)


def _line_starts(lines: Sequence[str], breaks: Sequence[str]) -> list[int]:
    starts, offset = [], 0
    for line, brk in zip(lines, breaks, strict=True):
        starts.append(offset)
        offset += len(line) + len(brk)
    return starts


def _newline_of(body: str) -> str:
    """The file's line ending (its first), for lines it gains; LF in a file of one
    line. Not U+2028, U+2029 or U+0085, which ruamel counts as line breaks: YAML 1.2
    readers do not (a note ended by one would comment out the key after it), and in
    a file they are rather characters of a quoted string."""
    match = _LINE_ENDING.search(body)
    return match.group() if match is not None else "\n"


def _split_bom(text: str) -> tuple[str, str]:
    return (_BOM, text[1:]) if text.startswith(_BOM) else ("", text)


# --------------------------------------------------------------------------- checking


def _check_edit(
    before: str, after: str, expected: Mapping[tuple[str, ...], Scalar], path: str
) -> None:
    """Refuse an edit whose result does not read as ``before`` with exactly the
    ``expected`` values: the file would say something tune did not mean."""
    yaml = _parser()  # refuses duplicate keys, as the loader does
    try:
        wanted = yaml.load(io.StringIO(before))
    except YAMLError as exc:
        raise _unreadable(exc, path, before) from None
    for key_path, value in expected.items():
        node = wanted
        for part in key_path[:-1]:
            node = node[part]
        node[key_path[-1]] = value
    try:
        got: Any = yaml.load(io.StringIO(after))
    except YAMLError as exc:
        got = exc
    if got != wanted or not _same_types(got, wanted):
        field = ", ".join(".".join(p) for p in expected)
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    None,
                    None,
                    field,
                    "the edit would change more than the value (a layout tune cannot edit "
                    "safely); the file is left as it is: edit it by hand",
                )
            ]
        )


def _same_types(a: Any, b: Any) -> bool:
    """``a == b`` holds 1300 and 1300.0, and True and 1, alike: the types must match."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b, strict=True))
    return True


__all__ = ["refresh_comments", "set_value"]
