"""Two services of one cluster and namespace whose Deployments could get one name are
refused by validation, not by every cycle's renderer later."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from repo_edits import edit, line_of, problems

from reconciler.apply.names import deployment_name
from reconciler.desired import load_desired_state
from reconciler.desired.checks import group_labels
from reconciler.desired.models import Affinity
from reconciler.state import ROLES, group_id_prefix
from reconciler.topology import build_topology


def add_service(repo: Path, name: str, namespace: str, affinity: str) -> Path:
    """A copy of svc-a named ``name`` in ``namespace`` with ``affinity``."""
    text = (repo / "policies/svc-a.yaml").read_text()
    text = text.replace("name: svc-a\n", f"name: {name}\n", 1)
    text = text.replace("namespace: svc-a\n", f"namespace: {namespace}\n", 1)
    path = repo / f"policies/{name}.yaml"
    text = re.sub(r"(?m)^affinity: .*$", f"affinity: {affinity}", text)
    path.write_text(text)
    return path


def rename_switch(repo: Path, old: str, new: str) -> None:
    cluster = repo / "clusters/prod-east.yaml"
    cluster.write_text(cluster.read_text().replace(f"name: {old} ", f"name: {new} "))
    cluster.write_text(cluster.read_text().replace(f"[{old}]", f"[{new}]"))


def test_the_tested_case_renders_one_name_for_two_services() -> None:
    assert deployment_name("s", "g-x-g-y-1", "prefill") == "s-g-x-g-y-1-p"
    assert deployment_name("s-g-x", "g-y-1", "prefill") == "s-g-x-g-y-1-p"


def test_two_services_whose_s2_domains_give_one_deployment_name_are_refused(
    example_repo: Path,
) -> None:
    rename_switch(example_repo, "pod-a", "x-g-y")
    rename_switch(example_repo, "pod-b", "y")
    add_service(example_repo, "s-g-x", "shared", "s2")
    second = add_service(example_repo, "s", "shared", "s2")  # loaded after s-g-x.yaml
    assert problems(example_repo) == [
        f"policies/s.yaml:{line_of(second, 'name: s')}:1: name: service 's' in S2 switch "
        "'x-g-y' and service 's-g-x' in S2 switch 'y' would both name a Deployment "
        "'s-g-x-g-y-1-p' (cluster 'prod-east', namespace 'shared'): rename one of the "
        "services or domains"
    ]
    # In two namespaces the two names are two objects.
    edit(second, "namespace: shared", "namespace: other")
    load_desired_state(example_repo)


def test_a_subgroup_of_a_loose_service_can_collide_with_a_switch_of_another(
    example_repo: Path,
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    edit(cluster, "{name: rg-a,", "{name: rg-g-mp-b1,")
    add_service(example_repo, "svc-g-rg", "shared", "s1")
    second = add_service(example_repo, "svc", "shared", "cluster")  # loaded after svc-g-rg
    [found] = problems(example_repo)
    assert found == (
        f"policies/svc.yaml:{line_of(second, 'name: svc')}:1: name: service 'svc' in "
        "subgroup 'rg-g-mp-b1' and service 'svc-g-rg' in S1 switch 'mp-b1' would both name "
        "a Deployment 'svc-g-rg-g-mp-b1-1-p' (cluster 'prod-east', namespace 'shared'): "
        "rename one of the services or domains"
    )


def test_names_that_only_look_alike_pass(example_repo: Path) -> None:
    # 's' in S2 'y-1' gives 's-g-y-1-', a proper prefix of what 's-g-y-1' in subgroup
    # rg-a gives ('s-g-y-1-g-rg-a-'); the number after either never holds a '-'.
    rename_switch(example_repo, "pod-a", "y-1")
    add_service(example_repo, "s", "shared", "s2")
    add_service(example_repo, "s-g-y", "shared", "s1")
    add_service(example_repo, "s-g-y-1", "shared", "cluster")
    load_desired_state(example_repo)


@pytest.mark.parametrize("affinity", ["s1", "s2", "cluster"])
def test_group_labels_are_the_labels_placement_makes_group_ids_from(
    example_repo: Path, affinity: Affinity
) -> None:
    cluster = example_repo / "clusters/prod-east.yaml"
    # Declared subgroups over part of an S2: the rest of each is an implicit subgroup,
    # one of them named '-implicit' as a declared one has its S2's name.
    declared = "  - {name: pod-d, switches: [mp-d1]}\n  - {name: rg-c, switches: [mp-c1]}\n"
    edit(cluster, "  - {name: rg-c, switches: [pod-c], class: medium}\n", declared)
    edit(cluster, "  - {name: rg-d, switches: [pod-d], class: high}\n", "")
    spec = load_desired_state(example_repo).clusters["prod-east"]
    topology = build_topology(spec)
    domains = list(topology.domains(affinity))
    if affinity == "cluster":
        domains.append(topology.cluster_domain)
    assert set(group_labels(spec, affinity)) == {d.group_label for d in domains}
    assert "pod-d-implicit" in group_labels(spec, "cluster")
    # Every name a label gives starts with the prefix the check compares.
    for label in group_labels(spec, affinity):
        for role in ROLES:
            name = deployment_name("svc", f"{group_id_prefix(label)}12", role)
            assert name.startswith(f"svc-{group_id_prefix(label)}")
