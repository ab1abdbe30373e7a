"""API URLs are built only from valid Kubernetes names: a name that could address
another object ('/', '..', encoded characters) is refused before any request."""

from __future__ import annotations

import pytest

from reconciler.apply.dns1123 import InvalidObjectName, label_problem, subdomain_problem
from reconciler.apply.kubeclient import deployments_path, leases_path, nodes_path, pods_path
from reconciler.apply.lease import LeaseElector
from reconciler.apply.statestore import ConfigMapStateStore, configmaps_path

TRAVERSALS = [
    "../../../namespaces/kube-system/pods/coredns",
    "..",
    "a/b",
    "a%2Fb",
    "coredns?dryRun=All",
    "Upper",
    "",
    "-leading",
    "x" * 254,
]


def test_valid_names_build_the_same_paths_as_before() -> None:
    assert pods_path("chat", "decode-0.x") == "/api/v1/namespaces/chat/pods/decode-0.x"
    assert deployments_path("chat") == "/apis/apps/v1/namespaces/chat/deployments"
    assert deployments_path() == "/apis/apps/v1/deployments"
    assert pods_path() == "/api/v1/pods"
    assert nodes_path("gpu-node-1.example") == "/api/v1/nodes/gpu-node-1.example"
    assert leases_path("heteroscale-system", "heteroscale") == (
        "/apis/coordination.k8s.io/v1/namespaces/heteroscale-system/leases/heteroscale"
    )
    assert configmaps_path("home", "state") == "/api/v1/namespaces/home/configmaps/state"


@pytest.mark.parametrize("bad", TRAVERSALS)
@pytest.mark.parametrize(
    "build", [pods_path, deployments_path, leases_path, configmaps_path], ids=lambda f: f.__name__
)
def test_an_object_name_that_is_not_dns_1123_is_refused_by_every_url_builder(
    build, bad: str
) -> None:
    with pytest.raises(InvalidObjectName, match="is not a valid Kubernetes name"):
        build("chat", bad)


@pytest.mark.parametrize("bad", [*TRAVERSALS, "a.b", "x" * 64])
@pytest.mark.parametrize(
    "build", [pods_path, deployments_path, leases_path, configmaps_path], ids=lambda f: f.__name__
)
def test_a_namespace_that_is_not_a_dns_1123_label_is_refused_by_every_url_builder(
    build, bad: str
) -> None:
    with pytest.raises(InvalidObjectName, match="namespace"):
        build(bad, "ok")


def test_the_limits_are_kubernetes_own() -> None:
    assert label_problem("a" * 63) is None and "over 63" in str(label_problem("a" * 64))
    assert subdomain_problem("a" * 253) is None and "over 253" in str(subdomain_problem("a" * 254))
    assert subdomain_problem("a..b") is not None and subdomain_problem("a.b") is None


def test_a_lease_in_a_namespace_like_a_path_is_refused_when_the_elector_is_made() -> None:
    # A round swallows its errors to keep the election alive: the name is checked once,
    # up front, so `--lease-namespace ../../x` fails at once instead of every round.
    with pytest.raises(InvalidObjectName, match=r"namespace '\.\./\.\./x'"):
        LeaseElector(None, "../../x", "heteroscale", "me")  # type: ignore[arg-type]
    with pytest.raises(InvalidObjectName, match="Lease name"):
        LeaseElector(None, "home", "a/b", "me")  # type: ignore[arg-type]


def test_a_state_store_in_a_namespace_like_a_path_is_refused_when_made() -> None:
    with pytest.raises(InvalidObjectName, match="namespace"):
        ConfigMapStateStore(None, "../../x", "me")  # type: ignore[arg-type]
