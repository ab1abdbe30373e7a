"""Pod templates are validated by the rules the renderer relies on: a template it
could not render makes the revision invalid, each problem named by the template's
file, line, column and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo_edits import line_of, problems
from typer.testing import CliRunner

from reconciler.cli import app
from reconciler.desired.loader import parse_yaml
from reconciler.desired.templates import MAX_TEMPLATE_PROBLEMS, template_problems

TEMPLATE = "templates/vllm-decode.yaml"

ENGINE = """\
spec:
  containers:
    - name: engine
      image: vllm/vllm-openai:v0.11.0
"""

# (template text, [(text on the line the problem is on, column, field, message)])
CASES: dict[str, tuple[str, list[tuple[str, int, str, str]]]] = {
    "no spec, an unknown key": (
        "foo: bar\n",
        [
            ("foo: bar", 1, "foo", "unknown key 'foo': a pod template has metadata and spec"),
            (
                "foo: bar",
                1,
                "spec",
                "required field is missing (the pod spec, with at least one container)",
            ),
        ],
    ),
    "no container": (
        "spec: {containers: []}\n",
        [("spec:", 8, "spec.containers", "must not be empty (at least one container)")],
    ),
    "env a string": (
        ENGINE + '      env: "oops"\n',
        [("env:", 7, "spec.containers[0].env", "must be a list of mappings, not a string")],
    ),
    "env null": (
        ENGINE + "      env:\n",
        [("env:", 7, "spec.containers[0].env", "must be a list of mappings, not null")],
    ),
    "an env entry a string": (
        ENGINE + "      env: [MODEL]\n",
        [("env:", 13, "spec.containers[0].env[0]", "must be a mapping, not a string")],
    ),
    "ports a number": (
        ENGINE + "      ports: 5\n",
        [("ports:", 7, "spec.containers[0].ports", "must be a list of mappings, not a number")],
    ),
    "metadata a list": (
        "metadata: []\n" + ENGINE,
        [("metadata:", 1, "metadata", "must be a mapping, not a list")],
    ),
    "resources a string": (
        ENGINE + '      resources: "x"\n',
        [("resources:", 7, "spec.containers[0].resources", "must be a mapping, not a string")],
    ),
    "resource limits a list": (
        ENGINE + "      resources: {limits: [1]}\n",
        [
            (
                "resources:",
                19,
                "spec.containers[0].resources.limits",
                "must be a mapping, not a list",
            )
        ],
    ),
    "affinity a string": (
        ENGINE + '  affinity: "x"\n',
        [("affinity:", 3, "spec.affinity", "must be a mapping, not a string")],
    ),
    "node selector terms a string": (
        ENGINE
        + "  affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: "
        + '{nodeSelectorTerms: "x"}}}\n',
        [
            (
                "affinity:",
                78,
                "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                ".nodeSelectorTerms",
                "must be a list of mappings, not a string",
            )
        ],
    ),
    "an init container without a mapping": (
        ENGINE + "  initContainers: [setup]\n",
        [("initContainers:", 20, "spec.initContainers[0]", "must be a mapping, not a string")],
    ),
    "an unquoted annotation": (
        "metadata:\n  annotations: {prometheus.io/port: 8000}\n" + ENGINE,
        [
            (
                "annotations:",
                17,
                "metadata.annotations.prometheus.io/port",
                "must be a string, not a number; quote it",
            )
        ],
    ),
    "a YAML date": (
        ENGINE + "      workingDir: 2024-01-01\n",
        [
            (
                "workingDir:",
                7,
                "spec.containers[0].workingDir",
                "a YAML date value is not JSON; quote it",
            )
        ],
    ),
    "a number as a key": (
        ENGINE + "      8000: http\n",
        [("8000:", 7, "spec.containers[0][8000]", "key must be a string, not a number; quote it")],
    ),
    "not a number": (
        ENGINE + "  terminationGracePeriodSeconds: .nan\n",
        [
            (
                "terminationGracePeriodSeconds:",
                3,
                "spec.terminationGracePeriodSeconds",
                "must be a finite number, not nan",
            )
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_template_the_renderer_cannot_use_is_invalid_where_it_breaks(
    example_repo: Path, case: str
) -> None:
    text, expected = CASES[case]
    path = example_repo / TEMPLATE
    path.write_text(text)
    assert problems(example_repo) == [
        f"{TEMPLATE}:{line_of(path, on_line)}:{column}: {field}: {message}"
        for on_line, column, field, message in expected
    ]


def test_the_repositorys_own_templates_are_usable(example_repo: Path) -> None:
    for path in sorted((example_repo / "templates").glob("*.yaml")):
        assert template_problems(parse_yaml(path.name, path.read_bytes()).data) == [], path


def test_validate_exits_1_naming_the_template_field_and_line(example_repo: Path) -> None:
    (example_repo / TEMPLATE).write_text(ENGINE + '      env: "oops"\n')
    result = CliRunner().invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1, result.output
    assert f"{TEMPLATE}:5:7: spec.containers[0].env: must be a list of mappings" in result.output
    assert "Traceback" not in result.output


def test_a_template_broken_everywhere_lists_a_bounded_number_of_problems() -> None:
    broken = {"spec": {"containers": [{"env": "x", "ports": 1}] * 100}}
    found = template_problems(broken)
    assert len(found) == MAX_TEMPLATE_PROBLEMS + 1
    assert found[-1] == (
        (),
        f"only the first {MAX_TEMPLATE_PROBLEMS} problems are listed; fix these first",
    )


@pytest.mark.parametrize(
    "text", ["spec: [broken\n", "- a list\n", "spec: {a: 1, a: 2}\n"], ids=["syntax", "list", "dup"]
)
def test_a_template_that_cannot_be_read_is_reported_once_however_many_services_use_it(
    example_repo: Path, text: str
) -> None:
    # vllm-decode is the decode template of three services (chat, svc-a, svc-b).
    (example_repo / TEMPLATE).write_text(text)
    found = problems(example_repo)
    assert len(found) == 1, found
    assert found[0].startswith(f"{TEMPLATE}:")
    result = CliRunner().invoke(app, ["validate", str(example_repo)])
    assert result.exit_code == 1
    assert result.output.rstrip().endswith("1 problem found")


def test_a_missing_template_is_one_problem_naming_every_service_that_uses_it(
    example_repo: Path,
) -> None:
    (example_repo / TEMPLATE).unlink()
    chat = example_repo / "policies/chat.yaml"
    # chat.yaml is read first; svc-a and svc-b name the same template.
    assert problems(example_repo) == [
        f"policies/chat.yaml:{line_of(chat, TEMPLATE)}:3: decode.template: template "
        f"'{TEMPLATE}': no such file (named by svc-a, svc-b too)"
    ]
