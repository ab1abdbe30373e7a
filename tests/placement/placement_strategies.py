"""Hypothesis strategies for small random placement cases, shared by the property
tests: fleets of 2-3 S2 pods in the three subgroup styles, services with random
shapes, preferences, affinities and priorities, and requests that start from a
running state the greedy scheduler placed."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from placement_fixtures import cluster, policy, request, s1

from reconciler.placement.greedy import GreedyPlacer

TYPES = ("h800", "h20")
SETTINGS = settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fleets(draw):
    """2-3 S2 pods; each pod one type, one type per S1, or types mixed under each S1."""
    pods = {}
    for p in range(draw(st.integers(2, 3))):
        style = draw(st.sampled_from(["homogeneous", "per_s1", "mixed"]))
        base = draw(st.sampled_from(TYPES))
        s1s = []
        for i in range(draw(st.integers(1, 2))):
            nodes = draw(st.integers(1, 3))
            if style == "mixed":
                leaves = [(f"l{p}{i}{t}", f"n{p}{i}{t}-[1-{nodes}]", t) for t in TYPES]
            else:
                gpu = base if style == "homogeneous" else TYPES[i % 2]
                leaves = [(f"l{p}{i}", f"n{p}{i}-[1-{nodes}]", gpu)]
            s1s.append(s1(f"s{p}{i}", *leaves))
        pods[f"p{p}"] = s1s
    return cluster(pods, gpus_per_node=draw(st.sampled_from([4, 8])))


@st.composite
def services(draw, count):
    out = []
    for i in range(count):

        def role():
            types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=2, unique=True))
            weights = {t: draw(st.sampled_from([1.0, 0.5, 0.9])) for t in types}
            return (draw(st.sampled_from([1, 2, 4])), weights)

        out.append(
            policy(
                f"svc{i}",
                prefill=role(),
                decode=role(),
                shape=(draw(st.integers(1, 3)), draw(st.integers(1, 4))),
                affinity=draw(st.sampled_from(["s1", "s2", "cluster"])),
                priority=draw(st.sampled_from([100, 200, 300])),
            )
        )
    return out


@st.composite
def requests(draw):
    spec = draw(fleets())
    pols = draw(services(draw(st.integers(1, 3))))
    start = {p.name: (draw(st.integers(0, 4)), draw(st.integers(0, 6))) for p in pols}
    running = GreedyPlacer().place(request(spec, pols, start)).groups
    targets = {p.name: (draw(st.integers(0, 6)), draw(st.integers(0, 8))) for p in pols}
    return spec, pols, targets, running
