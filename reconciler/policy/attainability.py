"""Which share of a recorded load a service cannot serve within its TTFT SLO on any
amount of capacity: ``heteroscale validate --trace``.

A request whose TTFT misses the SLO even on an idle instance (own prefill + KV transfer
over an idle link + the first decode step) is lost whatever the autoscaler does. The
check uses the planner's own pieces: the instance models from ``planner.perf_context``
(each role's most preferred allowed GPU type in the cluster that fits the model), KV
transfer at the cluster's RDMA link, ``capacity.unattainable`` for the prompt length
from which the SLO is out of reach, and ``capacity.idle_ttft_s`` per request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reconciler.desired.models import ClusterSpec, ServicePolicy
from reconciler.policy.capacity import (
    RequestMix,
    idle_ttft_s,
    transfer_s_per_token,
    unattainable,
)
from reconciler.policy.planner import perf_context

# Above this share of requests lost on any capacity, ``validate --trace`` warns: the
# SLO's tail (1 - quantile, typically 5-10 %) should be spent on queueing, not on
# requests no instance can serve.
WARN_SHARE = 0.01


@dataclass(frozen=True)
class TraceAttainability:
    """One service's unattainable part of a trace."""

    service: str
    gpu_type: str  # the prefill GPU type the idle TTFT was computed on
    ttft_slo_ms: float
    share: float  # of the trace's requests
    above_prompt_tokens: float | None  # prompt length from which the SLO is out of reach

    def warning(self, trace_name: str) -> str:
        threshold = (
            f" (prompts above {self.above_prompt_tokens:,.0f} tokens)"
            if self.above_prompt_tokens is not None
            else ""
        )
        return (
            f"service {self.service}: {self.share:.1%} of the requests in {trace_name} cannot "
            f"meet TTFT {self.ttft_slo_ms:g} ms even on an idle {self.gpu_type} "
            f"instance{threshold}"
        )


def trace_attainability(
    policy: ServicePolicy,
    cluster: ClusterSpec,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
) -> TraceAttainability | None:
    """The share of the requests (``prompt_tokens``/``output_tokens``, one entry per
    request) that miss the policy's TTFT SLO even on an idle instance in ``cluster``,
    and the prompt length above which they do. None when a role has no GPU type in
    the cluster that fits the model (nothing to judge on)."""
    perf = perf_context(policy, cluster)
    if perf is None:
        return None
    # The first token's decode step on an idle decode instance (batch 1), as the
    # simulator counts it for its ``unattainable_share``.
    first_step_s = perf.decode.decode_step_scalar_s(1.0, 1.0, 1.0)
    slo_s = policy.slo.ttft_ms / 1000.0
    per_token_s = transfer_s_per_token(perf.prefill.kv_bytes_per_token, perf.link_gbps)
    mix = RequestMix.from_samples(prompt_tokens, output_tokens)
    lost = unattainable(perf.prefill, mix, slo_s, per_token_s, first_step_s)
    # The mix's share interpolates within ~9 % wide buckets; the trace has the exact
    # lengths, so count its requests (idle TTFT over distinct prompt lengths: cheap).
    lengths, counts = np.unique(np.asarray(prompt_tokens, dtype=float), return_counts=True)
    misses = idle_ttft_s(perf.prefill, lengths, per_token_s, first_step_s) > slo_s
    share = float(counts[misses].sum() / counts.sum()) if counts.size else 0.0
    return TraceAttainability(
        service=policy.name,
        gpu_type=perf.prefill.gpu_type,
        ttft_slo_ms=policy.slo.ttft_ms,
        share=share,
        above_prompt_tokens=lost.above_prompt_tokens if share > 0 else None,
    )


__all__ = ["WARN_SHARE", "TraceAttainability", "trace_attainability"]
