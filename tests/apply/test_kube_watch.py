"""The list+watch cache of Pods and Nodes against a real API server: it follows
creates, updates and deletes, survives an API server restart, and relists on demand."""

from __future__ import annotations

import contextlib

import pytest
from kubetestkit import ControlPlane, wait_for

from reconciler.apply.kubeclient import NotFound, nodes_path
from reconciler.observe.kubernetes import WatchedCollection, parse_node

pytestmark = pytest.mark.kubernetes


def _node(name: str, gpus: str = "8") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"watch-test": "yes"}},
    }


def test_the_node_cache_follows_the_api_server_across_a_restart(
    control_plane: ControlPlane,
) -> None:
    admin = control_plane.client()
    cache = WatchedCollection(control_plane.client(), nodes_path(), parse_node, retry_delay_s=0.2)
    try:
        before = {n.name for n in cache.items()}
        assert cache.relists == 1
        admin.request("POST", nodes_path(), body=_node("watch-a"))
        wait_for(
            lambda: "watch-a" in {n.name for n in cache.items()}, what="the new node in the cache"
        )
        admin.merge_patch(
            nodes_path("watch-a"), {"metadata": {"labels": {"extra": "1"}}}, field_manager="t"
        )
        wait_for(
            lambda: any(
                n.name == "watch-a" and n.labels.get("extra") == "1" for n in cache.items()
            ),
            what="update",
        )
        assert cache.relists == 1, "served from the watch, not by listing again"

        control_plane.kill_apiserver()
        control_plane.restart_apiserver()
        admin.request("POST", nodes_path(), body=_node("watch-b"))
        admin.request("DELETE", nodes_path("watch-a"))
        wait_for(
            lambda: {n.name for n in cache.items()} == before | {"watch-b"},
            timeout_s=30,
            what="resumed watch",
        )

        relists = cache.relists  # the outage may have cost one relist already
        cache.invalidate()
        assert {n.name for n in cache.items()} == before | {
            "watch-b"
        } and cache.relists == relists + 1
    finally:
        cache.close()
        for name in ("watch-a", "watch-b"):
            with contextlib.suppress(NotFound):
                admin.request("DELETE", nodes_path(name))
