"""Object names and label values: always valid, stable, and distinct for distinct keys."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.apply import names

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
services = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", fullmatch=True)
group_ids = st.text(min_size=1, max_size=80)


def test_short_names_read_as_service_group_role() -> None:
    assert names.deployment_name("chat", "pod-a-0", "prefill") == "chat-pod-a-0-p"
    assert names.deployment_name("chat", "pod-a-0", "decode") == "chat-pod-a-0-d"


@given(services, group_ids, st.sampled_from(["prefill", "decode"]))
@settings(max_examples=150, deadline=None)
def test_deployment_names_are_valid_short_dns_labels_and_stable(
    service: str, group_id: str, role: str
) -> None:
    name = names.deployment_name(service, group_id, role)  # type: ignore[arg-type]
    assert DNS_LABEL.fullmatch(name) and len(name) <= names.MAX_OBJECT_NAME
    assert name == names.deployment_name(service, group_id, role)  # type: ignore[arg-type]


@given(services, group_ids, group_ids)
@settings(max_examples=150, deadline=None)
def test_different_groups_get_different_names(service: str, first: str, second: str) -> None:
    if first != second:
        assert names.deployment_name(service, first, "decode") != names.deployment_name(
            service, second, "decode"
        )


@given(st.text(max_size=120))
@settings(max_examples=150, deadline=None)
def test_label_values_are_valid_and_unchanged_when_already_valid(text: str) -> None:
    value = names.label_value(text)
    assert LABEL_VALUE.fullmatch(value) and len(value) <= 63
    if LABEL_VALUE.fullmatch(text) and len(text) <= 63:
        assert value == text


def test_the_ownership_selector_names_manager_and_cluster() -> None:
    assert (
        names.ownership_selector("prod-east")
        == "app.kubernetes.io/managed-by=heteroscale,heteroscale.io/cluster=prod-east"
    )
