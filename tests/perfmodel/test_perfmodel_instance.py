"""How the instance performance model scales across GPU types, model sizes and TP."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired.models import GpuType, ModelSpec
from reconciler.perfmodel.instance import InstancePerf, instance_perf, kv_transfer_s, tp_scale

H200 = GpuType(memory_gib=141, bf16_tflops=989, memory_bandwidth_gbps=4800)
H100 = GpuType(memory_gib=80, bf16_tflops=989, memory_bandwidth_gbps=3350)
H20 = GpuType(memory_gib=96, bf16_tflops=148, memory_bandwidth_gbps=4000)
L20 = GpuType(memory_gib=48, bf16_tflops=119.5, memory_bandwidth_gbps=864)
LLAMA_8B = ModelSpec(name="8b", params_b=8.03, kv_bytes_per_token=131072)
QWEN_32B = ModelSpec(name="32b", params_b=32.76, kv_bytes_per_token=262144)
LLAMA_70B = ModelSpec(name="70b", params_b=70.6, kv_bytes_per_token=327680)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.floats(1, 200),
    extra_batch=st.floats(0.5, 50),
    context=st.floats(100, 8000),
    extra_context=st.floats(10, 4000),
)
def test_decode_step_grows_with_batch_and_context(
    batch: float, extra_batch: float, context: float, extra_context: float
) -> None:
    perf = instance_perf(LLAMA_8B, "h200", H200, 1)

    def step(b: float, c: float) -> float:
        return perf.decode_step_scalar_s(b, b * c, c)

    assert step(batch + extra_batch, context) > step(batch, context)
    assert step(batch, context + extra_context) > step(batch, context)


def test_decode_follows_memory_bandwidth_at_equal_compute() -> None:
    """The H100/H200 pair: same compute, 3.35 vs 4.8 TB/s; small-batch decode is slower
    on the H100 by roughly the weight-read time, prefill is the same."""
    h200 = instance_perf(LLAMA_8B, "h200", H200, 1)
    h100 = instance_perf(LLAMA_8B, "h100", H100, 1)
    ratio = h100.decode_step_scalar_s(1, 1025, 1025) / h200.decode_step_scalar_s(1, 1025, 1025)
    assert 1.1 < ratio < 1.45
    prefill_ratio = float(h100.prefill_latency_s(2048)) / float(h200.prefill_latency_s(2048))
    assert prefill_ratio == pytest.approx(1.0, abs=0.03)


def test_prefill_scales_with_compute_and_parameters() -> None:
    h800_like = instance_perf(LLAMA_8B, "h100", H100, 1)
    h20 = instance_perf(LLAMA_8B, "h20", H20, 1)
    # Long prompts are compute-bound: time ~ 1 / TFLOP/s.
    assert float(h20.prefill_latency_s(4096)) / float(
        h800_like.prefill_latency_s(4096)
    ) == pytest.approx(989 / 148, rel=0.05)
    small = instance_perf(LLAMA_8B, "h200", H200, 1)
    large = instance_perf(QWEN_32B, "h200", H200, 1)
    assert float(large.prefill_latency_s(2048)) / float(
        small.prefill_latency_s(2048)
    ) == pytest.approx(32.76 / 8.03, rel=0.1)


def test_decode_scales_with_weight_bytes_at_small_batch() -> None:
    small = instance_perf(LLAMA_8B, "h200", H200, 1)
    large = instance_perf(QWEN_32B, "h200", H200, 1)
    ratio = large.decode_step_scalar_s(1, 1025, 1025) / small.decode_step_scalar_s(1, 1025, 1025)
    assert 3.0 < ratio < 4.1  # measured 3.6x for 4.08x the weights (fixed overheads)


def test_tensor_parallel_splits_the_work_with_an_efficiency_loss() -> None:
    assert tp_scale(1) == 1.0
    assert tp_scale(2) == pytest.approx(1.8)
    assert tp_scale(4) == pytest.approx(4 * 0.81)
    one = instance_perf(LLAMA_70B, "h200", H200, 2)
    two = instance_perf(LLAMA_70B, "h200", H200, 4)
    assert two.prefill_capacity_work_per_s == pytest.approx(
        one.prefill_capacity_work_per_s * 0.9 * 2
    )
    assert two.decode_step_scalar_s(8, 8000, 1000) < one.decode_step_scalar_s(8, 8000, 1000)


def test_kv_cache_memory_bounds_the_decode_batch() -> None:
    roomy = instance_perf(LLAMA_8B, "h200", H200, 1)
    tight = instance_perf(LLAMA_8B, "l20", L20, 1)
    assert roomy.kv_capacity_tokens > 2.5 * tight.kv_capacity_tokens
    # At 32k-token contexts the L20 holds only a handful of sequences.
    assert tight.kv_capacity_tokens / 32768 < 10
    # Decode capacity at a loose TBT is bounded by memory, not by the batch limit.
    limited = tight.decode_capacity_tps(1.0, 32768)
    batch_bound = tight.kv_capacity_tokens / 32768
    assert (
        limited
        <= batch_bound
        / tight.decode_step_scalar_s(batch_bound, tight.kv_capacity_tokens, 32768)
        * 1.01
    )


def test_a_model_that_does_not_fit_has_no_capacity() -> None:
    perf = instance_perf(LLAMA_70B, "l20", L20, 1)
    assert not perf.fits
    assert perf.prefill_capacity_work_per_s == 0.0
    assert perf.decode_capacity_tps(0.05, 1000) == 0.0


def test_decode_capacity_respects_the_tbt_slo() -> None:
    perf = instance_perf(LLAMA_8B, "h200", H200, 1)
    tight, loose = perf.decode_capacity_tps(0.008, 2000), perf.decode_capacity_tps(0.030, 2000)
    assert 0 < tight < loose
    assert perf.decode_capacity_tps(0.001, 2000) == 0.0  # faster than one step can be


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(
        [(LLAMA_8B, "h200", H200, 1), (QWEN_32B, "h20", H20, 4), (LLAMA_70B, "h100", H100, 4)]
    ),
    batch=st.floats(1, 4096),
    context=st.floats(1, 131_072),
    prompt=st.floats(1, 131_072),
    prompts=st.integers(1, 64),
)
def test_no_load_or_mix_serves_beyond_the_ceilings(
    case: tuple[ModelSpec, str, GpuType, int],
    batch: float,
    context: float,
    prompt: float,
    prompts: int,
) -> None:
    """The ceilings bound what an instance serves at any batch (beyond ``max_batch``
    too: engines raise it), context, prompt length and prefill batch."""
    model, name, gpu, tp = case
    perf = instance_perf(model, name, gpu, tp)
    assert batch / perf.decode_step_float_s(batch, batch * context, context) <= (
        perf.decode_ceiling_tps
    )
    pass_s = float(perf.prefill_latency_s(prompt, batch=prompts))
    assert prompts * prompt / pass_s <= perf.prefill_ceiling_tps
    work_per_token = float(perf.prefill_work(prompt)) / prompt
    assert perf.prefill_capacity_work_per_s / work_per_token <= perf.prefill_ceiling_tps


def test_the_ceilings_are_reached_at_large_batches_and_short_contexts() -> None:
    """Not a loose bound: a compute-bound batch at no context comes within a few percent
    (decode), and short prompts within a few percent too (prefill)."""
    perf = instance_perf(LLAMA_8B, "h200", H200, 1)
    batch = 65_536.0
    assert batch / perf.decode_step_float_s(batch, 0.0, 0.0) > 0.95 * perf.decode_ceiling_tps
    work_per_token = float(perf.prefill_work(16.0)) / 16.0
    assert perf.prefill_capacity_work_per_s / work_per_token > 0.99 * perf.prefill_ceiling_tps
    unfit = instance_perf(LLAMA_70B, "l20", L20, 1)
    assert unfit.decode_ceiling_tps == unfit.prefill_ceiling_tps == 0.0


def test_narrower_weights_raise_the_ceilings_by_their_compute_speedup() -> None:
    """fp8 weights (1 byte a parameter) may run their GEMMs at twice bf16's rate, which
    the card's bf16 FLOPs leave out: the ceilings double, so that such an engine's
    rate is never taken for a broken counter."""
    bf16 = instance_perf(LLAMA_8B, "h200", H200, 1)
    fp8 = instance_perf(
        LLAMA_8B.model_copy(update={"weight_bytes_per_param": 1.0}), "h200", H200, 1
    )
    assert fp8.decode_ceiling_tps == pytest.approx(2 * bf16.decode_ceiling_tps, rel=0.01)
    assert fp8.prefill_ceiling_tps == pytest.approx(2 * bf16.prefill_ceiling_tps, rel=0.01)


def test_kv_transfer_is_bytes_over_the_link() -> None:
    # 1000 tokens x 128 KiB over 400 Gb/s (50 GB/s) = 2.62 ms; 8x slower at 50 Gb/s.
    fast = float(kv_transfer_s(1000, 131072, 400))
    slow = float(kv_transfer_s(1000, 131072, 50))
    assert fast == pytest.approx(1000 * 131072 / 50e9)
    assert slow == pytest.approx(8 * fast)
    assert np.allclose(kv_transfer_s(np.array([0, 2000]), 131072, 400), [0.0, 2 * fast])


def test_counters_read_decode_as_busy_at_any_batch() -> None:
    perf = instance_perf(LLAMA_8B, "h200", H200, 1)
    assert float(perf.decode_gpu_util(1.0)) > 0.99  # one sequence per instance is enough
    assert float(perf.prefill_gpu_util(0.3)) == pytest.approx(0.3, abs=0.02)
    low, high = float(perf.decode_sm_active(1, 1.0)), float(perf.decode_sm_active(200, 1.0))
    assert 0.4 < low < high <= 1.0


@pytest.mark.parametrize(
    "model, gpu, tp",
    [(LLAMA_8B, H200, 1), (QWEN_32B, H100, 2), (LLAMA_70B, H20, 4), (LLAMA_8B, L20, 8)],
)
def test_the_float_forms_are_the_one_point_forms_bit_for_bit(
    model: ModelSpec, gpu: GpuType, tp: int
) -> None:
    """The planner's bisections call the float forms one point at a time; they must
    give exactly what numpy gives for that one point (or a decision would move)."""
    perf = instance_perf(model, "gpu", gpu, tp)
    rng = np.random.default_rng(tp)
    batches = [0.0, 1e-12, 1.0, 256.0, *rng.uniform(0.0, 300.0, 400)]
    contexts = [0.0, 1.0, 1_000.0, 131_072.0, *rng.uniform(0.0, 200_000.0, 400)]
    for batch, context in zip(batches, contexts, strict=True):
        one_point = float(perf.decode_step_s(batch, batch * context, context))
        assert perf.decode_step_float_s(batch, batch * context, context) == one_point
    prompts = [0.0, 1.0, *rng.uniform(0.0, 200.0, 300), *rng.uniform(0.0, 200_000.0, 300)]
    for prompt in prompts:
        assert perf.prefill_latency_one_s(float(prompt)) == float(perf.prefill_latency_s(prompt))


def _decode_step_in_full_s(perf: InstancePerf, batch: float, kv: float, context: float) -> float:
    """``decode_step_scalar_s`` as first written, every term from the fitted parameters
    (the form its precomputed ``_decode_terms`` must reproduce bit for bit)."""

    def smooth_max(a: float, b: float, k: float) -> float:
        hi, lo = (a, b) if a >= b else (b, a)
        if hi <= 0.0:
            return 0.0
        return hi * (1.0 + (lo / hi) ** k) ** (1.0 / k)

    d = perf.decode_params
    weights = perf.weight_bytes / (perf.eta_bandwidth * perf.bandwidth_bps)
    compute = 2.0 * perf.params * max(batch, 1e-9) / (perf.eta_compute_decode * perf.flops)
    floor = d["attention_floor_s_per_kv_gb"] * context / perf.gpus * perf.kv_bytes_per_token / 1e9
    reads = kv * perf.kv_bytes_per_token / (perf.eta_bandwidth * perf.bandwidth_bps)
    return (
        d["overhead_s"]
        + d["overhead_s_per_weight_gb"] * perf.weight_bytes / 1e9
        + smooth_max(weights, compute, d["k_gemm"])
        + smooth_max(floor, reads, d["k_attention"])
    )


@settings(max_examples=300, deadline=None)
@given(
    card=st.sampled_from([("h200", H200), ("h100", H100), ("h20", H20), ("l20", L20)]),
    model=st.sampled_from([LLAMA_8B, QWEN_32B, LLAMA_70B]),
    gpus=st.sampled_from([1, 2, 4, 8]),
    batch=st.one_of(st.floats(0, 512), st.integers(0, 512), st.just(1e-9), st.just(1e-12)),
    kv=st.one_of(st.floats(0, 1e7), st.integers(0, 10**7)),
    context=st.one_of(st.floats(0, 1e5), st.integers(0, 10**5)),
)
def test_decode_step_scalar_is_bit_identical_to_the_formula_in_full(
    card: tuple[str, GpuType],
    model: ModelSpec,
    gpus: int,
    batch: float,
    kv: float,
    context: float,
) -> None:
    """The simulator's hot loop and the planner read ``decode_step_scalar_s``; working its
    constant terms out once must not move a single bit of its result."""
    perf = instance_perf(model, card[0], card[1], gpus)
    fast = perf.decode_step_scalar_s(batch, kv, context)
    assert fast == _decode_step_in_full_s(perf, batch, kv, context)
    assert fast.hex() == _decode_step_in_full_s(perf, batch, kv, context).hex()
