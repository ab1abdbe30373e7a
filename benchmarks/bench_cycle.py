"""One full reconcile cycle for the 20,000-GPU fleet against a real API server.

Scenario (deterministic from --seed):
1. setup (not timed): the fleet of benchmarks/fleetgen.py (2,500 Nodes x 8 GPUs,
   100 services), a real kube-apiserver v1.20 + etcd started by scripts/k8s/start.sh
   (no controller manager), the 2,500 Nodes created with their topology labels and GPU
   capacity, and a running state of about --fill of the fleet placed by CP-SAT, applied
   with the reconciler's own applier (server-side apply), plus one Pod per instance
   bound to the node the placement chose (what the ReplicaSets and the scheduler would
   have made; the observer reads instance locations from them);
2. each timed cycle: load the desired state from disk (keeping the unchanged objects,
   as the loop does: ``reuse_unchanged``), observe the cluster from the
   API server (Deployments, Pods, Nodes -> FleetState + drift), fetch metrics (a
   synthetic source: every service's decode TPS near its target, --change of them
   moved by +-25% so the policy scales them), decide (``--autoscaler``: by default the
   paper's policy, which scales on the generated policies' targets; ``heteroscale``,
   the planner, sizes from the model for the length histograms the metrics then carry,
   and the running state is what it asked at the base load), place
   (CP-SAT, default options: 2 s limit, 2 workers), and diff (server-side dry run of
   every Deployment that could change; the others are proven unchanged locally).

Observe runs as ``heteroscale run`` does it: Deployments are listed every cycle,
Pods and Nodes come from a list+watch cache, so cycle 1 lists everything (cold) and
later cycles read Pods and Nodes from memory (warm). ``--no-watch`` lists all three
every cycle (as one-shot ``plan``/``apply`` do).

Prints the time of every phase per cycle and the median over the warm cycles (the
target is a full cycle under 5 s, excluding API-server latency outliers).

    python benchmarks/bench_cycle.py [--cycles 5] [--seed 0] [--fill 0.65] [--change 0.1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from benchmarks.bench_policy import length_buckets
from benchmarks.fleetgen import write_large_fleet
from reconciler.apply.backend import ApplyOptions, KubernetesBackend
from reconciler.apply.kubeclient import KubeClient, ResourceConflict, nodes_path, pods_path
from reconciler.apply.render import render_groups
from reconciler.cycle import plan_cluster
from reconciler.desired import DesiredState, load_desired_state
from reconciler.desired.loader import reuse_unchanged
from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.placement.base import PlacementOptions, PlacementRequest
from reconciler.placement.cpsat import CpSatPlacer
from reconciler.plan import Plan, diff_groups
from reconciler.policy import make_autoscaler
from reconciler.policy.base import Autoscaler, DecisionInput, PolicyHistory
from reconciler.state import (
    ROLES,
    DeploymentGroup,
    RoleCount,
    Sample,
    ServiceFleet,
    ServiceMetrics,
    Targets,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "k8s"


def start_control_plane(state_dir: Path, bin_dir: Path) -> Path:
    env = {**os.environ, "HETEROSCALE_K8S_CONTROLLERS": "0"}
    subprocess.run(
        ["bash", str(SCRIPTS / "start.sh"), str(state_dir), str(bin_dir)],
        check=True,
        env=env,
        capture_output=True,
    )
    return state_dir / "kubeconfig"


def create_namespaces_and_nodes(
    client: KubeClient, spec: ClusterSpec, namespaces: set[str]
) -> None:
    for name in sorted(namespaces):
        with contextlib.suppress(ResourceConflict):
            client.request(
                "POST",
                "/api/v1/namespaces",
                body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            )

    def create(node_index: int) -> None:
        node = spec.nodes[node_index]
        labels = {
            spec.labels.s2: node.s2,
            spec.labels.s1: node.s1,
            spec.labels.s0: node.s0,
            spec.labels.gpu_type: spec.gpu_types[node.gpu_type].node_label or node.gpu_type,
            **node.labels,
        }
        with contextlib.suppress(ResourceConflict):
            client.request(
                "POST",
                nodes_path(),
                body={
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": node.name, "labels": labels},
                },
            )
        capacity = {"nvidia.com/gpu": str(node.gpus), "cpu": "128", "memory": "1Ti", "pods": "110"}
        client.request(
            "PATCH",
            nodes_path(node.name) + "/status",
            body={"status": {"capacity": capacity, "allocatable": capacity}},
            content_type="application/merge-patch+json",
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(len(spec.nodes))))


def initial_targets(
    policies: dict[str, ServicePolicy], total_gpus: int, fill: float, seed: int
) -> dict[str, Targets]:
    """Targets using about ``fill`` of the fleet, following each P/D ratio target."""
    rng = random.Random(seed)
    weights = {name: rng.uniform(0.4, 1.6) for name in sorted(policies)}
    scale = fill * total_gpus / sum(weights.values())
    out = {}
    for name, policy in sorted(policies.items()):
        ratio = policy.pd_ratio.target
        per_pair = policy.prefill.gpus_per_instance * ratio + policy.decode.gpus_per_instance
        decode = max(1, round(weights[name] * scale / per_pair))
        prefill = max(1, round(decode * ratio))
        out[name] = Targets(
            name,
            min(prefill, policy.prefill.max_instances),
            min(decode, policy.decode.max_instances),
        )
    return out


class SyntheticMetrics:
    """Decode TPS at the target per instance for the running size (within tolerance),
    except a few services whose load moved; latencies well inside their SLOs. With
    ``mixes``, each service's prompt and output lengths too (log-normal around a
    conversation-like shape of its own, as vLLM's histograms export them), which the
    planner sizes from."""

    def __init__(
        self, decode_instances: dict[str, int], change: float, seed: int, mixes: bool = False
    ):
        rng = random.Random(seed)
        self.load = {}
        self.shapes: dict[str, tuple[float, float]] = {}
        for name, decode in sorted(decode_instances.items()):
            factor = rng.choice([0.75, 1.25]) if rng.random() < change else 1.0
            self.load[name] = decode * factor
            if mixes:  # median prompt and output tokens
                self.shapes[name] = (rng.uniform(600, 3000), rng.uniform(120, 500))

    def fetch(self, policies: list[ServicePolicy], now_s: float) -> dict[str, ServiceMetrics]:
        out = {}
        for p in policies:
            decode_tps = self.load.get(p.name, 1.0) * (p.scaling.target_per_instance or 1.0)
            shape = self.shapes.get(p.name)
            out[p.name] = ServiceMetrics(
                p.name,
                prefill_tps=Sample(decode_tps * 8, now_s),
                decode_tps=Sample(decode_tps, now_s),
                ttft=Sample(p.slo.ttft_ms * 0.4, now_s),
                tbt=Sample(p.slo.tbt_ms * 0.4, now_s),
                prompt_tokens=None if shape is None else length_buckets(shape[0], 0.7, 1e4, now_s),
                output_tokens=None if shape is None else length_buckets(shape[1], 0.6, 1e4, now_s),
            )
        return out


def planner_targets(
    state: DesiredState,
    metrics: SyntheticMetrics,
    autoscaler: Autoscaler,
    start: dict[str, Targets],
    rounds: int = 20,
) -> dict[str, Targets]:
    """The counts ``autoscaler`` settles at for ``metrics``' load, from ``start``: each
    round runs what it asked the round before (its steps are bounded), until it asks
    for what runs. The running state it would have built, so that a cycle at the same
    load changes only the services whose load moved."""
    spec = state.clusters["large"]
    now = time.time()
    out = {}
    for policy in state.policies_for("large"):
        reading = metrics.fetch([policy], now)[policy.name]
        counts = (start[policy.name].prefill, start[policy.name].decode)
        history = PolicyHistory()
        for _ in range(rounds):
            fleet = ServiceFleet(policy.name, RoleCount(counts[0]), RoleCount(counts[1]))
            decision = autoscaler.decide(DecisionInput(policy, fleet, reading, history, now, spec))
            history = decision.history
            if (decision.prefill, decision.decode) == counts:
                break
            counts = (decision.prefill, decision.decode)
        out[policy.name] = Targets(policy.name, *counts)
    return out


def setup_running_state(
    state: DesiredState, backend: KubernetesBackend, targets: dict[str, Targets]
) -> dict[str, int]:
    spec = state.clusters["large"]
    policies = {p.name: p for p in state.policies_for("large")}
    observation = backend.observe(spec, list(policies.values()))
    result = CpSatPlacer().place(
        PlacementRequest(spec, policies, observation.fleet, targets, PlacementOptions())
    )
    if not result.groups:
        raise SystemExit(f"setup: placement returned no groups ({result.stats})")
    gpus = {(n, r): p.role(r).gpus_per_instance for n, p in policies.items() for r in ROLES}
    plan = Plan(
        "large", {}, result, diff_groups(observation.fleet, result.groups, gpus), observation.fleet
    )
    applied = backend.apply_cluster(plan)
    errors = [o for o in applied.objects if o.action in ("error", "conflict")]
    if errors:
        raise SystemExit(f"setup failed: {errors[0].key}: {errors[0].notes}")
    create_bound_pods(backend.client, state, result.groups)
    return {name: result.placed(name, "decode") for name in policies}


def create_bound_pods(
    client: KubeClient, state: DesiredState, groups: Sequence[DeploymentGroup]
) -> None:
    """The Pods the ReplicaSets and the scheduler would have made, bound to the nodes
    the placement chose (there is no controller manager here: the API server alone is
    measured). The observer reads which node each instance runs on from them."""
    spec = state.clusters["large"]
    rendered = render_groups(groups, state.policies, spec, state.templates)
    bodies = []
    for workload in rendered.values():
        group = next(
            g for g in groups if g.service == workload.service and g.group_id == workload.group_id
        )
        template = workload.manifest["spec"]["template"]
        index = 0
        for placed in group.role(workload.role).nodes:
            for _ in range(placed.instances):
                bodies.append(
                    (
                        workload.key.namespace,
                        {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "metadata": {
                                **template["metadata"],
                                "name": f"{workload.key.name}-{index}",
                            },
                            "spec": {**template["spec"], "nodeName": placed.node},
                        },
                    )
                )
                index += 1

    def create(item: tuple[str, dict]) -> None:
        namespace, body = item
        with contextlib.suppress(ResourceConflict):
            client.request("POST", pods_path(namespace), body=body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, bodies))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--change", type=float, default=0.1)
    parser.add_argument("--nodes", type=int, default=2500)
    parser.add_argument("--services", type=int, default=100)
    # heteroscale-paper scales on the generated policies' decode targets; heteroscale
    # (the planner) sizes from the model for length histograms the synthetic metrics
    # then carry, and the running state is set up from its own decisions.
    parser.add_argument(
        "--autoscaler", default="heteroscale-paper", choices=["heteroscale-paper", "heteroscale"]
    )
    parser.add_argument(
        "--no-watch", dest="watch", action="store_false", help="list Pods and Nodes every cycle"
    )
    parser.add_argument(
        "--kube-bin",
        default=os.environ.get("HETEROSCALE_KUBE_BIN", "/root/.cache/heteroscale/kube-bin"),
    )
    args = parser.parse_args()

    subprocess.run(["bash", str(SCRIPTS / "ensure-binaries.sh"), args.kube_bin], check=True)
    with tempfile.TemporaryDirectory(prefix="heteroscale-bench-") as tmp:
        repo = write_large_fleet(
            Path(tmp) / "repo", nodes=args.nodes, services=args.services, seed=args.seed
        )
        state_dir = Path(tmp) / "k8s"
        t0 = time.perf_counter()
        kubeconfig = start_control_plane(state_dir, Path(args.kube_bin))
        try:
            client = KubeClient.from_kubeconfig(str(kubeconfig), pool_size=16)
            state = load_desired_state(repo)
            spec = state.clusters["large"]
            create_namespaces_and_nodes(
                client, spec, {p.namespace for p in state.policies.values()}
            )
            backend = KubernetesBackend(client, state=state, options=ApplyOptions())
            by_name = {p.name: p for p in state.policies_for("large")}
            base = initial_targets(by_name, sum(n.gpus for n in spec.nodes), args.fill, args.seed)
            autoscaler = make_autoscaler(args.autoscaler)
            planner = args.autoscaler == "heteroscale"
            if planner:
                # The planner sizes from its own capacity, not the generated targets:
                # the running state is what it asks at the base load.
                loads = {name: t.decode for name, t in base.items()}
                targets = planner_targets(
                    state, SyntheticMetrics(loads, 0.0, args.seed, mixes=True), autoscaler, base
                )
                decode = setup_running_state(state, backend, targets)
                metrics = SyntheticMetrics(loads, args.change, args.seed, mixes=True)
            else:
                decode = setup_running_state(state, backend, base)
                metrics = SyntheticMetrics(decode, args.change, args.seed)
            deployments = len(list(client.list("/apis/apps/v1/deployments")))
            gpus = sum(n.gpus for n in spec.nodes)
            print(
                f"setup: {len(spec.nodes)} nodes, {gpus} GPUs, {len(state.policies)} services, "
                f"{deployments} Deployments applied; setup took {time.perf_counter() - t0:.1f} s"
            )

            backend = KubernetesBackend(client, state=state, options=ApplyOptions(watch=args.watch))
            placer = CpSatPlacer()
            rows = []
            for cycle in range(args.cycles):
                times: dict[str, float] = {}
                start = time.perf_counter()
                # As the loop does: a new load, the unchanged objects kept (so what is
                # cached per policy and cluster object survives the cycle).
                state = reuse_unchanged(state, load_desired_state(repo))
                times["load"] = time.perf_counter() - start
                backend.state = state
                spec = state.clusters["large"]
                policies = state.policies_for("large")
                t = time.perf_counter()
                observation = backend.observe(spec, policies)
                times["observe"] = time.perf_counter() - t
                t = time.perf_counter()
                now = time.time()
                current = metrics.fetch(policies, now)
                times["metrics"] = time.perf_counter() - t
                t = time.perf_counter()
                plan, _ = plan_cluster(
                    state, "large", observation, current, {}, now, autoscaler, placer
                )
                times["decide+place"] = time.perf_counter() - t
                t = time.perf_counter()
                diff = backend.diff_cluster(plan)
                times["dry-run diff"] = time.perf_counter() - t
                times["total"] = time.perf_counter() - start
                deployments = len(backend.snapshot.deployments) if backend.snapshot else deployments
                solver = plan.placement.stats
                rows.append(times)
                print(
                    f"cycle {cycle + 1}: "
                    + "  ".join(f"{k} {v:.2f} s" for k, v in times.items())
                    + f"  | {len(observation.fleet.groups)} groups, {deployments} Deployments, "
                    f"{len(plan.changes)} group changes, {len(diff.changed)} object changes "
                    f"({diff.mode}, {backend.stats.dry_runs} dry runs), placement "
                    f"{solver.solver if solver else '?'} {solver.status if solver else ''}"
                )
            backend.close()
            warm = rows[1:] if args.watch and len(rows) > 1 else rows
            label = "warm cycles 2.." if warm is not rows else "all cycles"
            print()
            print(
                f"median over {label}: "
                + "  ".join(f"{k} {statistics.median(r[k] for r in warm):.2f} s" for k in warm[0])
            )
            totals = [r["total"] for r in warm]
            print(
                f"full cycle (load, observe, metrics, decide, place, dry-run diff), {label}: median "
                f"{statistics.median(totals):.2f} s, min {min(totals):.2f} s, max {max(totals):.2f} s "
                f"(target < 5 s); cold cycle 1: {rows[0]['total']:.2f} s"
            )
            print(
                f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
                f"on {os.cpu_count()} CPUs (the API server, etcd and this process share them)"
            )
        finally:
            subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(state_dir)], check=False)


if __name__ == "__main__":
    main()
