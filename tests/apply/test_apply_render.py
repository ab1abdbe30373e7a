"""Rendering a placement into Deployments (pure)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.apply import names
from reconciler.apply.render import RenderError, render_deployment, render_groups
from reconciler.desired import DesiredState, load_desired_state
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
