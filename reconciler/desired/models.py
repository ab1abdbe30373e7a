"""Desired state: the pydantic models behind ``policies/*.yaml`` and ``clusters/*.yaml``.

Every model is frozen (a loaded revision never changes) and strict about keys:
an unknown key is an error, and the loader adds a "did you mean" hint. Checks that
need more than one field (ranges, references inside a file) live in
``reconciler.desired.checks`` so their errors can point at the exact YAML line; the
models themselves only check what a single field can tell.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from functools import cache, cached_property
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WrapValidator,
    field_validator,
)

from reconciler.desired.names import expand_range
from reconciler.desired.ratio import PDRatio
from reconciler.dns1123 import (
    LABEL_VALUE_PATTERN,
    label_key_problem,
    label_value_problem,
)

DnsLabel = Annotated[
    str,
    Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="lower-case letters, digits and '-', at most 63 characters",
    ),
]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction01 = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
NonNegativeSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]

# Upper bounds. Every number has one, so a value no deployment would write (1e18 s,
# 1e16 instances) is a located error here instead of a hang or a solver crash later.
# Each is well beyond real use; the field descriptions say why.
HOUR_S = 3_600.0
DAY_S = 86_400.0
# Per GPU per hour, in the cluster's currency: a million leaves room for currencies with
# small units (a B200 at 15 USD/h is about 375,000 VND/h); in USD it is 100,000 times
# today's on-demand list prices.
MAX_COST_PER_HOUR = 1_000_000.0
MAX_INSTANCES = 100_000  # per role of one service: 100,000+ GPUs, beyond any fleet
# The least per-instance target: a thousandth of a token/s, or of full utilisation. Any
# less sized a fleet of 1e305 instances before the clamp, and said so in its message.
MIN_TARGET = 1e-3
MAX_GPUS_PER_INSTANCE = 64  # eight 8-GPU nodes: beyond any engine's tensor parallelism
MAX_GPUS_PER_NODE = 64  # eight times today's 8-GPU servers
# Windows and cooldowns: the review warms a fleet up over the longest one at a
# 30 s cycle, so an hour is 120 cycles; HPA's stabilisation default is 5 minutes.
WindowSeconds = Annotated[float, Field(ge=0, le=HOUR_S, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=253)]  # a Kubernetes object name
ShortText = Annotated[str, Field(max_length=253)]


def _kubernetes(what: str, problem_of: Callable[[object], str | None]) -> AfterValidator:
    """A check that a string is what Kubernetes accepts as ``what``: a label written
    to a node or a selector that the API server refuses fails every write later."""

    def check(value: str) -> str:
        problem = problem_of(value)
        if problem is not None:
            raise ValueError(f"must be a Kubernetes {what} ({problem})")
        return value

    return AfterValidator(check)


# The pattern is for the JSON Schema only (editors): the check says what is wrong. A
# key's pattern would make pydantic's schema of a labels mapping patternProperties,
# which let any other key pass with any value.
LabelValue = Annotated[
    str,
    Field(max_length=63, json_schema_extra={"pattern": LABEL_VALUE_PATTERN}),
    _kubernetes("label value", label_value_problem),
]
LabelKey = Annotated[  # 253 prefix + / + 63
    str, Field(min_length=1, max_length=317), _kubernetes("label key", label_key_problem)
]

Engine = Literal["vllm", "sglang", "trtllm", "dynamo"]
Affinity = Literal["s1", "s2", "cluster"]
SubgroupClass = Literal["low", "medium", "high"]
ScalingMetric = Literal[
    "prefill_tps",
    "decode_tps",
    "prefill_gpu_util",
    "decode_gpu_util",
    "prefill_sm_active",
    "decode_sm_active",
    "ttft",
    "tbt",
]
LatencyMetric = Literal["ttft", "tbt"]


class StrictModel(BaseModel):
    """Frozen, unknown keys rejected, and a number field takes a number only: pydantic's
    lax mode would read ``max_instances: true`` as 1, ``ttft_ms: "1500"`` as 1500 and
    ``priority: 3e2`` as 300, so a typo or a quoted value would pass review looking
    like something else. (Its strict mode cannot serve: it refuses YAML's lists for
    tuple fields.)"""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @field_validator("*", mode="before")
    @classmethod
    def _a_number_is_written_as_one(cls, value: object, info: ValidationInfo) -> object:
        kinds = _number_kinds(cls, info.field_name or "")
        if not kinds or value is None:
            return value
        what = "a whole number" if kinds == {int} else "a number"
        if isinstance(value, bool):
            raise ValueError(f"must be {what}, not {str(value).lower()}")
        if isinstance(value, str):
            raise ValueError(f"must be {what}, not a string (a number is written unquoted)")
        if kinds == {int} and isinstance(value, float):
            raise ValueError(f"must be {what}, not a fraction")
        return value


@cache
def _number_kinds(model: type[BaseModel], field_name: str) -> frozenset[type]:
    """``{int}``, ``{float}`` or both when the field holds numbers only (None aside),
    else empty: the types ``StrictModel`` keeps from lax coercion."""
    field = model.model_fields.get(field_name)
    # A field with a validator of its own reads its own forms (a P/D ratio's "1:3").
    if field is None or any(
        isinstance(rule, BeforeValidator | PlainValidator | WrapValidator)
        for rule in field.metadata
    ):
        return frozenset()
    members = [m for m in _members(field.annotation) if m is not type(None)]
    if not members or any(m not in (int, float) for m in members):
        return frozenset()
    return frozenset(m for m in members if isinstance(m, type))


def _members(annotation: object) -> list[object]:
    """The types an annotation admits, through Optional, unions and Annotated."""
    if typing.get_origin(annotation) is Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


# --------------------------------------------------------------------------- services


class ModelSpec(StrictModel):
    """The served model, as far as capacity planning and simulation need it."""

    name: Name = Field(description="model name as the engine serves it, e.g. 'llama-3.1-70b'")
    params_b: Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)] = Field(
        description="parameters, in billions (prefill cost scales with it); at most 100,000 "
        "(100 T, fifty times the largest models served today)"
    )
    kv_bytes_per_token: Annotated[int, Field(gt=0, le=1 << 30)] = Field(
        description="KV-cache bytes per token over all layers (2 x layers x kv_heads x head_dim "
        "x bytes); at most 1 GiB (GPT-3 175B without GQA needs 4.5 MiB)"
    )
    weight_bytes_per_param: Annotated[float, Field(gt=0, le=8, allow_inf_nan=False)] = Field(
        default=2.0, description="2 for bf16/fp16 weights, 1 for fp8; at most 8 (fp64)"
    )


class SLO(StrictModel):
    """Latency objectives, judged at a quantile of requests."""

    ttft_ms: Annotated[float, Field(gt=0, le=DAY_S * 1000, allow_inf_nan=False)] = Field(
        description="time to first token, milliseconds; at most a day (no client waits longer)"
    )
    tbt_ms: Annotated[float, Field(gt=0, le=HOUR_S * 1000, allow_inf_nan=False)] = Field(
        description="time between tokens, milliseconds; at most an hour"
    )
    quantile: Fraction01 = Field(default=0.9, description="e.g. 0.9 for p90, 0.99 for p99")
    attainment_goal: Fraction01 = Field(
        default=0.995,
        description="share of requests that must meet both SLOs: the heteroscale planner sizes "
        "prefill's capacity and decode's running count to it and bounds its headroom at it; "
        "reports and what-if verdicts judge by it",
    )


class RolePolicy(StrictModel):
    """One role (prefill or decode) of a service."""

    gpus_per_instance: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_INSTANCE)] = Field(
        description="GPUs one engine instance of this role uses (its tensor-parallel size)"
    )
    gpu_types: dict[ShortText, Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)]] = Field(
        min_length=1,
        max_length=64,
        description="allowed GPU types and their preference weights (higher is preferred; "
        "at most 1000, weights are relative)",
    )
    gpu_choice: Literal["cost", "preference"] = Field(
        default="cost",
        description="how the allowed types are ranked: 'cost' (the default) puts first the "
        "type that serves the most tokens per unit of price at the SLO for the declared "
        "request_shape (the weights break ties within 10%); 'preference' keeps the weights' "
        "order. The first type takes new instances, the next ones take what its inventory "
        "cannot. List one type to pin it",
    )
    min_instances: Annotated[int, Field(ge=0, le=MAX_INSTANCES)] = Field(
        default=1, description="at most 100,000"
    )
    max_instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES)] = Field(
        default=1000,
        description="at most 100,000 (over 100,000 GPUs for one role of one service)",
    )
    template: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="path (from the repository root) of the pod template YAML the applier renders"
    )
    startup_s: Annotated[float, Field(ge=0, le=DAY_S, allow_inf_nan=False)] = Field(
        default=120.0,
        description="time from scheduling to serving (model load, warm-up); at most a day",
    )

    def preferred_gpu_types(self) -> list[str]:
        """Allowed GPU types, most preferred first (ties broken by name)."""
        return sorted(self.gpu_types, key=lambda t: (-self.gpu_types[t], t))


class PDRatioPolicy(StrictModel):
    """Prefill-to-decode instance ratio: a target and the bounds it must stay within."""

    target: PDRatio = Field(description="e.g. '1:3' = one prefill per three decode instances")
    min: PDRatio = Field(description="lowest prefill/decode ratio allowed, e.g. '1:5'")
    max: PDRatio = Field(description="highest prefill/decode ratio allowed, e.g. '1:2'")
    dynamic: bool = Field(
        default=False,
        description="let the policy move the target inside the bounds from observed demand (beyond the paper)",
    )
    dynamic_max_step: Fraction01 = Field(
        default=0.05, description="largest relative move of the dynamic target per cycle"
    )


class DeploymentGroupShape(StrictModel):
    """The size of one deployment group: placement fills groups to this shape."""

    prefill_instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES)]
    decode_instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES)]


class LatencyTier(StrictModel):
    """Negative feedback: when ``metric`` exceeds ``above`` x SLO, scale its role by ``step_percent``."""

    metric: LatencyMetric
    above: Annotated[float, Field(gt=0, le=1000, allow_inf_nan=False)] = Field(
        description="fraction of the SLO, e.g. 1.0 or 1.5; at most 1000"
    )
    step_percent: Annotated[float, Field(gt=0, le=400)]


class KVCachePressure(StrictModel):
    """Scale decode out when KV-cache usage stays above a threshold (beyond the paper)."""

    threshold: Fraction01 = 0.9
    window_s: WindowSeconds = Field(default=60.0, description="seconds; at most an hour")
    step_percent: Annotated[float, Field(gt=0, le=400)] = 10.0


# The planner's least headroom when a policy sets none (``scaling.min_headroom``): the
# rate signals are 60 s averages and Poisson arrivals at the scale of one instance vary
# by more than 1/sqrt(60 s x a few requests/s) ~ 5-10 % within a minute; 10 % covers
# that spread before the forecaster has errors to go by. It covers no burst.
DEFAULT_MIN_HEADROOM = 0.1
# A per-instance target, of the primary metric or of prompt tokens/s: at most 1e8, a
# hundred times the fastest instance's tokens/s.
TargetPerInstance = Annotated[float, Field(ge=MIN_TARGET, le=1e8, allow_inf_nan=False)]


class Scaling(StrictModel):
    """How the policy turns signals into instance counts."""

    metric: ScalingMetric = Field(default="decode_tps", description="the primary signal")
    target_per_instance: TargetPerInstance | None = Field(
        default=None,
        description="at most 1e8 (a hundred times the fastest instance's tokens/s). "
        "Per-instance target of the primary metric (tokens/s for TPS, fraction for "
        "utilisation). Omitted (the default): heteroscale derives each role's capacity from the "
        "performance model for the live request mix; given, it overrides the derived capacity "
        "of the role the metric measures (decode with decode_tps, prefill with prefill_tps) "
        "and is what heteroscale-paper scales on",
    )
    prefill_target_per_instance: TargetPerInstance | None = Field(
        default=None,
        description="prompt tokens/s per prefill instance, at most 1e8. Omitted: derived from the "
        "performance model; given, it overrides the derived prefill capacity, and for "
        "heteroscale-paper with a decode-driven metric prefill never falls below "
        "ceil(prefill_tps / this) (same tolerance band)",
    )
    tolerance: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.1, description="no change while observed/target stays within 1 +- tolerance"
    )
    min_headroom: Annotated[float, Field(ge=0, le=4, allow_inf_nan=False)] = Field(
        default=DEFAULT_MIN_HEADROOM,
        description="the least headroom heteroscale sizes each role with above the demand it "
        "forecasts, as a fraction (0.1: 10%), 0 to 4. Its own headroom, learnt from how far "
        "the demand outran the capacity it kept, is never below this, nor above the peak "
        "of its memory by more. A service whose bursts outgrow a start-up (about two "
        "minutes) before any burst has been seen misses its SLO in each until it has "
        "learnt them: raise this where the bursts are known. heteroscale-paper ignores it",
    )
    scale_out_window_s: WindowSeconds = Field(
        default=0.0,
        description="scale-out takes the lowest recommendation over this window (0 = at once); "
        "at most an hour (a longer window could not follow a daily load)",
    )
    scale_in_window_s: WindowSeconds = Field(
        default=300.0,
        description="scale-in takes the highest recommendation over this window; at most an "
        "hour (HPA's default is 5 minutes; the review replays the window before judging)",
    )
    cooldown_s: WindowSeconds = Field(
        default=120.0, description="no scale-in within this long after any change; at most an hour"
    )
    max_step_percent: Annotated[float, Field(gt=0, le=1000)] = Field(
        default=100.0, description="largest change per cycle, percent of the current size"
    )
    max_step_instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES)] = Field(
        default=4, description="a change of up to this many instances is always allowed"
    )
    latency_tiers: tuple[LatencyTier, ...] = Field(
        default=(), max_length=32, description="at most 32 tiers"
    )
    latency_scale_in_below: Fraction01 = Field(
        default=0.5,
        description="latency may drive scale-in only while below this fraction of the SLO for the whole scale-in window",
    )
    metric_max_age_s: Annotated[float, Field(gt=0, le=HOUR_S, allow_inf_nan=False)] = Field(
        default=90.0,
        description="older samples count as missing (the policy then holds); at most an hour",
    )
    kv_cache_pressure: KVCachePressure | None = None
    granularity: Literal["instance", "group"] = Field(
        default="instance",
        description="'group' rounds targets up to whole deployment groups",
    )


class MetricsConfig(StrictModel):
    """Where this service's signals come from in Prometheus."""

    preset: Literal["vllm", "sglang", "trtllm", "dynamo"] | None = Field(
        default=None, description="metric-name preset; defaults to the service's engine"
    )
    queries: dict[ShortText, Annotated[str, Field(max_length=10_000)]] = Field(
        default_factory=dict,
        max_length=64,
        description="PromQL per signal overriding the preset; must aggregate 'by (service, role)' "
        "labels, or 'by (service, le)' for the request-mix histograms prompt_tokens and output_tokens",
    )
    service_label: ShortText = Field(default="service")
    role_label: ShortText = Field(default="role")


class RequestShape(StrictModel):
    """The typical request of a service: what the planner sizes from until it has read
    the engines' prompt- and output-length histograms (a new service, or an engine that
    exports none). The histograms replace it as soon as they are read."""

    prompt_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        description="mean prompt tokens per request; at most 10,000,000 (ten times the "
        "longest context served today)"
    )
    output_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        description="mean output tokens per request; at most 10,000,000"
    )


class ServicePolicy(StrictModel):
    """One served model: its SLOs, shapes, GPU preferences and scaling rules."""

    name: DnsLabel
    model: ModelSpec
    engine: Engine = "vllm"
    cluster: Name = Field(description="name of the cluster (clusters/*.yaml) that runs it")
    namespace: DnsLabel
    priority: Annotated[int, Field(ge=0, le=1000)] = Field(
        default=100, description="higher is served first when capacity is short"
    )
    slo: SLO
    prefill: RolePolicy
    decode: RolePolicy
    pd_ratio: PDRatioPolicy
    deployment_group: DeploymentGroupShape
    affinity: Affinity = Field(
        default="s2",
        description="scheduling domain a group's prefill and decode share: s1, s2, or cluster (loose)",
    )
    scaling: Scaling
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    request_shape: RequestShape | None = Field(
        default=None,
        description="the typical request; the planner sizes from it (with a warning, never "
        "scaling in) until the engines' length histograms are read",
    )

    def role(self, role: str) -> RolePolicy:
        return self.prefill if role == "prefill" else self.decode


# --------------------------------------------------------------------------- clusters


class GpuType(StrictModel):
    """A GPU model in the fleet's catalogue (datasheet figures)."""

    memory_gib: Annotated[float, Field(gt=0, le=65_536, allow_inf_nan=False)] = Field(
        description="GiB; at most 64 TiB (today's largest card has 288 GB)"
    )
    bf16_tflops: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = Field(
        description="dense bf16 TFLOP/s; at most 1e6 (B200: 2,250)"
    )
    memory_bandwidth_gbps: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = Field(
        description="HBM/GDDR bandwidth, GB/s; at most 1e6 (B200: 8,000)"
    )
    interconnect: ShortText = Field(default="pcie", description="e.g. nvlink-400, pcie-gen4")
    node_label: LabelValue | None = Field(
        default=None, description="value of the GPU-type node label; defaults to the type's name"
    )
    cost_per_hour: (
        Annotated[float, Field(gt=0, le=MAX_COST_PER_HOUR, allow_inf_nan=False)] | None
    ) = Field(
        default=None,
        description="price of one GPU of this type for one hour, in the cluster's currency; "
        "at most 1,000,000 (room for currencies with small units). Omitted: the type has no "
        "price and reports give the cost of what runs on it as unknown",
    )


class NodeDefaults(StrictModel):
    """Values inherited by the nodes below a switch (closest switch wins)."""

    gpu_type: ShortText | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_NODE)] | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=256)


class NodeSpec(StrictModel):
    """One node, or a range of identical nodes (``name: gpu-[001-016]``)."""

    name: Name
    gpu_type: ShortText | None = None
    gpus_per_node: Annotated[int, Field(ge=1, le=MAX_GPUS_PER_NODE)] | None = None
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=256)


class S0Switch(StrictModel):
    """A leaf switch (or a range of them, ``leaf-a1-[1-4]``, sharing the node list in
    equal consecutive blocks)."""

    name: Name
    defaults: NodeDefaults = Field(default_factory=NodeDefaults)
    nodes: Name | tuple[NodeSpec | Name, ...] = Field(
        description="a node-name range such as 'h20-[0001-0032]', or a list of nodes/ranges"
    )


class S1Switch(StrictModel):
    """A mini-pod switch."""

    name: Name
    defaults: NodeDefaults = Field(default_factory=NodeDefaults)
    s0: tuple[S0Switch, ...] = Field(min_length=1)


class S2Switch(StrictModel):
    """A big-pod (spine) switch."""

    name: Name
    defaults: NodeDefaults = Field(default_factory=NodeDefaults)
    s1: tuple[S1Switch, ...] = Field(min_length=1)


class RdmaSubgroup(StrictModel):
    """A set of S1 or S2 switches whose machines reach each other over RDMA."""

    name: Name
    switches: tuple[Name, ...] = Field(min_length=1)
    declared_class: SubgroupClass | None = Field(
        default=None,
        alias="class",
        description="optional; checked against the class derived from the GPU types below",
    )


class TopologyLabels(StrictModel):
    """Node label keys that carry the topology (used by the applier and drift checks)."""

    s2: LabelKey = "heteroscale.io/s2"
    s1: LabelKey = "heteroscale.io/s1"
    s0: LabelKey = "heteroscale.io/s0"
    gpu_type: LabelKey = "heteroscale.io/gpu-type"


class Network(StrictModel):
    """Link speeds for KV-cache transfer between a prefill and a decode instance."""

    rdma_gbps: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = Field(
        default=400.0,
        description="per-instance RDMA, inside a subgroup; at most 1e6 (today's NICs: 800)",
    )
    cross_subgroup_gbps: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] = Field(
        default=50.0,
        description="per-instance bandwidth across spines (outside any shared subgroup); at "
        "most 1e6",
    )


class PlacementSettings(StrictModel):
    """How the placer may change what runs in the cluster."""

    allow_rebalance: bool = Field(
        default=False,
        description="let the CP-SAT placer move running instances to a better placement "
        "(make-before-break: the old Deployments keep serving until the new ones serve); "
        "false: only new instances are placed, running ones never move. The greedy "
        "placer never moves them and says so",
    )


# Labels one node may hold after inheritance: as many as one level may declare. Every
# cycle compares each node's labels with the live node's and fingerprints them, so the
# work grows with nodes x labels.
MAX_NODE_LABELS = 256


class Node(BaseModel):
    """A node after range expansion and default inheritance (not written in YAML). The
    nodes of one entry share one ``labels`` dict: read it, never change it."""

    model_config = ConfigDict(frozen=True)

    name: str
    s0: str
    s1: str
    s2: str
    gpu_type: str
    gpus: int
    labels: dict[str, str]


class ClusterSpec(StrictModel):
    """One Kubernetes cluster: GPU catalogue, switch hierarchy, nodes and RDMA subgroups."""

    name: DnsLabel
    kube_context: ShortText | None = Field(
        default=None, description="kubeconfig context; none = current"
    )
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = Field(
        default="USD",
        description="ISO 4217 code (three capital letters) of the GPU types' cost_per_hour",
    )
    gpu_types: dict[ShortText, GpuType] = Field(min_length=1, max_length=64)
    labels: TopologyLabels = Field(default_factory=TopologyLabels)
    network: Network = Field(default_factory=Network)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    defaults: NodeDefaults = Field(default_factory=NodeDefaults)
    s2: tuple[S2Switch, ...] = Field(min_length=1)
    rdma_subgroups: tuple[RdmaSubgroup, ...] = Field(default=())

    # Validation and every later reader share these: a cluster's nodes are expanded
    # and indexed once, never once per service that runs on it.

    @cached_property
    def located_nodes(self) -> tuple[tuple[Node, tuple[object, ...]], ...]:
        """Every node with the YAML path that declared it (``iter_nodes``); raises
        ValueError like it (a failure is not cached)."""
        return tuple(iter_nodes(self))

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Every node, with ranges expanded and defaults inherited. Assumes the spec
        passed ``reconciler.desired.checks.check_cluster``."""
        return tuple(node for node, _path in self.located_nodes)

    @cached_property
    def node_by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    @cached_property
    def gpus_by_type(self) -> dict[str, int]:
        """Every GPU of the cluster, counted per GPU type: the most any fleet here holds."""
        total: dict[str, int] = {}
        for node in self.nodes:
            total[node.gpu_type] = total.get(node.gpu_type, 0) + node.gpus
        return total

    def node_labels(self, node: Node) -> dict[str, str]:
        """The labels this cluster file says ``node`` carries: its switches', its GPU
        type's (``GpuType.node_label`` or the type's name) and its own. What placement
        and the rendered node affinity rely on, and what drift compares."""
        return {
            self.labels.s2: node.s2,
            self.labels.s1: node.s1,
            self.labels.s0: node.s0,
            self.labels.gpu_type: self.gpu_types[node.gpu_type].node_label or node.gpu_type,
            **node.labels,
        }

    @cached_property
    def gpu_types_with_nodes(self) -> frozenset[str]:
        """The catalogue's types that some node has: the only ones an instance can run
        on (a type declared for nodes yet to come has no capacity to size with)."""
        return frozenset(t for t, gpus in self.gpus_by_type.items() if gpus > 0)

    @cached_property
    def largest_node_gpus(self) -> dict[str, int]:
        """GPUs of the largest node of each GPU type present on a node."""
        largest: dict[str, int] = {}
        for node in self.nodes:
            if node.gpus > largest.get(node.gpu_type, 0):
                largest[node.gpu_type] = node.gpus
        return largest

    @cached_property
    def s2_of_s1(self) -> dict[str, str]:
        """The S2 switch above each S1 switch (the last one for a repeated name)."""
        return {s1.name: s2.name for s2 in self.s2 for s1 in s2.s1}

    @cached_property
    def s1_under_s2(self) -> dict[str, tuple[str, ...]]:
        """The S1 switches under each S2 switch (the last one for a repeated name)."""
        return {s2.name: tuple(s1.name for s1 in s2.s1) for s2 in self.s2}


def _merge(*layers: NodeDefaults | NodeSpec) -> tuple[str | None, int | None, dict[str, str]]:
    gpu_type: str | None = None
    gpus: int | None = None
    labels: dict[str, str] = {}
    for layer in layers:
        gpu_type = layer.gpu_type or gpu_type
        gpus = layer.gpus_per_node or gpus
        labels.update(layer.labels)
    return gpu_type, gpus, labels


def iter_s0(
    spec: ClusterSpec,
) -> list[tuple[str, S0Switch, S1Switch, S2Switch, tuple[object, ...]]]:
    """Every S0 switch name after range expansion, with its parents and YAML path."""
    out: list[tuple[str, S0Switch, S1Switch, S2Switch, tuple[object, ...]]] = []
    for i2, s2 in enumerate(spec.s2):
        for i1, s1 in enumerate(s2.s1):
            for i0, s0 in enumerate(s1.s0):
                path = ("s2", i2, "s1", i1, "s0", i0)
                for name in expand_range(s0.name):
                    out.append((name, s0, s1, s2, path))
    return out


def iter_nodes(spec: ClusterSpec) -> list[tuple[Node, tuple[object, ...]]]:
    """Expand every node with the YAML path that declared it. Raises ValueError (with
    the path in ``args[1]``) when a range cannot be split evenly over its S0 range, or
    a node lacks a GPU type or count."""
    out: list[tuple[Node, tuple[object, ...]]] = []
    for i2, s2 in enumerate(spec.s2):
        for i1, s1 in enumerate(s2.s1):
            for i0, s0 in enumerate(s1.s0):
                s0_path: tuple[object, ...] = ("s2", i2, "s1", i1, "s0", i0)
                s0_names = expand_range(s0.name)
                entries = [s0.nodes] if isinstance(s0.nodes, str) else list(s0.nodes)
                expanded: list[tuple[str, NodeSpec | None, tuple[object, ...]]] = []
                for j, entry in enumerate(entries):
                    entry_path = (
                        (*s0_path, "nodes") if isinstance(s0.nodes, str) else (*s0_path, "nodes", j)
                    )
                    if isinstance(entry, str):
                        expanded += [(n, None, entry_path) for n in expand_range(entry)]
                    else:
                        expanded += [(n, entry, entry_path) for n in expand_range(entry.name)]
                if len(expanded) % len(s0_names):
                    raise ValueError(
                        f"{len(expanded)} nodes cannot be split evenly over {len(s0_names)} "
                        f"S0 switches '{s0.name}'",
                        (*s0_path, "nodes"),
                    )
                per_switch = len(expanded) // len(s0_names)
                # One merge per node entry (a range's nodes, or the leaf's plain names,
                # share it), and its labels one dict for all of them: a node holding its
                # own copy of 256 labels from each of five levels took gigabytes for a
                # range of 100,000 nodes.
                merged: dict[int, tuple[str | None, int | None, dict[str, str]]] = {}
                for k, (node_name, node_spec, node_path) in enumerate(expanded):
                    entry_key = id(node_spec)
                    if entry_key not in merged:
                        layers: list[NodeDefaults | NodeSpec] = [
                            spec.defaults,
                            s2.defaults,
                            s1.defaults,
                            s0.defaults,
                        ]
                        if node_spec is not None:
                            layers.append(node_spec)
                        merged[entry_key] = _merge(*layers)
                    gpu_type, gpus, labels = merged[entry_key]
                    if len(labels) > MAX_NODE_LABELS:
                        raise ValueError(
                            f"node {node_name} holds {len(labels)} labels, its own and its "
                            f"switches' defaults together (at most {MAX_NODE_LABELS})",
                            node_path,
                        )
                    if gpu_type is None:
                        raise ValueError(
                            f"node {node_name} has no gpu_type (set it on the node or a switch's defaults)",
                            node_path,
                        )
                    if gpus is None:
                        raise ValueError(
                            f"node {node_name} has no gpus_per_node (set it on the node or a switch's defaults)",
                            node_path,
                        )
                    # Every field is checked already (the YAML models); construct, not
                    # validate, so the shared labels are not copied per node.
                    node = Node.model_construct(
                        name=node_name,
                        s0=s0_names[k // per_switch],
                        s1=s1.name,
                        s2=s2.name,
                        gpu_type=gpu_type,
                        gpus=gpus,
                        labels=labels,
                    )
                    out.append((node, node_path))
    return out
