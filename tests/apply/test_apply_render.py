"""Rendering a placement into Deployments (pure)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.apply import names
from reconciler.apply.render import RenderError, render_deployment, render_groups
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.templates import template_problems
from reconciler.state import DeploymentGroup, GroupRole

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state() -> DesiredState:
    return load_desired_state(REPO)


def _group(
    service: str = "chat",
    domain: str = "pod-c",
    prefill: tuple[str, int] = ("h800", 2),
    decode: tuple[str, int] = ("h20", 6),
    group_id: str = "pod-c-0",
) -> DeploymentGroup:
    return DeploymentGroup(
        service, "prod-east", group_id, domain, "rg-c", GroupRole(*prefill), GroupRole(*decode)
    )


def _affinity_terms(manifest: dict) -> list[list[dict]]:
    required = manifest["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    return [t["matchExpressions"] for t in required["nodeSelectorTerms"]]


def test_one_deployment_per_group_role_with_replicas_gpus_model_and_labels(
    state: DesiredState,
) -> None:
    rendered = render_groups(
        [_group()], state.policies, state.clusters["prod-east"], state.templates
    )
    assert sorted(str(k) for k in rendered) == ["chat/chat-pod-c-0-d", "chat/chat-pod-c-0-p"]
    decode = next(w for w in rendered.values() if w.role == "decode")
    manifest = decode.manifest
    assert (manifest["apiVersion"], manifest["kind"]) == ("apps/v1", "Deployment")
    assert manifest["spec"]["replicas"] == 6
    engine = manifest["spec"]["template"]["spec"]["containers"][0]
    assert (
        engine["resources"]["requests"]["nvidia.com/gpu"]
        == "4"
        == engine["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert {"name": "MODEL_NAME", "value": "llama-3.1-70b"} in engine["env"]
    assert engine["ports"][0]["protocol"] == "TCP"
    labels = manifest["metadata"]["labels"]
    assert labels[names.MANAGED_BY_LABEL] == "heteroscale"
    assert (labels[names.SERVICE_LABEL], labels[names.GROUP_LABEL], labels[names.ROLE_LABEL]) == (
        "chat",
        "pod-c-0",
        "decode",
    )
    pod_labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[names.SERVING_LABEL] == "true"
    selector = manifest["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the selector matches the pod template"
    assert (
        manifest["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    ), "template kept"


def test_node_affinity_pins_the_domain_switch_and_the_gpu_type(state: DesiredState) -> None:
    cluster = state.clusters["prod-east"]
    s2 = render_deployment(
        _group(domain="pod-c"), "decode", state.policies["chat"], cluster, state.templates
    )
    assert _affinity_terms(s2.manifest) == [
        [
            {"key": cluster.labels.s2, "operator": "In", "values": ["pod-c"]},
            {"key": cluster.labels.gpu_type, "operator": "In", "values": ["h20"]},
        ]
    ]
    s1 = render_deployment(
        _group(domain="mp-d1", decode=("h20", 2)),
        "decode",
        state.policies["chat"],
        cluster,
        state.templates,
    )
    assert _affinity_terms(s1.manifest)[0][0] == {
        "key": cluster.labels.s1,
        "operator": "In",
        "values": ["mp-d1"],
    }
    loose = render_deployment(
        _group(domain="prod-east"), "prefill", state.policies["chat"], cluster, state.templates
    )
    assert _affinity_terms(loose.manifest) == [
        [{"key": cluster.labels.gpu_type, "operator": "In", "values": ["h800"]}]
    ]


def test_gpu_type_label_uses_the_catalogue_node_label(state: DesiredState) -> None:
    cluster = state.clusters["prod-east"]
    relabelled = cluster.model_copy(
        update={
            "gpu_types": {
                **cluster.gpu_types,
                "h20": cluster.gpu_types["h20"].model_copy(update={"node_label": "NVIDIA-H20"}),
            }
        }
    )
    workload = render_deployment(
        _group(), "decode", state.policies["chat"], relabelled, state.templates
    )
    assert _affinity_terms(workload.manifest)[0][1]["values"] == ["NVIDIA-H20"]


def test_template_affinity_terms_are_kept_and_narrowed(state: DesiredState) -> None:
    path = state.policies["chat"].decode.template
    template = json.loads(json.dumps(state.templates[path]))
    template["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                ]
            }
        }
    }
    workload = render_deployment(
        _group(), "decode", state.policies["chat"], state.clusters["prod-east"], {path: template}
    )
    terms = _affinity_terms(workload.manifest)
    assert len(terms) == 2 and all(len(t) == 3 and t[0]["key"] == "zone" for t in terms)


def test_rendering_is_deterministic_and_does_not_touch_the_templates(state: DesiredState) -> None:
    before = json.dumps(state.templates, sort_keys=True)
    first = render_groups([_group()], state.policies, state.clusters["prod-east"], state.templates)
    second = render_groups([_group()], state.policies, state.clusters["prod-east"], state.templates)
    assert {k: w.manifest for k, w in first.items()} == {k: w.manifest for k, w in second.items()}
    assert json.dumps(state.templates, sort_keys=True) == before
    # Only the replicas differ between sizes: the template hash is size-independent.
    bigger = render_groups(
        [_group(decode=("h20", 9))], state.policies, state.clusters["prod-east"], state.templates
    )
    assert {w.template_hash for w in first.values()} == {w.template_hash for w in bigger.values()}


def test_roles_with_zero_instances_render_nothing(state: DesiredState) -> None:
    rendered = render_groups(
        [_group(prefill=("h800", 0))], state.policies, state.clusters["prod-east"], state.templates
    )
    assert [w.role for w in rendered.values()] == ["decode"]


def test_errors_name_what_to_fix(state: DesiredState) -> None:
    cluster = state.clusters["prod-east"]
    with pytest.raises(RenderError, match="domain 'nowhere'"):
        render_groups([_group(domain="nowhere")], state.policies, cluster, state.templates)
    with pytest.raises(RenderError, match="GPU type 'b200'"):
        render_groups([_group(decode=("b200", 1))], state.policies, cluster, state.templates)
    path = state.policies["chat"].decode.template
    with pytest.raises(RenderError, match=r"spec\.containers"):
        render_deployment(_group(), "decode", state.policies["chat"], cluster, {path: {"spec": {}}})
    with pytest.raises(RenderError, match="no policy"):
        render_groups([_group(service="ghost")], state.policies, cluster, state.templates)


def _engine(**fields: object) -> dict:
    return {"spec": {"containers": [{"name": "engine", "image": "x", **fields}]}}


MALFORMED: dict[str, tuple[object, str]] = {
    "just foo": ({"foo": "bar"}, "foo: unknown key 'foo'"),
    "no container": ({"spec": {"containers": []}}, "spec.containers: must not be empty"),
    "env a string": (_engine(env="oops"), r"spec.containers\[0\].env: must be a list of mappings"),
    "ports a number": (_engine(ports=5), r"spec.containers\[0\].ports: must be a list of mappings"),
    "metadata a list": ({**_engine(), "metadata": []}, "metadata: must be a mapping, not a list"),
    "resources a string": (
        _engine(resources="x"),
        r"spec.containers\[0\].resources: must be a mapping, not a string",
    ),
    "affinity a string": (
        {"spec": {**_engine()["spec"], "affinity": "x"}},  # type: ignore[dict-item]
        "spec.affinity: must be a mapping, not a string",
    ),
    "not a mapping": (["spec"], "must be a mapping"),
}


def _render_chat_decode(state: DesiredState, template: dict[str, Any]) -> object:
    """chat's decode Deployment rendered from ``template`` in place of its own."""
    path = state.policies["chat"].decode.template
    return render_deployment(
        _group(), "decode", state.policies["chat"], state.clusters["prod-east"], {path: template}
    )


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_template_is_a_render_error_naming_the_template_and_field(
    state: DesiredState, case: str
) -> None:
    template, field_and_message = MALFORMED[case]
    path = state.policies["chat"].decode.template
    with pytest.raises(
        RenderError, match=f"service chat: decode pod template {path}: .*{field_and_message}"
    ):
        _render_chat_decode(state, template)


# Values of every YAML shape, for the slots of a template the renderer reads or writes.
_ANY_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3) | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=4,
)
_SLOTS: list[tuple[str, ...]] = [
    ("metadata",),
    ("metadata", "labels"),
    ("metadata", "annotations"),
    ("spec",),
    ("spec", "containers"),
    ("spec", "containers", "0"),
    ("spec", "containers", "0", "env"),
    ("spec", "containers", "0", "ports"),
    ("spec", "containers", "0", "resources"),
    ("spec", "containers", "0", "resources", "limits"),
    ("spec", "initContainers"),
    ("spec", "affinity"),
    ("spec", "affinity", "nodeAffinity"),
    ("spec", "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution"),
    (
        "spec",
        "affinity",
        "nodeAffinity",
        "requiredDuringSchedulingIgnoredDuringExecution",
        "nodeSelectorTerms",
    ),
]


def _with(template: dict, slot: tuple[str, ...], value: object) -> dict:
    """``template`` with ``value`` placed at ``slot`` (a "0" step is the first list item)."""
    root = copy.deepcopy(template)
    node: Any = root
    for step in slot[:-1]:
        if step == "0":
            if not isinstance(node, list) or not node:
                return root
            node = node[0]
        else:
            if not isinstance(node, dict):
                return root
            node = node.setdefault(step, [{}] if step in ("containers",) else {})
    last = slot[-1]
    if last == "0" and isinstance(node, list) and node:
        node[0] = value
    elif isinstance(node, dict):
        node[last] = value
    return root


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(st.tuples(st.sampled_from(_SLOTS), _ANY_VALUE), min_size=1, max_size=3))
def test_any_template_renders_or_is_a_render_error_and_validation_agrees(
    state: DesiredState, edits: list[tuple[tuple[str, ...], object]]
) -> None:
    """Whatever a template holds where the renderer looks: it renders, or the renderer
    raises a RenderError (never an AttributeError or TypeError), and the loader's
    check accepts exactly the templates that render."""
    path = state.policies["chat"].decode.template
    template = state.templates[path]
    for slot, value in edits:
        template = _with(template, slot, value)
    try:
        _render_chat_decode(state, template)
    except RenderError:
        assert template_problems(template) != []
    else:
        assert template_problems(template) == []
