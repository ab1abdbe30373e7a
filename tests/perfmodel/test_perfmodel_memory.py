"""Whether a model fits an instance is one judgement, in plain arithmetic
(``reconciler.perfmodel.memory``): the performance model's KV capacity, the planner's
choice of types and ``heteroscale validate`` all read it."""

from __future__ import annotations

import pytest

from reconciler.desired.models import GpuType, ModelSpec
from reconciler.perfmodel.instance import instance_perf
from reconciler.perfmodel.memory import GIB, MIN_KV_TOKENS, instance_memory

H800 = GpuType(memory_gib=80, bf16_tflops=989, memory_bandwidth_gbps=3350)
H20 = GpuType(memory_gib=96, bf16_tflops=148, memory_bandwidth_gbps=4000)
L20 = GpuType(memory_gib=48, bf16_tflops=119.5, memory_bandwidth_gbps=864)


def llama(params_b: float) -> ModelSpec:
    return ModelSpec(name=f"{params_b:g}b", params_b=params_b, kv_bytes_per_token=327680)


@pytest.mark.parametrize("params_b", [8.03, 70.6, 160.0, 200.0, 405.0])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize(("name", "gpu"), [("h800", H800), ("h20", H20), ("l20", L20)])
def test_the_performance_model_reads_its_kv_capacity_and_fit_from_the_memory_model(
    params_b: float, gpus: int, name: str, gpu: GpuType
) -> None:
    memory = instance_memory(llama(params_b), name, gpu, gpus)
    perf = instance_perf(llama(params_b), name, gpu, gpus)
    assert perf.kv_capacity_tokens == memory.kv_capacity_tokens  # bit for bit
    assert perf.weight_bytes == memory.weight_bytes
    assert perf.fits == memory.fits


def test_a_200b_model_does_not_fit_four_h800s_but_fits_eight() -> None:
    four = instance_memory(llama(200.0), "h800", H800, 4)
    assert four.weight_bytes / GIB == pytest.approx(372.5, abs=0.05)
    assert four.usable_bytes / GIB == pytest.approx(4 * (80 * 0.9 - 1.5))  # 282 GiB
    assert four.kv_capacity_tokens == 0.0 and not four.fits
    assert instance_memory(llama(200.0), "h800", H800, 8).fits


def test_weights_that_leave_less_than_one_long_sequence_of_kv_cache_do_not_fit() -> None:
    model = llama(70.6)
    roomy = instance_memory(model, "h800", H800, 4)
    # Shrink the card until the cache holds just under MIN_KV_TOKENS.
    spare_gib = (MIN_KV_TOKENS - 1) * model.kv_bytes_per_token / GIB
    per_gpu = (roomy.weight_bytes / GIB + spare_gib) / 4
    tight = H800.model_copy(update={"memory_gib": (per_gpu + 1.5) / 0.9})
    almost = instance_memory(model, "h800", tight, 4)
    assert 0 < almost.kv_capacity_tokens < MIN_KV_TOKENS
    assert not almost.fits and not instance_perf(model, "h800", tight, 4).fits
    assert almost.needed_bytes > almost.usable_bytes
