"""Whether a model fits an instance: the memory half of the performance model
(``instance`` assumption 4), in plain arithmetic so ``heteroscale validate`` can judge
it without loading numpy or the fitted coefficients.

An engine may use ``GPU_MEMORY_UTILIZATION`` of its GPUs' memory, less
``ACTIVATION_RESERVE_GIB_PER_GPU`` per GPU; the weights take
``params x weight_bytes_per_param`` of that and the rest holds the KV cache. The model
fits when the rest holds at least ``MIN_KV_TOKENS`` (one long sequence): below that an
engine cannot serve, so the instance has no capacity. ``instance_perf`` derives its KV
capacity here, the planner sizes only on the types that fit (``perf_context.fitting_perfs``)
and validate refuses a role none of whose allowed types fits
(``desired.checks.check_model_fits``): one answer everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reconciler.desired.models import ClusterSpec, GpuType, ModelSpec, ServicePolicy
from reconciler.state import Role

GIB = 1024**3
GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_GIB_PER_GPU = 1.5
# KV cache an instance must hold beyond its weights to serve at all (one long sequence).
MIN_KV_TOKENS = 1024


@dataclass(frozen=True)
class InstanceMemory:
    """The memory of one instance of a model on ``gpus`` GPUs of one type."""

    gpu_type: str
    gpus: int
    weight_bytes: float
    usable_bytes: float  # what the engine may fill with weights and KV cache
    kv_bytes_per_token: float

    @property
    def kv_capacity_tokens(self) -> float:
        """Tokens of KV cache the memory left after the weights holds (0 when none)."""
        return max(0.0, (self.usable_bytes - self.weight_bytes) / self.kv_bytes_per_token)

    @property
    def fits(self) -> bool:
        """Whether the weights fit with room for at least one long sequence."""
        return self.kv_capacity_tokens >= MIN_KV_TOKENS

    @property
    def needed_bytes(self) -> float:
        """What the instance needs to fit: the weights and ``MIN_KV_TOKENS`` of KV cache."""
        return self.weight_bytes + MIN_KV_TOKENS * self.kv_bytes_per_token


def instance_memory(
    model: ModelSpec, gpu_type: str, gpu: GpuType, gpus_per_instance: int
) -> InstanceMemory:
    """The memory of one instance of ``model`` on ``gpus_per_instance`` GPUs of ``gpu``."""
    return InstanceMemory(
        gpu_type=gpu_type,
        gpus=gpus_per_instance,
        weight_bytes=model.params_b * 1e9 * model.weight_bytes_per_param,
        usable_bytes=gpus_per_instance
        * (gpu.memory_gib * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_GIB_PER_GPU)
        * GIB,
        kv_bytes_per_token=float(model.kv_bytes_per_token),
    )


def role_memories(
    policy: ServicePolicy, cluster: ClusterSpec, role: Role, order: Sequence[str] | None = None
) -> list[InstanceMemory]:
    """The memory of an instance of ``role`` on each GPU type it allows that some node
    of the cluster has, fitting or not, in ``order`` (default: the policy's preference
    order). A type only in the catalogue is left out: sizing with it would count on
    capacity no node can give."""
    role_policy = policy.role(role)
    out: list[InstanceMemory] = []
    for gpu_type in role_policy.preferred_gpu_types() if order is None else order:
        gpu = cluster.gpu_types.get(gpu_type)
        if (
            gpu is None
            or gpu_type not in role_policy.gpu_types
            or gpu_type not in cluster.gpu_types_with_nodes
        ):
            continue
        out.append(instance_memory(policy.model, gpu_type, gpu, role_policy.gpus_per_instance))
    return out


def gib(num_bytes: float) -> str:
    """Bytes as GiB with one decimal, for messages."""
    return f"{num_bytes / GIB:,.1f} GiB"


def memory_need(model: ModelSpec, memory: InstanceMemory) -> str:
    """What an instance of ``model`` needs, with the arithmetic (for messages)."""
    kv_bytes = MIN_KV_TOKENS * memory.kv_bytes_per_token
    return (
        f"{gib(memory.weight_bytes)} of weights ({model.params_b:g} B parameters x "
        f"{model.weight_bytes_per_param:g} bytes) + {gib(kv_bytes)} for {MIN_KV_TOKENS:,} "
        f"tokens of KV cache = {gib(memory.needed_bytes)}"
    )


def memory_held(memories: Sequence[InstanceMemory]) -> str:
    """What an instance of each type may use, and how that is derived (for messages)."""
    held = ", ".join(f"{gib(m.usable_bytes)} on {m.gpu_type}" for m in memories)
    return (
        f"{held} ({GPU_MEMORY_UTILIZATION:.0%} of each GPU's memory less "
        f"{ACTIVATION_RESERVE_GIB_PER_GPU:g} GiB per GPU for activations)"
    )


__all__ = [
    "ACTIVATION_RESERVE_GIB_PER_GPU",
    "GIB",
    "GPU_MEMORY_UTILIZATION",
    "MIN_KV_TOKENS",
    "InstanceMemory",
    "gib",
    "instance_memory",
    "memory_held",
    "memory_need",
    "role_memories",
]
