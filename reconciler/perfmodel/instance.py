"""Performance model of one serving instance: prefill latency, decode step time, KV-cache
capacity, KV transfer time and the GPU counters, per (model, GPU type, tensor-parallel size).

The coefficients come from ``calibration_fit.json``, fitted by
``python -m reconciler.perfmodel.calibrate`` to real measurements of an 8 B model on an H200 and
an H100 and of a 32.8 B model on the H200 (``shared/calibration``); the fitted forms are
described in ``reconciler.perfmodel.calibrate``. They reproduce every measured point within 5 %
(decode 3.3 %, prefill 3.9 % worst case).

Assumptions (each one a modelling choice, not a measurement):

1. **Other GPU types** scale from the measured cards by their datasheet figures
   (``ClusterSpec.gpu_types``): prefill by dense bf16 compute (``bf16_tflops``), decode
   by memory bandwidth (``memory_bandwidth_gbps``) for weight and KV reads and by compute
   for the batch GEMMs, with the efficiencies (achieved / datasheet) fitted on the
   measured cards. A catalogue card whose bandwidth and compute are within 2 % of a
   measured card (the H800 is an H100 with a cut NVLink) uses that card's decode
   efficiencies; any other card uses their mean. Fixed per-step overheads (kernel
   launches, small kernels) are taken as the same on every card.
2. **Other model sizes** scale by parameter count (prefill FLOPs = 2 x params x tokens,
   the measured 8 B / 32.8 B ratio is 4.1x against 4.08x in parameters) and by weight
   bytes (``params x weight_bytes_per_param``) plus KV bytes (``kv_bytes_per_token``) for
   decode. Causal attention costs ``2 x kv_bytes_per_token x S^2`` FLOPs, exact for four
   query heads per KV head and 2-byte KV entries; models with larger query groups (70 B:
   eight) do proportionally more attention work than modelled, which matters only for
   prompts of many thousands of tokens.
3. **Tensor parallelism** = ``gpus_per_instance``: bandwidth and compute grow by
   ``tp x 0.9^log2(tp)`` (90 % kept per doubling, for the all-reduces between layers);
   fixed overheads do not shrink; weights and KV cache are split evenly.
4. **Memory**: an engine may use 90 % of the GPUs' memory (vLLM's default
   ``gpu_memory_utilization``); 1.5 GiB per GPU is kept for activations; the rest after
   the weights holds the KV cache. A model that does not fit (room for fewer than 1,024
   tokens of KV cache: ``reconciler.perfmodel.memory``) has zero capacity.
5. **Batching**: decode batches at most ``max_batch`` sequences per instance (vLLM's
   ``max_num_seqs`` default, 256) and no more than the KV cache holds. Every sequence in
   an instance's batch sees the same step time, computed at the batch's mean context.
   A busy prefill instance batches prompts, so its sustained capacity is its compute
   at the fitted efficiency (fixed per-pass costs are amortised); one prompt alone
   takes the full per-request latency.
6. **KV transfer** from a prefill to a decode instance moves ``kv_bytes_per_token x
   prompt tokens`` over the link between them: ``network.rdma_gbps`` (gigabits/s per
   instance) when both sit in one RDMA subgroup, ``network.cross_subgroup_gbps``
   otherwise. The link is shared by the instance's transfers, so a prefill instance
   cannot process prompts faster than its link can ship their KV cache.
7. **Counters**: prefill ``utilization.gpu`` follows the busy fraction (fitted slope
   ~1.02); decode ``utilization.gpu`` reads 100 % on every instance running at least
   one sequence, at any batch size (measured at every batch on both cards). SM
   activity is not in the calibration data; normalised power draw
   ``(P - P_idle) / (P_cap - P_idle)`` stands in for it: ~0.54 for decode at batch 1,
   ~0.99 from batch 128, and ~1.0 x busy fraction for prefill.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from reconciler.desired.models import GpuType, ModelSpec
from reconciler.perfmodel.calibrate import (
    FIT_PATH,
    ModelOnCard,
    Num,
    decode_step_s,
    decode_terms,
    prefill_latency_s,
    prefill_terms,
    smooth_max_float,
)

# Assumption 4 (memory), shared with validate.
from reconciler.perfmodel.memory import MIN_KV_TOKENS, instance_memory

TP_EFFICIENCY_PER_DOUBLING = 0.9
DEFAULT_MAX_BATCH = 256
MATCH_TOLERANCE = 0.02


@lru_cache(maxsize=4)
def load_fit(path: str | None = None) -> dict[str, Any]:
    """The shipped (or a given) ``calibration_fit.json``."""
    data: dict[str, Any] = json.loads(Path(path or FIT_PATH).read_text())
    return data


def tp_scale(gpus_per_instance: int) -> float:
    """Effective speed-up of an instance over one GPU (assumption 3)."""
    return gpus_per_instance * TP_EFFICIENCY_PER_DOUBLING ** math.log2(max(gpus_per_instance, 1))


def _decode_efficiency(fit: dict[str, Any], gpu: GpuType) -> tuple[float, float]:
    cards = fit["measured_cards"]
    for name, spec in cards.items():
        if (
            abs(gpu.memory_bandwidth_gbps / spec["memory_bandwidth_gbps"] - 1) <= MATCH_TOLERANCE
            and abs(gpu.bf16_tflops / spec["bf16_tflops"] - 1) <= MATCH_TOLERANCE
        ):
            eff = fit["decode"]["cards"][name]
            return float(eff["eta_bandwidth"]), float(eff["eta_compute"])
    etas = list(fit["decode"]["cards"].values())
    return (
        float(np.mean([e["eta_bandwidth"] for e in etas])),
        float(np.mean([e["eta_compute"] for e in etas])),
    )


class DecodeConstants(NamedTuple):
    """The parts of one instance's decode step time that do not depend on the batch,
    its cache or its context, each grouped as ``InstancePerf.decode_step_scalar_s``
    groups it (so its results are bit for bit those of computing it in full)."""

    overhead_s: float  # fixed per-step overheads, plus those per weight GB
    weights_s: float  # reading the weights once at the effective bandwidth
    two_params: float  # FLOPs per sequence of a step's GEMMs
    compute_flops: float  # effective decode compute
    floor_s_per_kv_gb: float  # attention floor per GB of one sequence's cache
    gpus: float  # the tensor-parallel group, as a float
    kv_bytes_per_token: float
    bandwidth_bps: float  # effective bandwidth
    k_gemm: float  # sharpness of the weights/GEMM smooth maximum, and its inverse
    inv_k_gemm: float
    k_attention: float  # sharpness of the floor/KV-read smooth maximum, and its inverse
    inv_k_attention: float


@dataclass(frozen=True)
class InstancePerf:
    """One engine instance of one model on ``gpus`` GPUs of one type."""

    gpu_type: str
    gpus: int
    params: float  # parameters
    weight_bytes: float
    kv_bytes_per_token: float
    bandwidth_bps: float  # effective aggregate datasheet bandwidth x tp scaling
    flops: float  # likewise for bf16 compute
    eta_bandwidth: float
    eta_compute_decode: float
    kv_capacity_tokens: float
    max_batch: int
    decode_params: Mapping[str, float] = field(compare=False, repr=False)
    prefill_params: Mapping[str, float] = field(compare=False, repr=False)
    util: Mapping[str, Any] = field(compare=False, repr=False)
    # The parts of ``decode_step_scalar_s`` that do not depend on its arguments, worked
    # out once (``__post_init__``): the simulator calls it twice per generation-second.
    _decode_terms: DecodeConstants = field(init=False, compare=False, repr=False)
    # The model and card operands of the fitted forms (calibrate's decode and prefill).
    _model_on_card: ModelOnCard = field(init=False, compare=False, repr=False)
    # The parts of ``prefill_latency_one_s`` that do not depend on the prompt, likewise.
    _prefill_terms: tuple[float, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # In ModelOnCard's field order: the model's sizes, then the card's rates.
        model_on_card = ModelOnCard(
            self.weight_bytes, self.params, self.kv_bytes_per_token, self.bandwidth_bps, self.flops
        )
        object.__setattr__(self, "_model_on_card", model_on_card)
        d = self.decode_params
        bandwidth = self.eta_bandwidth * self.bandwidth_bps
        object.__setattr__(
            self,
            "_decode_terms",
            DecodeConstants(
                overhead_s=d["overhead_s"]
                + d["overhead_s_per_weight_gb"] * self.weight_bytes / 1e9,
                weights_s=self.weight_bytes / bandwidth,
                two_params=2.0 * self.params,
                compute_flops=self.eta_compute_decode * self.flops,
                floor_s_per_kv_gb=d["attention_floor_s_per_kv_gb"],
                gpus=float(self.gpus),
                kv_bytes_per_token=self.kv_bytes_per_token,
                bandwidth_bps=bandwidth,
                k_gemm=d["k_gemm"],
                inv_k_gemm=1.0 / d["k_gemm"],
                k_attention=d["k_attention"],
                inv_k_attention=1.0 / d["k_attention"],
            ),
        )

        p = self.prefill_params
        # Each as calibrate's prefill_terms groups it at batch 1 (``x * 1.0`` is ``x``).
        object.__setattr__(
            self,
            "_prefill_terms",
            (
                p["overhead_s"],
                self.weight_bytes / (p["eta_floor_bw"] * self.bandwidth_bps),
                2.0 * self.params,
                2.0 * self.kv_bytes_per_token,
                p["eta_attention"],
                p["eta_compute"] * self.flops,
                p["k"],
            ),
        )

    # ------------------------------------------------------------------ prefill

    @property
    def fits(self) -> bool:
        """Whether the weights fit with room for at least one long sequence
        (``memory.InstanceMemory.fits``, on the same figures)."""
        return self.kv_capacity_tokens >= MIN_KV_TOKENS

    def prefill_latency_s(self, prompt_tokens: np.ndarray | float, batch: int = 1) -> np.ndarray:
        """Time for one prefill pass over ``batch`` prompts of ``prompt_tokens`` each."""
        prompt = np.asarray(prompt_tokens, dtype=float)
        terms = prefill_terms(
            self.prefill_params,
            batch=np.zeros_like(prompt) + batch,
            prompt=prompt,
            model=self._model_on_card,
        )
        return prefill_latency_s(self.prefill_params, terms)

    def prefill_latency_one_s(self, prompt_tokens: float) -> float:
        """:meth:`prefill_latency_s` of one prompt alone, as a float and bit for bit the
        same (for the planner's bisections over a prompt length): calibrate's
        ``prefill_terms`` and ``prefill_latency_float_s`` inlined on the constants
        worked out once (``_prefill_terms``), the same operations on the same operands
        without the calls."""
        overhead_s, floor_s, two_params, two_kv_bytes, eta_attention, compute_rate, k = (
            self._prefill_terms
        )
        work = (
            two_params * prompt_tokens
            + two_kv_bytes * (prompt_tokens * prompt_tokens) / eta_attention
        )
        return overhead_s + smooth_max_float(float(floor_s), float(work / compute_rate), k)

    def prefill_work(self, prompt_tokens: np.ndarray | float) -> np.ndarray:
        """Work of one prompt in compute-equivalent FLOPs (linear layers + attention at
        its fitted relative efficiency). Capacity below is in the same unit."""
        prompt = np.asarray(prompt_tokens, dtype=float)
        eta_attention = self.prefill_params["eta_attention"]
        return (
            2.0 * self.params * prompt + 2.0 * self.kv_bytes_per_token * prompt**2 / eta_attention
        )

    @property
    def prefill_capacity_work_per_s(self) -> float:
        """Sustained prefill work rate of a busy instance (assumption 5)."""
        if not self.fits:
            return 0.0
        return self.prefill_params["eta_compute"] * self.flops

    # ------------------------------------------------------------------ decode

    def decode_step_s(
        self,
        batch: np.ndarray | float,
        kv_tokens: np.ndarray | float,
        mean_context: np.ndarray | float,
    ) -> np.ndarray:
        """Time between tokens for an instance decoding ``batch`` sequences holding
        ``kv_tokens`` tokens of cache in total (their mean context ``mean_context``)."""
        b = np.maximum(np.asarray(batch, dtype=float), 1e-9)
        terms = self._decode_terms_at(
            b, np.asarray(kv_tokens, dtype=float), np.asarray(mean_context, dtype=float)
        )
        return decode_step_s(self.decode_params, terms)

    def decode_step_float_s(self, batch: float, kv_tokens: float, mean_context: float) -> float:
        """:meth:`decode_step_s` of one instance as a float, bit for bit the same (for the
        planner's bisections over a batch; :meth:`decode_step_scalar_s` is faster still
        but rounds differently in the last bits): calibrate's ``decode_terms`` and
        ``decode_step_float_s`` inlined on the constants worked out once
        (``_decode_terms``, grouped as ``decode_terms`` groups them), the same
        operations on the same operands without the calls."""
        c = self._decode_terms
        compute_s = c.two_params * max(batch, 1e-9) / c.compute_flops
        floor_s = c.floor_s_per_kv_gb * (mean_context / c.gpus) * c.kv_bytes_per_token / 1e9
        reads_s = kv_tokens * c.kv_bytes_per_token / c.bandwidth_bps
        gemm = smooth_max_float(float(c.weights_s), float(compute_s), c.k_gemm)
        attention = smooth_max_float(float(floor_s), float(reads_s), c.k_attention)
        return float(c.overhead_s) + gemm + attention

    def _decode_terms_at(
        self, batch: Num, kv_tokens: Num, mean_context: Num
    ) -> tuple[Num, Num, Num, Num, Num]:
        """calibrate's :func:`decode_terms` of this instance (``batch`` already floored)."""
        return decode_terms(
            self.decode_params,
            batch=batch,
            kv_tokens=kv_tokens,
            # Heads are split over the TP group: one sequence's cache per GPU shrinks.
            max_seq_tokens=mean_context / self.gpus,
            model=self._model_on_card,
            eta_bw=self.eta_bandwidth,
            eta_compute=self.eta_compute_decode,
        )

    def decode_step_scalar_s(self, batch: float, kv_tokens: float, mean_context: float) -> float:
        """:meth:`decode_step_s` for one instance, in plain floats (the engine's hot loop).

        The overheads plus the smooth maximum of the weight reads and the batch's GEMMs,
        plus that of the attention floor and the KV-cache reads; the constant parts come
        from ``_decode_terms``."""
        (
            overhead_s,
            weights_s,
            two_params,
            compute_flops,
            floor_s_per_kv_gb,
            gpus,
            kv_bytes_per_token,
            bandwidth_bps,
            k_gemm,
            inv_k_gemm,
            k_attention,
            inv_k_attention,
        ) = self._decode_terms
        # ``max(batch, 1e-9)``, inlined (the same operand on ties and NaN).
        compute_s = two_params * (1e-9 if batch < 1e-9 else batch) / compute_flops
        floor_s = floor_s_per_kv_gb * mean_context / gpus * kv_bytes_per_token / 1e9
        reads_s = kv_tokens * kv_bytes_per_token / bandwidth_bps
        # _smooth_max, inlined: hi (1 + (lo / hi)^k)^(1/k), 0 when hi <= 0.
        hi, lo = (weights_s, compute_s) if weights_s >= compute_s else (compute_s, weights_s)
        gemm_s = 0.0 if hi <= 0.0 else hi * (1.0 + (lo / hi) ** k_gemm) ** inv_k_gemm
        hi, lo = (floor_s, reads_s) if floor_s >= reads_s else (reads_s, floor_s)
        attention_s = 0.0 if hi <= 0.0 else hi * (1.0 + (lo / hi) ** k_attention) ** inv_k_attention
        return overhead_s + gemm_s + attention_s

    def decode_capacity_tps(self, tbt_slo_s: float, mean_context: float) -> float:
        """Decode tokens/s one instance sustains with its step time within ``tbt_slo_s``,
        at sequences of ``mean_context`` tokens, within memory and batch limits (0 when
        not even one sequence meets the SLO)."""
        if not self.fits:
            return 0.0
        limit = min(float(self.max_batch), self.kv_capacity_tokens / max(mean_context, 1.0))
        if limit < 1.0:
            return 0.0
        batch = np.linspace(1.0, limit, 512)
        step = self.decode_step_s(batch, batch * mean_context, mean_context)
        ok = step <= tbt_slo_s
        if not ok.any():
            return 0.0
        tps = batch[ok] / step[ok]
        return float(tps.max())

    # ------------------------------------------------------------------ ceilings

    @property
    def _precision_speedup(self) -> float:
        """How much faster than bf16 the GEMMs may run on weights stored narrower than
        2 bytes a parameter (the card's FLOPs are bf16's, ``GpuType.bf16_tflops``): fp8
        on Hopper runs at twice bf16's rate. At least 1; a ceiling only loosens by it."""
        return max(1.0, 2.0 * self.params / self.weight_bytes)

    @property
    def prefill_ceiling_tps(self) -> float:
        """The most prompt tokens/s one instance prefills at any load and prompt mix:
        its sustained compute rate (:attr:`prefill_capacity_work_per_s`) over the least
        work a prompt token takes, its linear layers' ``2 x params`` FLOPs (attention
        only adds work, and more of it the longer the prompt), at the precision its
        weights allow (``_precision_speedup``)."""
        if not self.fits:
            return 0.0
        return self.prefill_capacity_work_per_s * self._precision_speedup / (2.0 * self.params)

    @property
    def decode_ceiling_tps(self) -> float:
        """The most output tokens/s one instance decodes at any load, batch limit and
        mix: its decode compute rate over a token's linear layers, ``2 x params``
        FLOPs. A step of ``b`` sequences takes at least their GEMMs' compute time (the
        smooth maximum is at least either term; overhead and attention only add), so
        ``b / step`` stays below it however large the batch an engine is configured to
        run (``max_batch`` is left out: engines raise it), at the precision its weights
        allow (``_precision_speedup``)."""
        if not self.fits:
            return 0.0
        c = self._decode_terms
        return c.compute_flops * self._precision_speedup / c.two_params

    # ------------------------------------------------------------------ counters

    def prefill_gpu_util(self, busy: np.ndarray | float) -> np.ndarray:
        u = self.util
        return np.clip(np.asarray(busy, dtype=float) * u["prefill_util_per_busy"], 0.0, 1.0)

    def prefill_sm_active(self, busy: np.ndarray | float) -> np.ndarray:
        u = self.util
        return np.clip(np.asarray(busy, dtype=float) * u["prefill_sm_active_per_busy"], 0.0, 1.0)

    def decode_gpu_util(self, active_fraction: np.ndarray | float) -> np.ndarray:
        """Average over instances: 100 % on every instance with a sequence in flight."""
        u = self.util
        return (
            np.clip(np.asarray(active_fraction, dtype=float), 0.0, 1.0)
            * u["decode_util_when_active"]
        )

    def decode_sm_active(
        self, batch_per_busy_instance: np.ndarray | float, active_fraction: np.ndarray | float
    ) -> np.ndarray:
        u = self.util
        batches = np.log2(np.asarray(u["decode_sm_active_batch"], dtype=float))
        values = np.asarray(u["decode_sm_active_value"], dtype=float)
        b = np.log2(np.maximum(np.asarray(batch_per_busy_instance, dtype=float), 1.0))
        return np.interp(b, batches, values) * np.clip(
            np.asarray(active_fraction, dtype=float), 0.0, 1.0
        )


def instance_perf(
    model: ModelSpec,
    gpu_type_name: str,
    gpu: GpuType,
    gpus_per_instance: int,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    fit: dict[str, Any] | None = None,
) -> InstancePerf:
    """The performance of one instance of ``model`` on ``gpus_per_instance`` GPUs of ``gpu``."""
    fit = fit or load_fit()
    scale = tp_scale(gpus_per_instance)
    eta_bandwidth, eta_compute_decode = _decode_efficiency(fit, gpu)
    memory = instance_memory(model, gpu_type_name, gpu, gpus_per_instance)
    weight_bytes = memory.weight_bytes
    kv_capacity_tokens = memory.kv_capacity_tokens
    return InstancePerf(
        gpu_type=gpu_type_name,
        gpus=gpus_per_instance,
        params=model.params_b * 1e9,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=float(model.kv_bytes_per_token),
        bandwidth_bps=gpu.memory_bandwidth_gbps * 1e9 * scale,
        flops=gpu.bf16_tflops * 1e12 * scale,
        eta_bandwidth=eta_bandwidth,
        eta_compute_decode=eta_compute_decode,
        kv_capacity_tokens=kv_capacity_tokens,
        max_batch=max_batch,
        decode_params=dict(fit["decode"]["shared"]),
        prefill_params=dict(fit["prefill"]),
        util=dict(fit["util"]),
    )


def kv_transfer_s(
    prompt_tokens: np.ndarray | float, kv_bytes_per_token: float, link_gbps: float
) -> np.ndarray:
    """Time to move a prompt's KV cache over a link of ``link_gbps`` gigabits/s."""
    return np.asarray(prompt_tokens, dtype=float) * kv_bytes_per_token / (link_gbps * 1e9 / 8.0)
