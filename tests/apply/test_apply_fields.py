"""Field-by-field comparison (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.apply.fields import client_side_changes, field_changes, flatten


def test_named_lists_are_keyed_by_name() -> None:
    obj = {
        "spec": {
            "containers": [{"name": "engine", "env": [{"name": "A", "value": "1"}]}],
            "args": ["x", "y"],
        }
    }
    assert flatten(obj) == {
        "spec.containers[engine].env[A].value": "1",
        "spec.args[0]": "x",
        "spec.args[1]": "y",
    }


def test_field_changes_ignore_server_bookkeeping_and_status() -> None:
    live = {
        "metadata": {"name": "d", "resourceVersion": "1", "managedFields": [1]},
        "spec": {"replicas": 2},
        "status": {"readyReplicas": 2},
    }
    result = {
        "metadata": {"name": "d", "resourceVersion": "2", "managedFields": [2]},
        "spec": {"replicas": 3},
        "status": {},
    }
    assert [str(c) for c in field_changes(live, result)] == ["spec.replicas: 2 -> 3"]


def test_an_inserted_env_var_is_one_change() -> None:
    before = {
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "env": [{"name": "A", "value": "1"}, {"name": "C", "value": "3"}],
                }
            ]
        }
    }
    after = {
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "env": [
                        {"name": "A", "value": "1"},
                        {"name": "B", "value": "2"},
                        {"name": "C", "value": "3"},
                    ],
                }
            ]
        }
    }
    assert [str(c) for c in field_changes(before, after)] == [
        "spec.containers[engine].env[B].value: + '2'"
    ]


def test_client_side_changes_ignore_server_defaults_and_normalise_numbers() -> None:
    desired = {
        "metadata": {"name": "d", "labels": {"a": "1"}},
        "spec": {
            "replicas": 3,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "engine",
                            "image": "v2",
                            "resources": {"limits": {"nvidia.com/gpu": "4"}},
                        }
                    ]
                }
            },
        },
    }
    live = {
        "metadata": {"name": "d", "labels": {"a": "1", "extra": "x"}, "uid": "u"},
        "spec": {
            "replicas": 3,
            "revisionHistoryLimit": 10,
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "engine",
                            "image": "v1",
                            "imagePullPolicy": "IfNotPresent",
                            "resources": {"limits": {"nvidia.com/gpu": 4}},
                        }
                    ],
                    "dnsPolicy": "ClusterFirst",
                }
            },
        },
    }
    assert [str(c) for c in client_side_changes(live, desired)] == [
        "spec.template.spec.containers[engine].image: 'v1' -> 'v2'"
    ]
    assert [
        str(c) for c in client_side_changes(live, live | {"spec": {**live["spec"], "replicas": 5}})
    ] == ["spec.replicas: 3 -> 5"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)
objects = st.fixed_dictionaries(
    {
        "metadata": st.dictionaries(st.sampled_from(["labels", "name"]), json_values, max_size=2),
        "spec": json_values,
    }
)


@given(objects)
@settings(max_examples=200, deadline=None)
def test_an_object_never_differs_from_itself(obj: dict) -> None:
    assert field_changes(obj, obj) == ()
    assert client_side_changes(obj, obj) == ()


@given(objects, objects)
@settings(max_examples=200, deadline=None)
def test_no_reported_change_means_equal_flattened_views(a: dict, b: dict) -> None:
    if not field_changes(a, b):
        assert flatten({"metadata": a["metadata"], "spec": a["spec"]}) == flatten(
            {"metadata": b["metadata"], "spec": b["spec"]}
        )


def test_a_positional_list_set_shorter_drops_the_live_tail() -> None:
    # Applying [a] where [a, b] runs removes b: the report says so, and contains() agrees.
    live = {"metadata": {}, "spec": {"args": ["--a", "--b"], "env": {}}}
    desired = {"metadata": {}, "spec": {"args": ["--a"], "env": {"X": "1"}}}
    changes = client_side_changes(live, desired)
    assert [(c.path, c.before, c.after) for c in changes] == [
        ("spec.env.X", None, "1"),
        ("spec.args[1]", "--b", None),
    ]
    from reconciler.apply.fields import contains

    assert not contains(live, desired)


@given(objects, objects)
@settings(max_examples=300, deadline=None)
def test_contains_agrees_with_the_client_side_report(live: dict, desired: dict) -> None:
    from reconciler.apply.fields import contains

    assert contains(live, desired) == (not client_side_changes(live, desired))
