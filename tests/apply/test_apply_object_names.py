"""API URLs are built only from valid Kubernetes names: a name that could address
another object ('/', '..', encoded characters) is refused before any request."""

from __future__ import annotations

import re

import pytest

from reconciler.apply.kubeclient import deployments_path, leases_path, nodes_path, pods_path
from reconciler.apply.lease import LeaseElector
from reconciler.apply.statestore import ConfigMapStateStore, configmaps_path
from reconciler.dns1123 import (
    LABEL_VALUE_PATTERN,
    InvalidObjectName,
    label_key_problem,
    label_problem,
    label_value_problem,
    subdomain_problem,
)

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


@pytest.mark.parametrize(
    "key",
    ["gpu", "heteroscale.io/s2", "a.b-c/x_Y.z", "X9", "p/" + "n" * 63, "a" * 253 + "/n"],
)
def test_label_keys_that_kubernetes_accepts(key: str) -> None:
    assert label_key_problem(key) is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("bad key!", "name 'bad key!': letters, digits"),
        ("bad key!/x y", "prefix 'bad key!': lower-case letters"),
        ("a/b/c", "at most one '/'"),
        ("/x", "prefix '': empty"),
        ("x/", "name '': empty"),
        ("_x", "a letter or digit at both ends"),
        ("n" * 64, "64 characters, over 63"),
        ("a" * 254 + "/n", "254 characters, over 253"),
        ("Upper.io/x", "prefix 'Upper.io'"),
    ],
)
def test_label_keys_that_kubernetes_refuses_say_why(key: str, problem: str) -> None:
    assert problem in (label_key_problem(key) or "")


def test_label_values_may_be_empty_but_follow_the_name_rule() -> None:
    assert [label_value_problem(v) for v in ("", "v", "A-b_c.9")] == [None, None, None]
    assert "a letter or digit at both ends" in (label_value_problem("-v") or "")
    assert "letters, digits, '-', '_' and '.' only" in (label_value_problem("a b") or "")
    assert label_value_problem("x" * 64) == "64 characters, over 63"


@pytest.mark.parametrize("value", ["", "v", "A-b_c.9", "-v", "v.", "a b", "x" * 63, "ü"])
def test_the_schemas_label_value_pattern_says_what_the_check_says(value: str) -> None:
    assert (re.fullmatch(LABEL_VALUE_PATTERN, value) is not None) == (
        label_value_problem(value) is None
    )
