"""Load and validate the desired state of a repository (a directory or a Git revision).

Every problem is reported as ``file:line:column: field.path: message``, and all
problems of a run are reported together: ``load_desired_state`` raises one
``ConfigError`` that carries the whole list.

YAML is read with ruamel.yaml: composed (C parser where ruamel.yaml.clib is
installed) so the position of every key is known, then constructed with the YAML 1.2
resolver. Writing files back with comments and order intact is
``reconciler.desired.roundtrip``'s job.

The files may come from an untrusted pull request, so before anything is built the
text is checked against fixed limits (size, control characters, nesting depth,
aliases and the nodes they expand to, digits of an integer) on the parser's event
stream, which stops at the first event over a limit: a hostile file costs bounded
memory and time and gives a located error, never a traceback.
"""

from __future__ import annotations

import difflib
import io
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    NodeEvent,
    ScalarEvent,
)
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.desired.checks import (
    Path as KeyPath,
)
from reconciler.desired.checks import (
    check_cluster,
    check_deployment_names,
    check_fleet_budget,
    check_policy,
    check_policy_against_cluster,
    unknown_message,
)
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.sources import (
    MAX_FILE_BYTES,
    DirectorySource,
    GitSource,
    Source,
    SourceError,
)
from reconciler.desired.templates import template_problems
from reconciler.errors import ConfigError, ConfigIssue
from reconciler.text_safety import describe, unsafe_in_value

POLICIES_DIR = "policies"
CLUSTERS_DIR = "clusters"

Location = tuple[int, int]  # 1-based line and column

# Limits on one YAML document. Each is far above what a configuration file needs (the
# example 2,048-GPU cluster file: 3.6 KB, depth 9, ~400 nodes, no aliases) and low
# enough that parsing, building and validating what passes stays well under a second.
MAX_DOCUMENT_BYTES = MAX_FILE_BYTES
MAX_DEPTH = 64  # nested mappings/sequences; our schema needs 9
MAX_ALIASES = 1_000  # `*name` references in one document
MAX_NODES = 500_000  # YAML nodes with every alias expanded (a billion laughs stops here)
MAX_INT_DIGITS = 100  # Python refuses int() of more than 4,300 digits; no field needs 20
# YAML 1.2 allows only these characters (tab, LF, CR, printable Unicode; the BOM too).
_NOT_PRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class ParsedFile:
    """One YAML file: its plain data and where each key path sits in the text."""

    path: str
    data: Any
    locations: Mapping[KeyPath, Location]

    def locate(self, key_path: KeyPath) -> Location | None:
        """The position of the longest prefix of ``key_path`` present in the file."""
        for cut in range(len(key_path), -1, -1):
            loc = self.locations.get(tuple(key_path[:cut]))
            if loc is not None:
                return loc
        return None


@dataclass(frozen=True)
class DesiredState:
    """A validated revision: every service and cluster, plus where each was written."""

    policies: Mapping[str, ServicePolicy]
    clusters: Mapping[str, ClusterSpec]
    files: Mapping[str, ParsedFile] = field(default_factory=dict)
    policy_files: Mapping[str, str] = field(default_factory=dict)
    cluster_files: Mapping[str, str] = field(default_factory=dict)
    templates: Mapping[str, Any] = field(default_factory=dict)
    # Each template as parsed, with where its keys are (the review locates changes by it).
    template_files: Mapping[str, ParsedFile] = field(default_factory=dict)
    source_label: str = ""
    # The Git commit it was read from ("" in directory mode).
    revision: str = ""

    def policies_for(self, cluster: str) -> list[ServicePolicy]:
        return [p for p in self.policies.values() if p.cluster == cluster]

    def policy_issue(self, name: str, key_path: KeyPath, message: str) -> ConfigIssue:
        """``message`` about a field of service ``name``'s policy, located in its file as
        a loader error is (a warning names the place to fix as an error does)."""
        path = self.policy_files.get(name, "")
        parsed = self.files.get(path)
        if parsed is None:
            return ConfigIssue(path, None, None, format_key_path(key_path), message)
        return _issue(parsed, key_path, message)


# --------------------------------------------------------------------------- parsing


def _safe_yaml() -> YAML:
    # The C parser (ruamel.yaml.clib) composes ~5x faster than round-trip mode; the
    # resolver is still ruamel's YAML 1.2 one. The text editor `tune` writes with
    # (reconciler.desired.roundtrip) parses with the same, so values mean the same.
    yaml = YAML(typ="safe", pure=False)
    yaml.allow_duplicate_keys = False
    return yaml


def _record_locations(root: Node, locations: dict[KeyPath, Location]) -> list[ConfigIssue]:
    """Walk the composed node tree and note where each key and list item starts.
    Iterative, and a node reached again through an alias is not walked twice: paths
    below an alias are located at the alias (``ParsedFile.locate`` takes the prefix).
    Returns the keys no field can have (null, true, a float, a list or a mapping), each
    where it is written: the models would name them nowhere (their path is no key)."""
    odd_keys: list[ConfigIssue] = []
    seen: set[int] = set()
    stack: list[tuple[Node, KeyPath]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                kind = _key_kind(key_node)
                if kind is not None:
                    mark = key_node.start_mark
                    odd_keys.append(
                        ConfigIssue(
                            "",
                            mark.line + 1,
                            mark.column + 1,
                            format_key_path(path),
                            f"a key must be a name, not {kind}",
                        )
                    )
                    continue
                assert isinstance(key_node, ScalarNode)
                child = (*path, _scalar_key(key_node))
                locations.setdefault(
                    child, (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                )
                stack.append((value_node, child))
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                child = (*path, index)
                locations[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
                stack.append((item, child))
    return odd_keys


def _key_kind(node: Node) -> str | None:
    """What a mapping key is when no field can be named by it, else None (strings, and
    integers, which the models report themselves)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    tag = node.tag or ""
    for suffix, kind in ((":null", "null"), (":bool", "true or false"), (":float", "a fraction")):
        if tag.endswith(suffix):
            return kind
    return None


def _scalar_key(node: ScalarNode) -> object:
    """Keys are strings in our files; integer-looking keys stay as YAML resolved them."""
    if (node.tag or "").endswith(":int") and len(node.value) <= MAX_INT_DIGITS:
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return node.value


def _position(text: str, index: int) -> Location:
    """1-based line and column of a character offset."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _refuse(path: str, line: int | None, column: int | None, message: str) -> ConfigError:
    # Every refusal names a place: where the parser stopped, or the file's start.
    return ConfigError([ConfigIssue(path, line or 1, column or 1, "", message)])


def _mark_of(exc: MarkedYAMLError) -> tuple[int | None, int | None]:
    mark = exc.problem_mark or exc.context_mark
    return (mark.line + 1, mark.column + 1) if mark else (None, None)


def _prescan(path: str, text: str, yaml: YAML) -> None:
    """Walk the parser's events (no nodes, no objects) and stop at the first one over
    a limit: nesting depth, aliases, nodes with aliases expanded, integer digits.
    Sizes are counted per anchor, so nine levels of nine aliases are refused after a
    few hundred events instead of being expanded to 9**9 nodes."""
    anchors: dict[str, int] = {}  # anchor -> nodes it stands for, once complete
    open_anchors: set[str] = set()
    stack: list[list[Any]] = [[0, None]]  # per open collection: [nodes so far, anchor]
    aliases = 0
    last: tuple[int, int] = (1, 1)
    events = yaml.parse(io.StringIO(text))
    while True:
        try:
            event = next(events)
        except StopIteration:
            return
        except MarkedYAMLError as exc:
            line, column = _mark_of(exc)
            if line is None:
                line, column = last
            raise _refuse(
                path, line, column, f"YAML syntax error: {exc.problem or exc.context or exc}"
            ) from None
        except YAMLError as exc:
            raise _refuse(path, *last, f"YAML error: {exc}") from None
        mark = event.start_mark
        if mark is not None:
            last = (mark.line + 1, mark.column + 1)
        if not isinstance(event, NodeEvent | CollectionEndEvent):
            continue
        size = 0
        if isinstance(event, CollectionStartEvent):
            if len(stack) > MAX_DEPTH:
                raise _refuse(path, *last, f"nested deeper than {MAX_DEPTH} levels")
            stack.append([1, event.anchor])
            if event.anchor:
                open_anchors.add(event.anchor)
            continue
        if isinstance(event, CollectionEndEvent):
            size, anchor = stack.pop()
            if anchor:
                anchors[anchor] = size
                open_anchors.discard(anchor)
        elif isinstance(event, AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _refuse(path, *last, f"more than {MAX_ALIASES} aliases in one document")
            if event.anchor in open_anchors:
                raise _refuse(path, *last, f"alias *{event.anchor} refers to its own ancestor")
            if event.anchor not in anchors:
                raise _refuse(path, *last, f"alias *{event.anchor} has no anchor before it")
            size = anchors[event.anchor]
        elif isinstance(event, ScalarEvent):
            size = 1
            if len(event.value) > MAX_INT_DIGITS and _is_int(yaml, event):
                raise _refuse(
                    path,
                    *last,
                    f"integer of {len(event.value)} characters (at most {MAX_INT_DIGITS})",
                )
            if event.anchor:
                anchors[event.anchor] = 1
        stack[-1][0] += size
        if stack[-1][0] > MAX_NODES:
            raise _refuse(
                path, *last, f"expands to more than {MAX_NODES:,} YAML nodes (aliases included)"
            )


def _is_int(yaml: YAML, event: ScalarEvent) -> bool:
    tag = event.tag
    if tag is None or tag == "!":
        tag = yaml.resolver.resolve(ScalarNode, event.value, event.implicit)
    return str(tag).endswith(":int")


def _construct(path: str, yaml: YAML, node: Node) -> Any:
    """Build the Python data; a scalar the constructor cannot convert (a timestamp
    like 2001-02-30, an empty ``!!int``) raises a plain exception without a place,
    so find and locate that scalar."""
    try:
        return yaml.constructor.construct_document(node)
    except YAMLError:
        raise  # located by parse_yaml
    except Exception as exc:  # ruamel's constructors fail on hostile scalars in many ways
        # (ValueError, IndexError on an empty !!int, OverflowError, ...)
        # A fresh constructor: the failed one keeps the half-built node as in progress.
        constructor = _safe_yaml().constructor
        stack = [node]
        seen: set[int] = set()
        while stack:
            item = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, ScalarNode):
                try:
                    constructor.construct_object(item, deep=True)
                except YAMLError:
                    raise
                except Exception as inner:
                    mark = item.start_mark
                    raise _refuse(
                        path, mark.line + 1, mark.column + 1, f"invalid value: {inner}"
                    ) from None
            elif isinstance(item, MappingNode):
                stack.extend(n for pair in item.value for n in pair)
            elif isinstance(item, SequenceNode):
                stack.extend(item.value)
        raise _refuse(path, 1, 1, f"invalid value: {exc}") from None


def parse_yaml(path: str, raw: bytes) -> ParsedFile:
    """Decode and parse one file; raise ConfigError with its location on failure."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        line = raw.count(b"\n", 0, MAX_DOCUMENT_BYTES) + 1
        column = MAX_DOCUMENT_BYTES - (raw.rfind(b"\n", 0, MAX_DOCUMENT_BYTES) + 1) + 1
        raise _refuse(
            path,
            line,
            column,
            f"file is over the {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB limit for a "
            "configuration file",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [ConfigIssue(path, line, column, "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")]
        ) from None
    bad = _NOT_PRINTABLE.search(text)
    if bad is not None:
        raise _refuse(
            path,
            *_position(text, bad.start()),
            f"control character U+{ord(bad.group()):04X} is not allowed in YAML",
        )
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise _refuse(path, 1, 1, "file is empty (no YAML content)")
    yaml = _safe_yaml()
    try:
        _prescan(path, text, yaml)
        node = yaml.compose(io.StringIO(text))
        data = _construct(path, yaml, node) if node is not None else None
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        key = (exc.problem or "").split('"')[1] if '"' in (exc.problem or "") else ""
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    mark.line + 1 if mark else 1,
                    mark.column + 1 if mark else 1,
                    key,
                    "duplicate key (each key may appear once in a mapping)",
                )
            ]
        ) from None
    except MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise _refuse(path, *_mark_of(exc), f"YAML syntax error: {problem}") from None
    except YAMLError as exc:
        raise _refuse(path, 1, 1, f"YAML error: {exc}") from None
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else type(data).__name__
        raise ConfigError(
            [
                ConfigIssue(
                    path, 1, 1, "", f"the document must be a mapping of keys to values, not {kind}"
                )
            ]
        )
    locations: dict[KeyPath, Location] = {(): (1, 1)}
    odd_keys = _record_locations(node, locations)
    if odd_keys:
        raise ConfigError([replace(issue, file=path) for issue in odd_keys])
    parsed = ParsedFile(path, data, locations)
    _refuse_unsafe_strings(parsed)
    return parsed


def _refuse_unsafe_strings(parsed: ParsedFile) -> None:
    """Refuse a key or value holding a character that acts on or hides from whoever
    reads it (``reconciler.text_safety``). The file's text passed ``_NOT_PRINTABLE``,
    but YAML's escapes in quoted scalars (``"\\e[2J"``, ``"\\r\\n"``, ``"\\u202e"``)
    make such characters only once parsed, and from here they would reach names,
    environment variables, logs and the review."""
    stack: list[tuple[KeyPath, Any]] = [((), parsed.data)]
    while stack:
        key_path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                child = (*key_path, key)
                if isinstance(key, str):
                    _refuse_unsafe(parsed, child, key, "key")
                stack.append((child, item))
        elif isinstance(value, list):
            stack.extend(((*key_path, index), item) for index, item in enumerate(value))
        elif isinstance(value, str):
            _refuse_unsafe(parsed, key_path, value, "value")


def _refuse_unsafe(parsed: ParsedFile, key_path: KeyPath, text: str, what: str) -> None:
    char = unsafe_in_value(text)
    if char is not None:
        raise ConfigError(
            [
                _issue(
                    parsed,
                    key_path,
                    f"the {what} holds the invisible or control character {describe(char)} "
                    "(written as an escape in a quoted string?): not allowed in desired state",
                )
            ]
        )


# --------------------------------------------------------------------------- errors


def format_key_path(key_path: KeyPath) -> str:
    out = ""
    for part in key_path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _issue(parsed: ParsedFile, key_path: KeyPath, message: str) -> ConfigIssue:
    loc = parsed.locate(key_path)
    line, column = loc if loc else (None, None)
    return ConfigIssue(parsed.path, line, column, format_key_path(key_path), message)


def _unwrap(annotation: Any) -> list[Any]:
    """Member types of Optional/Union/Annotated, flattened."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _unwrap(arg)]
    return [annotation]


def _model_at(root: type[BaseModel], key_path: KeyPath) -> type[BaseModel] | None:
    """The model class that a key path inside a document points into."""
    candidates: list[Any] = [root]
    for part in key_path:
        nxt: list[Any] = []
        for cand in candidates:
            for member in _unwrap(cand):
                origin = typing.get_origin(member)
                if (
                    isinstance(member, type)
                    and issubclass(member, BaseModel)
                    and isinstance(part, str)
                ):
                    for name, info in member.model_fields.items():
                        if part in (name, info.alias):
                            nxt.append(info.annotation)
                elif origin in (tuple, list) and isinstance(part, int):
                    nxt.extend(a for a in typing.get_args(member) if a is not Ellipsis)
                elif origin is dict:
                    nxt.append(typing.get_args(member)[1])
        candidates = nxt
    for cand in candidates:
        for member in _unwrap(cand):
            if isinstance(member, type) and issubclass(member, BaseModel):
                return member
    return None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _data_has(data: Any, key_path: KeyPath) -> bool:
    node = data
    for part in key_path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def _clean_loc(data: Any, loc: tuple[Any, ...], keep_last: bool) -> KeyPath:
    """Drop the union-member tags pydantic inserts into locations (e.g. 'str',
    'tuple[...]'): keep only the parts that exist in the document."""
    kept: list[Any] = []
    for i, part in enumerate(loc):
        candidate = (*kept, part)
        if _data_has(data, candidate) or (keep_last and i == len(loc) - 1):
            kept.append(part)
    return tuple(kept)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_issues(
    parsed: ParsedFile, model: type[BaseModel], exc: ValidationError
) -> list[ConfigIssue]:
    issues: dict[tuple[KeyPath, str], ConfigIssue] = {}
    union_seen: set[KeyPath] = set()
    for error in exc.errors(include_url=False):
        kind = error["type"]
        keep_last = kind in ("missing", "extra_forbidden")
        key_path = _clean_loc(parsed.data, tuple(error["loc"]), keep_last)
        if kind == "extra_forbidden":
            owner = _model_at(model, key_path[:-1])
            key = str(key_path[-1])
            message = f"unknown key '{key}'"
            if owner is not None:
                names = _field_names(owner)
                hint = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                message += (
                    f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(names)}"
                )
        elif kind == "missing":
            message = "required field is missing"
        else:
            text = error["msg"]
            text = text.replace("Input should be", "must be").replace("Value error, ", "")
            if text.startswith("String should"):
                text = "must" + text[len("String should") :]
            if not isinstance(error.get("input"), dict | list):
                text += f" (got {_describe(error.get('input'))})"
            message = text
            # A union reports once per member; keep the first message per location.
            if len(error["loc"]) != len(key_path) and key_path in union_seen:
                continue
            union_seen.add(key_path)
        issues.setdefault((key_path, message), _issue(parsed, key_path, message))
    return list(issues.values())


# --------------------------------------------------------------------------- loading


def _parse_all(source: Source, paths: list[str], issues: list[ConfigIssue]) -> list[ParsedFile]:
    parsed: list[ParsedFile] = []
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # Bytes that are not UTF-8 in a file name (kept by os.fsdecode as
            # surrogates) cannot be printed or reviewed: refuse the file by name.
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            issues.append(ConfigIssue(shown, 1, 1, "", "file name is not valid UTF-8; rename it"))
            continue
        try:
            parsed.append(parse_yaml(path, source.read(path)))
        except SourceError as exc:
            # A listed file that cannot be read: the whole file is at fault.
            issues.append(ConfigIssue(exc.path, 1, 1, "", exc.message))
        except ConfigError as exc:
            issues.extend(exc.issues)
    return parsed


def _validate_as(
    model: type[BaseModel], parsed: ParsedFile, issues: list[ConfigIssue]
) -> BaseModel | None:
    try:
        return model.model_validate(parsed.data)
    except ValidationError as exc:
        issues.extend(validation_issues(parsed, model, exc))
        return None


def load_from_source(source: Source) -> DesiredState:
    """Load every cluster and policy of a tree; raise ConfigError listing all problems."""
    issues: list[ConfigIssue] = []
    cluster_paths = source.list_yaml(CLUSTERS_DIR)
    policy_paths = source.list_yaml(POLICIES_DIR)
    if not cluster_paths:
        issues.append(
            ConfigIssue(CLUSTERS_DIR, None, None, "", "no cluster files (clusters/*.yaml)")
        )
    if not policy_paths:
        issues.append(
            ConfigIssue(POLICIES_DIR, None, None, "", "no service policy files (policies/*.yaml)")
        )

    files: dict[str, ParsedFile] = {}
    clusters: dict[str, ClusterSpec] = {}
    cluster_files: dict[str, str] = {}
    range_names_used: dict[str, int] = {}  # over every cluster file: a fleet-wide budget
    for parsed in _parse_all(source, cluster_paths, issues):
        files[parsed.path] = parsed
        spec = _validate_as(ClusterSpec, parsed, issues)
        if not isinstance(spec, ClusterSpec):
            continue
        problems = check_fleet_budget(spec, range_names_used) or check_cluster(spec)
        stem = Path(parsed.path).stem
        if spec.name != stem:
            # Services name their cluster, and a reader finds it, by the file name.
            problems.append(
                (
                    ("name",),
                    f"must equal the file name '{stem}' (got '{spec.name}'): a "
                    f"cluster is written in {CLUSTERS_DIR}/<name>.yaml",
                )
            )
        issues.extend(_issue(parsed, path, msg) for path, msg in problems)
        if spec.name in clusters:
            issues.append(
                _issue(
                    parsed,
                    ("name",),
                    f"cluster '{spec.name}' is also defined in {cluster_files[spec.name]}",
                )
            )
        elif not problems:
            clusters[spec.name] = spec
            cluster_files[spec.name] = parsed.path

    cluster_stems = {Path(path).stem: path for path in cluster_paths}
    cluster_files_at_fault = {issue.file for issue in issues}
    policies: dict[str, ServicePolicy] = {}
    policy_files: dict[str, str] = {}
    templates: dict[str, Any] = {}
    template_files: dict[str, ParsedFile] = {}
    unreadable_templates: set[str] = set()
    # template -> where it is first named, the services naming it, why it is unreadable
    missing_templates: dict[str, tuple[ParsedFile, KeyPath, list[str], str]] = {}
    for parsed in _parse_all(source, policy_paths, issues):
        files[parsed.path] = parsed
        policy = _validate_as(ServicePolicy, parsed, issues)
        if not isinstance(policy, ServicePolicy):
            continue
        problems = check_policy(policy)
        if policy.name in policies:
            problems.append(
                (
                    ("name",),
                    f"service '{policy.name}' is also defined in {policy_files[policy.name]}",
                )
            )
        cluster = clusters.get(policy.cluster)
        if cluster is None:
            # Never a silent skip: a service is checked against its cluster, or the
            # cluster's file reports why it was not loaded, or the service says so.
            written = cluster_stems.get(policy.cluster)
            if written is None:
                problems.append(
                    (("cluster",), unknown_message("cluster", policy.cluster, clusters))
                )
            elif written not in cluster_files_at_fault:
                problems.append(
                    (
                        ("cluster",),
                        f"cluster '{policy.cluster}' ({written}) was not loaded, so the "
                        "service is not checked against it",
                    )
                )
        else:
            problems.extend(check_policy_against_cluster(policy, cluster))
        for role in ("prefill", "decode"):
            template = policy.role(role).template
            if template in missing_templates:
                missing_templates[template][2].append(policy.name)
                continue
            if template in templates or template in unreadable_templates:
                continue  # a template's own problems are reported once, in its file
            try:
                parsed_template = parse_yaml(template, source.read(template))
            except SourceError as exc:
                message = "no such file" if exc.message.startswith("no such file") else exc.message
                missing_templates[template] = (parsed, (role, "template"), [policy.name], message)
            except ConfigError as exc:
                issues.extend(exc.issues)
                unreadable_templates.add(template)
            else:
                templates[template] = parsed_template.data
                template_files[template] = parsed_template
                # By the renderer's own rules: a template it cannot use makes the
                # revision invalid here, not the apply of a whole cluster fail later.
                issues.extend(
                    _issue(parsed_template, key_path, message)
                    for key_path, message in template_problems(parsed_template.data)
                )
        issues.extend(_issue(parsed, path, msg) for path, msg in problems)
        if not problems:
            policies[policy.name] = policy
            policy_files[policy.name] = parsed.path

    # A template that cannot be read is one problem, where the first service names it.
    for template, (first, key_path, users, message) in missing_templates.items():
        others = sorted(set(users[1:]) - {users[0]})
        also = f" (named by {', '.join(others)} too)" if others else ""
        issues.append(_issue(first, key_path, f"template '{template}': {message}{also}"))
    issues.extend(
        _issue(files[policy_files[name]], path, message)
        for name, path, message in check_deployment_names(policies.values(), clusters)
    )
    if issues:
        raise ConfigError(issues)
    return DesiredState(
        policies=policies,
        clusters=clusters,
        files=files,
        policy_files=policy_files,
        cluster_files=cluster_files,
        templates=templates,
        template_files=template_files,
        source_label=source.label,
        revision=getattr(source, "commit", ""),
    )


def reuse_unchanged(previous: DesiredState | None, state: DesiredState) -> DesiredState:
    """``state`` with each policy and cluster equal to ``previous``'s of the same name
    replaced by ``previous``'s object. The loop loads the desired state every cycle,
    and what is derived from a policy (its GPU ranking, performance models and
    capacities: milliseconds a service) is cached per object, as hashing a whole
    cluster model every cycle would cost more than it saves: without this every cycle
    would derive it all again for every service. The models are frozen, so an equal
    object is as good as the new one."""
    if previous is None or previous is state:  # the same commit: load_desired_state(previous=)
        return state

    def reuse(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
        return {name: old[name] if old.get(name) == obj else obj for name, obj in new.items()}

    return replace(
        state,
        policies=reuse(previous.policies, state.policies),
        clusters=reuse(previous.clusters, state.clusters),
    )


def repository_problem(root: Path, *, work_tree: bool = True) -> str | None:
    """Why ``root`` cannot be the desired-state repository, or None: it must be a
    directory, and (when its ``work_tree`` is read, not a Git revision) hold
    policies/ or clusters/. Every command says a wrong path with this."""
    if not root.exists():
        return "no such directory"
    if not root.is_dir():
        return "not a directory"
    if work_tree and not any((root / sub).is_dir() for sub in (POLICIES_DIR, CLUSTERS_DIR)):
        return f"not a desired-state repository (neither {POLICIES_DIR}/ nor {CLUSTERS_DIR}/ in it)"
    return None


def load_desired_state(
    root: str | Path = ".", rev: str | None = None, *, previous: DesiredState | None = None
) -> DesiredState:
    """Load ``root`` as a directory, or revision ``rev`` of the Git repository at ``root``.
    ``previous``, a state loaded before, comes back as it is when ``rev`` resolves to the
    commit it was read from: a commit's files cannot change, and reading a large fleet
    again every cycle costs seconds."""
    problem = repository_problem(Path(root), work_tree=rev is None)
    if problem is not None:
        raise ConfigError([ConfigIssue(str(root), None, None, "", problem)])
    try:
        source: Source = GitSource(Path(root), rev) if rev else DirectorySource(Path(root))
    except SourceError as exc:
        column = 1 if exc.line is not None else None
        raise ConfigError([ConfigIssue(exc.path, exc.line, column, "", exc.message)]) from None
    commit = getattr(source, "commit", "")
    if previous is not None and commit and previous.revision == commit:
        return previous
    return load_from_source(source)
