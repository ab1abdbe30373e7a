"""Load and validate the desired state of a repository (a directory or a Git revision).

Every problem is reported as ``file:line:column: field.path: message``, and all
problems of a run are reported together: ``load_desired_state`` raises one
``ConfigError`` that carries the whole list.

YAML is read with ruamel.yaml: composed (C parser where ruamel.yaml.clib is
installed) so the position of every key is known, then constructed with the YAML 1.2
resolver. Writing files back with comments and order intact is
``reconciler.desired.roundtrip``'s job.
"""

from __future__ import annotations

import difflib
import io
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from reconciler.desired.checks import (
    Path as KeyPath,
)
from reconciler.desired.checks import (
    check_cluster,
    check_policy,
    check_policy_against_cluster,
)
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.desired.sources import DirectorySource, GitSource, Source, SourceError
from reconciler.errors import ConfigError, ConfigIssue

POLICIES_DIR = "policies"
CLUSTERS_DIR = "clusters"

Location = tuple[int, int]  # 1-based line and column


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
    source_label: str = ""

    def policies_for(self, cluster: str) -> list[ServicePolicy]:
        return [p for p in self.policies.values() if p.cluster == cluster]


# --------------------------------------------------------------------------- parsing


def _safe_yaml() -> YAML:
    # The C parser (ruamel.yaml.clib) composes ~5x faster than round-trip mode; the
    # resolver is still ruamel's YAML 1.2 one, so values mean the same as in the
    # round-trip editor (reconciler.desired.roundtrip) that `tune` writes with.
    yaml = YAML(typ="safe", pure=False)
    yaml.allow_duplicate_keys = False
    return yaml


def _record_locations(node: Node, path: KeyPath, locations: dict[KeyPath, Location]) -> None:
    """Walk the composed node tree and note where each key and list item starts."""
    if isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                continue
            child = (*path, _scalar_key(key_node))
            locations[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _record_locations(value_node, child, locations)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            locations[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
            _record_locations(item, child, locations)


def _scalar_key(node: ScalarNode) -> object:
    """Keys are strings in our files; integer-looking keys stay as YAML resolved them."""
    if (node.tag or "").endswith(":int"):
        try:
            return int(node.value)
        except ValueError:
            return node.value
    return node.value


def parse_yaml(path: str, raw: bytes) -> ParsedFile:
    """Decode and parse one file; raise ConfigError with its location on failure."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [ConfigIssue(path, line, column, "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")]
        ) from None
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise ConfigError([ConfigIssue(path, None, None, "", "file is empty")])
    yaml = _safe_yaml()
    try:
        node = yaml.compose(io.StringIO(text))
        data = yaml.constructor.construct_document(node) if node is not None else None
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        key = (exc.problem or "").split('"')[1] if '"' in (exc.problem or "") else ""
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                    key,
                    "duplicate key (each key may appear once in a mapping)",
                )
            ]
        ) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            [
                ConfigIssue(
                    path,
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                    "",
                    f"YAML syntax error: {problem}",
                )
            ]
        ) from None
    except YAMLError as exc:
        raise ConfigError([ConfigIssue(path, None, None, "", f"YAML error: {exc}")]) from None
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
    _record_locations(node, (), locations)
    return ParsedFile(path, data, locations)


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
            parsed.append(parse_yaml(path, source.read(path)))
        except SourceError as exc:
            issues.append(ConfigIssue(exc.path, None, None, "", exc.message))
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
    for parsed in _parse_all(source, cluster_paths, issues):
        files[parsed.path] = parsed
        spec = _validate_as(ClusterSpec, parsed, issues)
        if not isinstance(spec, ClusterSpec):
            continue
        problems = check_cluster(spec)
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

    policies: dict[str, ServicePolicy] = {}
    policy_files: dict[str, str] = {}
    templates: dict[str, Any] = {}
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
            if policy.cluster not in {p.stem for p in map(Path, cluster_paths)}:
                known = sorted(clusters)
                hint = difflib.get_close_matches(policy.cluster, known, n=1)
                suffix = (
                    f"; did you mean '{hint[0]}'?"
                    if hint
                    else (f"; known: {', '.join(known)}" if known else "")
                )
                problems.append((("cluster",), f"unknown cluster '{policy.cluster}'{suffix}"))
        else:
            problems.extend(check_policy_against_cluster(policy, cluster))
        for role in ("prefill", "decode"):
            template = policy.role(role).template
            if template in templates:
                continue
            try:
                templates[template] = parse_yaml(template, source.read(template)).data
            except SourceError as exc:
                message = "no such file" if exc.message.startswith("no such file") else exc.message
                problems.append(((role, "template"), f"template '{template}': {message}"))
            except ConfigError as exc:
                issues.extend(exc.issues)
        issues.extend(_issue(parsed, path, msg) for path, msg in problems)
        if not problems:
            policies[policy.name] = policy
            policy_files[policy.name] = parsed.path

    if issues:
        raise ConfigError(issues)
    return DesiredState(
        policies=policies,
        clusters=clusters,
        files=files,
        policy_files=policy_files,
        cluster_files=cluster_files,
        templates=templates,
        source_label=source.label,
    )


def load_desired_state(root: str | Path = ".", rev: str | None = None) -> DesiredState:
    """Load ``root`` as a directory, or revision ``rev`` of the Git repository at ``root``."""
    try:
        source: Source = GitSource(Path(root), rev) if rev else DirectorySource(Path(root))
    except SourceError as exc:
        raise ConfigError([ConfigIssue(exc.path, None, None, "", exc.message)]) from None
    return load_from_source(source)
