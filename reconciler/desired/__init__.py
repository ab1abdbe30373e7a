"""Desired state: models, loading with located errors, sources (directory or Git revision)."""

from reconciler.desired.loader import DesiredState, load_desired_state, load_from_source
from reconciler.desired.models import ClusterSpec, Node, ServicePolicy

__all__ = [
    "ClusterSpec",
    "DesiredState",
    "Node",
    "ServicePolicy",
    "load_desired_state",
    "load_from_source",
]
