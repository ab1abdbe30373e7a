"""The values a field-ownership conflict names, read at its server-side apply field
paths (``backend._value_at``): dotted label and annotation keys, list items by their
selector, and paths that name nothing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.apply.backend import _path_parts, _value_at

DEPLOYMENT: dict[str, Any] = {
    "metadata": {"annotations": {"heteroscale.io/applied-hash": "abc"}},
    "spec": {
        "replicas": 3,
        "template": {
            "spec": {
                "containers": [
                    {"name": "sidecar", "image": "proxy:1"},
                    {
                        "name": "engine",
                        "image": "vllm:v1",
                        "ports": [{"containerPort": 8000, "protocol": "TCP"}],
                    },
                    {"name": "a.b", "image": "dotted:1"},
                ]
            }
        },
    },
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (".spec.replicas", 3),
        (".metadata.annotations.heteroscale.io/applied-hash", "abc"),
        ('.spec.template.spec.containers[name="engine"].image', "vllm:v1"),
        ('.spec.template.spec.containers[name="a.b"].image', "dotted:1"),
        (
            '.spec.template.spec.containers[name="engine"].ports'
            '[containerPort=8000,protocol="TCP"].protocol',
            "TCP",
        ),
    ],
)
def test_a_conflicts_field_path_reads_the_value_it_names(path: str, value: Any) -> None:
    # A container's image read "None" where the selector was taken for a key.
    assert _value_at(DEPLOYMENT, path) == value


@pytest.mark.parametrize(
    "path",
    [
        '.spec.template.spec.containers[name="gone"].image',
        ".spec.template.spec.containers[].image",
        ".spec.template.spec.containers[name=].image",
        '.spec.replicas[name="x"]',
        ".spec.nothing",
        '.spec.template.spec.containers[name="engine"',
    ],
)
def test_a_path_that_names_nothing_reads_none(path: str) -> None:
    assert _value_at(DEPLOYMENT, path) is None


@given(st.text(max_size=200))
def test_any_path_reads_a_value_or_none_and_never_raises(path: str) -> None:
    _value_at(DEPLOYMENT, path)
    assert all(part for part in _path_parts(path))
