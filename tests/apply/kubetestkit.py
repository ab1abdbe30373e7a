"""Helpers for the Kubernetes integration tests: the control plane, a small desired
state per test (its own cluster name, label keys and namespace, so tests sharing one
API server never see each other's objects), fake GPU Nodes, hand-built plans."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.apply.kubeclient import (
    KubeClient,
    NotFound,
    ResourceConflict,
    nodes_path,
    pods_path,
)
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.models import ClusterSpec
from reconciler.observe.base import Observation
from reconciler.placement.base import PlacementResult
from reconciler.plan import Plan, diff_groups
from reconciler.state import ROLES, DeploymentGroup, GroupRole


@dataclass
class ControlPlane:
    scripts: Path
    state_dir: Path
    bin_dir: Path
    kubeconfig: Path

    @classmethod
    def start(cls, scripts: Path, state_dir: Path, bin_dir: Path) -> ControlPlane:
        subprocess.run(
            ["bash", str(scripts / "start.sh"), str(state_dir), str(bin_dir)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ},
        )
        return cls(scripts, state_dir, bin_dir, state_dir / "kubeconfig")

    def client(self, **kwargs: Any) -> KubeClient:
        return KubeClient.from_kubeconfig(str(self.kubeconfig), **kwargs)

    def stop(self) -> None:
        subprocess.run(["bash", str(self.scripts / "stop.sh"), str(self.state_dir)], check=False)

    def kill_apiserver(self) -> None:
        pid = int((self.state_dir / "apiserver.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def restart_apiserver(self) -> None:
        subprocess.run(
            ["bash", str(self.state_dir / "apiserver.sh")], check=True, capture_output=True
        )

    @property
    def ca_file(self) -> str:
        return str(self.state_dir / "pki" / "ca.crt")


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


# ------------------------------------------------------------------ desired state

POLICY = """\
name: {service}
model: {{name: test-model, params_b: 8, kv_bytes_per_token: 131072}}
cluster: {cluster}
namespace: {namespace}
slo: {{ttft_ms: 1000, tbt_ms: 50}}
prefill: {{gpus_per_instance: 2, gpu_types: {{h800: 1.0}}, template: templates/prefill.yaml, min_instances: 1, max_instances: 40}}
decode: {{gpus_per_instance: 1, gpu_types: {{h20: 1.0, h800: 0.5}}, template: templates/decode.yaml, min_instances: 1, max_instances: 80}}
pd_ratio: {{target: "1:2", min: "1:8", max: "2:1"}}
deployment_group: {{prefill_instances: 2, decode_instances: 4}}
affinity: {affinity}
scaling: {{target_per_instance: 1000}}
"""

# A cluster file's name, labels, GPU types and defaults, before its switches (``s2:``):
# ``str.format`` it with ``cluster`` and ``prefix`` as ``CLUSTER``.
CLUSTER_HEAD = """\
name: {cluster}
labels: {{s2: {prefix}/s2, s1: {prefix}/s1, s0: {prefix}/s0, gpu_type: {prefix}/gpu-type}}
gpu_types:
  h800: {{memory_gib: 80, bf16_tflops: 989, memory_bandwidth_gbps: 3350}}
  h20: {{memory_gib: 96, bf16_tflops: 148, memory_bandwidth_gbps: 4000, node_label: nvidia-h20}}
defaults: {{gpus_per_node: 8}}
"""

CLUSTER = (
    CLUSTER_HEAD
    + """\
s2:
  - name: {cluster}-pa
    defaults: {{gpu_type: h800}}
    s1: [{{name: {cluster}-pa1, s0: [{{name: {cluster}-la1, nodes: "{cluster}-h800-[1-2]"}}]}}]
  - name: {cluster}-pb
    defaults: {{gpu_type: h20}}
    s1: [{{name: {cluster}-pb1, s0: [{{name: {cluster}-lb1, nodes: "{cluster}-h20-[1-2]"}}]}}]
"""
)

TEMPLATE = """\
metadata:
  annotations: {{prometheus.io/scrape: "true"}}
spec:
  terminationGracePeriodSeconds: 0
  containers:
    - name: engine
      image: example.invalid/engine:{role}
      args: ["serve", "$(MODEL_NAME)"]
"""


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo``; its stdout, stripped."""
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    """Commit everything in ``repo``; the new commit's hash."""
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


def make_desired_state(
    root: Path, cluster: str, services: Iterable[str] = ("svc",), affinity: str = "s2"
) -> DesiredState:
    """A one-cluster desired state in ``root``: cluster ``cluster`` (2 H800 + 2 H20
    nodes under two S2 switches), one policy per service, namespace = cluster name."""
    (root / "clusters").mkdir(parents=True, exist_ok=True)
    (root / "policies").mkdir(exist_ok=True)
    (root / "templates").mkdir(exist_ok=True)
    prefix = f"{cluster}.test"
    (root / "clusters" / f"{cluster}.yaml").write_text(
        CLUSTER.format(cluster=cluster, prefix=prefix)
    )
    for service in services:
        (root / "policies" / f"{service}.yaml").write_text(
            POLICY.format(service=service, cluster=cluster, namespace=cluster, affinity=affinity)
        )
    for role in ("prefill", "decode"):
        (root / "templates" / f"{role}.yaml").write_text(TEMPLATE.format(role=role))
    return load_desired_state(root)


def cluster_for_cli(
    control_plane: ControlPlane, root: Path, cluster: str, services: Iterable[str] = ("svc",)
) -> tuple[DesiredState, list[str]]:
    """``make_desired_state`` in ``root``, its namespace and nodes on the real API
    server, and the options a command needs to act on it (greedy placement)."""
    state = make_desired_state(root, cluster, services)
    client = control_plane.client()
    ensure_namespace(client, cluster)
    create_nodes(client, state.clusters[cluster])
    options = [
        "--repo",
        str(root),
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--placer",
        "greedy",
    ]
    return state, options


def ensure_namespace(client: KubeClient, name: str) -> None:
    with contextlib.suppress(ResourceConflict):
        client.request(
            "POST",
            "/api/v1/namespaces",
            body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )


def service_account_client(admin: KubeClient, namespace: str, account: str) -> KubeClient:
    """A client authenticated as ServiceAccount ``account`` of ``namespace`` (created
    here), by a bound token from the TokenRequest API (ServiceAccount admission is off
    in the test control plane, so no token Secret is made for it): RBAC grants it what
    the test binds to it, nothing else."""
    admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
    )
    response = admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    return admin.with_token(
        response["status"]["token"], name=f"system:serviceaccount:{namespace}:{account}"
    )


def grant_role(
    admin: KubeClient, namespace: str, name: str, account: str, rules: list[dict[str, Any]]
) -> None:
    """A Role ``name`` of ``rules`` in ``namespace``, bound to ServiceAccount ``account``
    there (made by ``service_account_client``)."""
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    admin.request(
        "POST",
        f"{rbac}/roles",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": namespace},
            "rules": rules,
        },
    )
    admin.request(
        "POST",
        f"{rbac}/rolebindings",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )


def create_nodes(
    client: KubeClient,
    spec: ClusterSpec,
    skip: Iterable[str] = (),
    label_overrides: dict[str, dict[str, str]] | None = None,
) -> None:
    """Fake GPU Nodes for every node of the cluster file (no kubelet: plain objects
    with topology labels and ``nvidia.com/gpu`` capacity)."""
    overrides = label_overrides or {}
    for node in spec.nodes:
        if node.name in skip:
            continue
        labels = {**spec.node_labels(node), **overrides.get(node.name, {})}
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
        }
        with contextlib.suppress(ResourceConflict):
            client.request("POST", nodes_path(), body=body)
        capacity = {"nvidia.com/gpu": str(node.gpus), "cpu": "64", "memory": "512Gi", "pods": "110"}
        client.request(
            "PATCH",
            nodes_path(node.name) + "/status",
            body={
                "status": {
                    "capacity": capacity,
                    "allocatable": capacity,
                    "conditions": [
                        {"type": "Ready", "status": "True", "reason": "Fake", "message": "test"}
                    ],
                }
            },
            content_type="application/merge-patch+json",
        )


def group(
    service: str,
    cluster: str,
    group_id: str,
    domain: str,
    prefill: tuple[str, int],
    decode: tuple[str, int],
) -> DeploymentGroup:
    return DeploymentGroup(
        service=service,
        cluster=cluster,
        group_id=group_id,
        domain=domain,
        subgroup=None,
        prefill=GroupRole(prefill[0], prefill[1]),
        decode=GroupRole(decode[0], decode[1]),
    )


def hand_plan(
    state: DesiredState, cluster: str, observation: Observation, groups: Iterable[DeploymentGroup]
) -> Plan:
    groups = tuple(groups)
    gpus = {
        (p.name, role): p.role(role).gpus_per_instance
        for p in state.policies_for(cluster)
        for role in ROLES
    }
    return Plan(
        cluster=cluster,
        decisions={},
        placement=PlacementResult(cluster=cluster, groups=groups),
        changes=diff_groups(observation.fleet, groups, gpus),
        current=observation.fleet,
    )


def list_deployments(client: KubeClient, namespace: str) -> dict[str, dict]:
    items = client.list(f"/apis/apps/v1/namespaces/{namespace}/deployments")
    return {d["metadata"]["name"]: d for d in items}


def list_pods(client: KubeClient, namespace: str, selector: str | None = None) -> list[dict]:
    return [
        p
        for p in client.list(pods_path(namespace), label_selector=selector)
        if not p["metadata"].get("deletionTimestamp")
    ]


def mark_ready(client: KubeClient, namespace: str, pod: dict) -> None:
    """What a kubelet would report for a started, healthy Pod."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now},
        ],
        "startTime": now,
    }
    with contextlib.suppress(NotFound):
        client.request(
            "PATCH",
            pods_path(namespace, pod["metadata"]["name"]) + "/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )


def force_delete_pods(client: KubeClient, namespace: str) -> None:
    for pod in client.list(pods_path(namespace)):
        with contextlib.suppress(NotFound):
            client.request(
                "DELETE",
                pods_path(namespace, pod["metadata"]["name"]),
                body={"gracePeriodSeconds": 0},
            )


# ------------------------------------------------------------- applying YAML files

_RESOURCES = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterroles",
        False,
    ),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
        False,
    ),
    ("rbac.authorization.k8s.io/v1", "Role"): ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "rolebindings",
        True,
    ),
}


def object_path(obj: dict) -> str:
    base, plural, namespaced = _RESOURCES[(obj["apiVersion"], obj["kind"])]
    meta = obj["metadata"]
    if namespaced:
        return f"{base}/namespaces/{meta.get('namespace', 'default')}/{plural}/{meta['name']}"
    return f"{base}/{plural}/{meta['name']}"


def apply_yaml_file(client: KubeClient, path: Path) -> list[dict]:
    """Server-side apply every document of a YAML file (like ``kubectl apply
    --server-side``); returns the applied objects."""
    from ruamel.yaml import YAML

    documents = [d for d in YAML(typ="safe").load_all(path.read_text()) if d]
    out = []
    for doc in documents:
        out.append(client.apply(object_path(doc), doc, field_manager="test-kubectl"))
    return out
