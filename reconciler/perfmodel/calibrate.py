"""Fit the simulator's performance model to the real GPU measurements in ``shared/calibration``.

Run ``python -m reconciler.perfmodel.calibrate`` to refit and rewrite
``reconciler/perfmodel/calibration_fit.json`` (the reviewed file the simulator loads, so the
package works without ``shared/``); ``--check`` refits and exits 1 if the shipped file
is stale. The raw measurements are never copied into the repository.

What is fitted (all on the ``graph_fused`` rows, the serving-engine kernel layout):

* **Decode step time** (time between tokens) of ``batch`` sequences at context ``ctx``::

      t = overhead_s + overhead_s_per_weight_gb * W_gb
          + smax(W / (eta_bw * BW), 2 * P * batch / (eta_compute * F), k_gemm)
          + smax(attention_floor_s_per_kv_gb * kv_seq_gb, KV / (eta_bw * BW), k_attn)

  ``W`` weight bytes, ``P`` parameters, ``BW``/``F`` the card's datasheet bandwidth and
  bf16 compute, ``KV = batch * (ctx + 1) * kv_bytes_per_token`` the cache read per step,
  ``kv_seq_gb`` one sequence's cache. ``smax(a, b, k) = (a^k + b^k)^(1/k)`` is a smooth
  roofline (memory- vs compute-bound GEMMs; bandwidth- vs latency-bound attention: one
  long sequence cannot fill the GPU, which is why batch 1 at ctx 4096 costs 1.2 ms more
  than at ctx 1024 while batch 8 costs almost nothing extra). The bandwidth and compute
  efficiencies are fitted per measured card (the H200 runs into its 700 W power cap
  earlier than the H100, so it reaches a lower share of its datasheet compute); the
  fixed overheads are shared.
* **Prefill latency** of ``batch`` prompts of ``prompt`` tokens::

      t = overhead_s + smax(W / (eta_floor_bw * BW),
                            (2 * P * batch * prompt + 2 * kvb * batch * prompt^2 * 1/eta_attention)
                            / (eta_compute * F), k)

  The quadratic term is causal attention: ``2 * L * heads * head_dim * S^2`` FLOPs,
  which equals ``2 * kv_bytes_per_token * S^2`` for a grouped-query model with four
  query heads per KV head and 2-byte KV entries (the 8 B shape); its efficiency is
  fitted. The memory floor is the weight read that bounds very short prompts.
* **Utilisation counters** (``util.csv``): prefill ``utilization.gpu`` against the
  measured busy fraction (Poisson arrivals; the periodic phase aliases with the counter
  and is left out), decode ``utilization.gpu`` while any sequence runs (it reads 100 %
  at every batch), and an SM-activity proxy: normalised power draw
  ``(P - P_idle) / (P_cap - P_idle)``, as a function of decode batch and of prefill busy
  fraction. The calibration has no DCGM SM-activity counter; power tracks how much of
  the chip is working and saturates at the cap, which is how the paper describes SM
  activity, so it stands in for it (an assumption, stated in ``perf``).

The fit is a small Levenberg-Marquardt on relative errors (numpy only), made
deterministic by fixed starting points, followed by a few iteratively reweighted
rounds that trade mean error for a smaller worst-case error.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FIT_PATH = Path(__file__).with_name("calibration_fit.json")
FIT_VERSION = 1

# Datasheet figures of the measured cards (SXM parts): dense bf16 TFLOP/s, HBM GB/s,
# memory GiB. The fit expresses every efficiency relative to these, so the catalogue's
# own datasheet figures (ClusterSpec.gpu_types) scale the model to unmeasured cards.
MEASURED_CARDS: dict[str, dict[str, float]] = {
    "h200": {"bf16_tflops": 989.0, "memory_bandwidth_gbps": 4800.0, "memory_gib": 141.0},
    "h100": {"bf16_tflops": 989.0, "memory_bandwidth_gbps": 3350.0, "memory_gib": 80.0},
}

# (sub-folder of shared/calibration, card, label)
DATASETS: tuple[tuple[str, str, str], ...] = (
    ("", "h200", "llama-8b on h200"),
    ("h100", "h100", "llama-8b on h100"),
    ("qwen32b-h200", "h200", "qwen-32b on h200"),
)
CAPACITY_MODE = "graph_fused"

Num = float | np.ndarray  # a scalar, or one value per point


class CalibrationDataError(RuntimeError):
    """The calibration folder is missing or does not have the expected layout."""


def shared_dir() -> Path | None:
    """The shared data folder: ``$HETEROSCALE_SHARED``, else ``<repo>/../shared``.

    Returns ``None`` when neither exists (e.g. an installed package without the data)."""
    override = os.environ.get("HETEROSCALE_SHARED")
    if override:
        path = Path(override)
        return path if path.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared"
    return candidate if candidate.is_dir() else None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ModelShape:
    """The measured model's size: parameters, weight bytes, KV-cache bytes per token."""

    params: float
    weight_bytes: float
    kv_bytes_per_token: float


@dataclass(frozen=True)
class DecodePoint:
    """One decode timing: ``batch`` sequences at context ``ctx``, a step's seconds."""

    dataset: str
    card: str
    model: ModelShape
    batch: int
    ctx: int
    step_s: float


@dataclass(frozen=True)
class PrefillPoint:
    """One prefill timing: ``batch`` prompts of ``prompt`` tokens, the pass's seconds."""

    dataset: str
    card: str
    model: ModelShape
    batch: int
    prompt: int
    latency_s: float


@dataclass(frozen=True)
class UtilPhase:
    """One load phase of ``util.csv``: the busy fraction and the counters read over it."""

    dataset: str
    workload: str
    batch: int | None
    arrivals: str
    busy: float
    util_gpu: float
    power_w: float


@dataclass(frozen=True)
class CalibrationData:
    """Every dataset's rows, the idle power per dataset, and the files' hashes."""

    decode: tuple[DecodePoint, ...]
    prefill: tuple[PrefillPoint, ...]
    util: tuple[UtilPhase, ...]
    idle_power_w: dict[str, float]
    files: dict[str, str]  # relative path -> sha256


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise CalibrationDataError(f"{path}: missing (see shared/calibration/README.md)")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _capacity_points(
    path: Path, length_column: str, seconds_column: str
) -> list[tuple[int, int, float]]:
    """(batch, length, seconds) of each successful capacity-mode row of a timing table."""
    return [
        (int(row["batch"]), int(row[length_column]), float(row[seconds_column]))
        for row in _read_csv(path)
        if row["mode"] == CAPACITY_MODE and row["status"] == "ok"
    ]


def load_calibration(calibration_dir: Path) -> CalibrationData:
    """Read every dataset's prefill, decode and util tables and the model shapes."""
    decode: list[DecodePoint] = []
    prefill: list[PrefillPoint] = []
    util: list[UtilPhase] = []
    idle: dict[str, float] = {}
    files: dict[str, str] = {}
    for sub, card, label in DATASETS:
        folder = calibration_dir / sub if sub else calibration_dir
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise CalibrationDataError(f"{meta_path}: missing")
        meta = json.loads(meta_path.read_text())
        model_meta = meta["model"]
        model = ModelShape(
            params=float(model_meta["params_total"]),
            weight_bytes=float(model_meta["weights_bytes"]),
            kv_bytes_per_token=float(model_meta["kv_cache_bytes_per_token"]),
        )
        for name in ("decode.csv", "prefill.csv", "util.csv"):
            files[f"{sub + '/' if sub else ''}{name}"] = _sha256(folder / name)
        decode.extend(
            DecodePoint(label, card, model, batch, ctx, step_s)
            for batch, ctx, step_s in _capacity_points(
                folder / "decode.csv", "ctx", "step_s_median"
            )
        )
        prefill.extend(
            PrefillPoint(label, card, model, batch, prompt_len, latency_s)
            for batch, prompt_len, latency_s in _capacity_points(
                folder / "prefill.csv", "prompt_len", "latency_s_median"
            )
        )
        for row in _read_csv(folder / "util.csv"):
            if row["workload"] == "idle":
                idle[label] = float(row["smi_power_w_mean"])
                continue
            if row["mode"] != CAPACITY_MODE:
                continue
            util.append(
                UtilPhase(
                    dataset=label,
                    workload=row["workload"],
                    batch=int(row["batch"]) if row["workload"] == "decode" else None,
                    arrivals=row["arrivals"],
                    busy=float(row["work_duty"]),
                    util_gpu=float(row["smi_util_gpu_mean"]) / 100.0,
                    power_w=float(row["smi_power_w_mean"]),
                )
            )
    if not decode or not prefill:
        raise CalibrationDataError(f"{calibration_dir}: no {CAPACITY_MODE} rows found")
    return CalibrationData(tuple(decode), tuple(prefill), tuple(util), idle, files)


# --------------------------------------------------------------------------- model forms


def smooth_max(a: Num, b: Num, k: float) -> np.ndarray:
    """``(a^k + b^k)^(1/k)``: a roofline with a soft knee (k -> inf is max)."""
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    # Factor out the larger term so large k cannot overflow.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)
    return hi * (1.0 + ratio**k) ** (1.0 / k)


def smooth_max_float(a: float, b: float, k: float) -> float:
    """:func:`smooth_max` of two floats, bit for bit as numpy evaluates it on one point
    (a bisection calls it one point at a time, where numpy's per-call cost dominates).
    On one point numpy's inner power runs on a 0-d array (its ufunc) and the outer one
    on a numpy scalar (libm's ``pow``, as Python's ``**``); the two round differently
    in the last bit for some inputs, so each is kept."""
    hi, lo = (a, b) if a >= b else (b, a)
    ratio = lo / hi if hi > 0 else 0.0
    result: float = hi * (1.0 + float(np.power(ratio, k))) ** (1.0 / k)
    return result


@dataclass(frozen=True)
class ModelOnCard:
    """The model's size and the card's datasheet rates that both forms read: floats for
    one instance, or arrays (one value per point) while fitting."""

    weight_bytes: Num
    model_params: Num
    kv_bytes_per_token: Num
    bandwidth_bps: Num
    flops: Num


def decode_terms(
    params: Mapping[str, float],
    *,
    batch: Num,
    kv_tokens: Num,
    max_seq_tokens: Num,
    model: ModelOnCard,
    eta_bw: Num,
    eta_compute: Num,
) -> tuple[Num, Num, Num, Num, Num]:
    """The decode form's fixed overhead and the two operands of each roofline, in the
    same arithmetic for floats and arrays (so both forms below agree bit for bit).

    ``kv_tokens`` is the cache read per step (sum of contexts over the batch),
    ``max_seq_tokens`` one sequence's context (the latency floor of attention)."""
    return (
        params["overhead_s"] + params["overhead_s_per_weight_gb"] * model.weight_bytes / 1e9,
        model.weight_bytes / (eta_bw * model.bandwidth_bps),
        2.0 * model.model_params * batch / (eta_compute * model.flops),
        params["attention_floor_s_per_kv_gb"] * max_seq_tokens * model.kv_bytes_per_token / 1e9,
        kv_tokens * model.kv_bytes_per_token / (eta_bw * model.bandwidth_bps),
    )


def decode_step_s(params: Mapping[str, float], terms: tuple[Num, Num, Num, Num, Num]) -> np.ndarray:
    """The decode step-time form (see the module docstring) of :func:`decode_terms`,
    vectorised."""
    fixed, weights, compute, floor, reads = terms
    gemm = smooth_max(np.zeros_like(compute, dtype=float) + weights, compute, params["k_gemm"])
    attention = smooth_max(floor, reads, params["k_attention"])
    result: np.ndarray = fixed + gemm + attention
    return result


def decode_step_float_s(
    params: Mapping[str, float], terms: tuple[Num, Num, Num, Num, Num]
) -> float:
    """:func:`decode_step_s` of one point, bit for bit (see :func:`smooth_max_float`)."""
    fixed, weights, compute, floor, reads = terms
    gemm = smooth_max_float(float(weights), float(compute), params["k_gemm"])
    attention = smooth_max_float(float(floor), float(reads), params["k_attention"])
    return float(fixed) + gemm + attention


def prefill_terms(
    params: Mapping[str, float], *, batch: Num, prompt: Num, model: ModelOnCard
) -> tuple[Num, Num]:
    """The prefill form's memory floor and compute time, in the same arithmetic for
    floats and arrays (``prompt * prompt`` is what numpy's ``prompt**2`` computes)."""
    work = (
        2.0 * model.model_params * batch * prompt
        + 2.0 * model.kv_bytes_per_token * batch * (prompt * prompt) / params["eta_attention"]
    )
    return (
        model.weight_bytes / (params["eta_floor_bw"] * model.bandwidth_bps),
        work / (params["eta_compute"] * model.flops),
    )


def prefill_latency_s(params: Mapping[str, float], terms: tuple[Num, Num]) -> np.ndarray:
    """The prefill latency form (see the module docstring) of :func:`prefill_terms`,
    vectorised."""
    floor, compute = terms
    return params["overhead_s"] + smooth_max(
        np.zeros_like(compute, dtype=float) + floor, compute, params["k"]
    )


def prefill_latency_float_s(params: Mapping[str, float], terms: tuple[Num, Num]) -> float:
    """:func:`prefill_latency_s` of one point, bit for bit (see :func:`smooth_max_float`)."""
    floor, compute = terms
    return params["overhead_s"] + smooth_max_float(float(floor), float(compute), params["k"])


# --------------------------------------------------------------------------- fitting


def _levenberg_marquardt(
    residuals: Callable[[np.ndarray], np.ndarray], theta0: np.ndarray, iterations: int = 400
) -> np.ndarray:
    """Minimise ``sum(residuals(theta)^2)``; forward-difference Jacobian, deterministic."""
    theta = theta0.astype(float).copy()
    damping = 1e-3
    current = residuals(theta)
    cost = float(current @ current)
    for _ in range(iterations):
        step = 1e-6 * np.maximum(1.0, np.abs(theta))
        jac = np.empty((current.size, theta.size))
        for j in range(theta.size):
            shifted = theta.copy()
            shifted[j] += step[j]
            jac[:, j] = (residuals(shifted) - current) / step[j]
        gram = jac.T @ jac
        grad = jac.T @ current
        improved = False
        for _attempt in range(12):
            try:
                delta = np.linalg.solve(gram + damping * np.diag(np.diag(gram) + 1e-12), -grad)
            except np.linalg.LinAlgError:
                damping *= 10.0
                continue
            trial = residuals(theta + delta)
            trial_cost = float(trial @ trial)
            if np.isfinite(trial_cost) and trial_cost < cost:
                theta, current, cost = theta + delta, trial, trial_cost
                damping = max(damping / 3.0, 1e-9)
                improved = True
                break
            damping *= 10.0
        if not improved or float(np.max(np.abs(delta))) < 1e-10:
            break
    return theta


def _fit_minimax(
    relative_error: Callable[[np.ndarray], np.ndarray], theta0: np.ndarray, rounds: int = 6
) -> np.ndarray:
    """Least squares, then iteratively reweighted towards the worst-case error."""
    theta = _levenberg_marquardt(relative_error, theta0)
    weights = np.ones_like(relative_error(theta))
    best = theta
    best_max = float(np.max(np.abs(relative_error(theta))))
    for _ in range(rounds):
        errors = np.abs(relative_error(theta))
        weights = weights * (1.0 + errors / max(float(errors.max()), 1e-12))
        weights = weights / weights.mean()
        root_weights = np.sqrt(weights)

        def weighted(t: np.ndarray, scale: np.ndarray = root_weights) -> np.ndarray:
            return scale * relative_error(t)

        theta = _levenberg_marquardt(weighted, theta)
        worst = float(np.max(np.abs(relative_error(theta))))
        if worst < best_max:
            best, best_max = theta, worst
    return best


def _card(name: str) -> tuple[float, float]:
    spec = MEASURED_CARDS[name]
    return spec["memory_bandwidth_gbps"] * 1e9, spec["bf16_tflops"] * 1e12


def _models_on_cards(points: Sequence[DecodePoint] | Sequence[PrefillPoint]) -> ModelOnCard:
    """Each point's model and card, one array a field."""
    return ModelOnCard(
        weight_bytes=np.array([p.model.weight_bytes for p in points]),
        model_params=np.array([p.model.params for p in points]),
        kv_bytes_per_token=np.array([p.model.kv_bytes_per_token for p in points]),
        bandwidth_bps=np.array([_card(p.card)[0] for p in points]),
        flops=np.array([_card(p.card)[1] for p in points]),
    )


def fit_decode(points: Sequence[DecodePoint]) -> tuple[dict[str, Any], np.ndarray]:
    cards = sorted({p.card for p in points})
    shared_names = ["overhead_s", "overhead_s_per_weight_gb", "attention_floor_s_per_kv_gb"]

    def unpack(theta: np.ndarray) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        pos = np.exp(theta)
        shared = dict(zip(shared_names, pos[:3], strict=True))
        shared["k_gemm"] = 1.0 + float(pos[3])
        shared["k_attention"] = 1.0 + float(pos[4])
        per_card = {
            card: {"eta_bandwidth": float(pos[5 + 2 * i]), "eta_compute": float(pos[6 + 2 * i])}
            for i, card in enumerate(cards)
        }
        return shared, per_card

    card_index = np.array([cards.index(p.card) for p in points])
    model = _models_on_cards(points)
    batch = np.array([float(p.batch) for p in points])
    ctx = np.array([float(p.ctx + 1) for p in points])  # the step attends over ctx + 1 positions

    def predict(theta: np.ndarray) -> np.ndarray:
        shared, per_card = unpack(theta)
        eta_bw = np.array([per_card[c]["eta_bandwidth"] for c in cards])[card_index]
        eta_compute = np.array([per_card[c]["eta_compute"] for c in cards])[card_index]
        terms = decode_terms(
            shared,
            batch=batch,
            kv_tokens=batch * ctx,
            max_seq_tokens=ctx,
            model=model,
            eta_bw=eta_bw,
            eta_compute=eta_compute,
        )
        return decode_step_s(shared, terms)

    measured = np.array([p.step_s for p in points])
    theta0 = np.log(np.array([1e-3, 3e-5, 3e-3, 1.5, 3.0] + [0.8, 0.6] * len(cards)))
    theta = _fit_minimax(lambda t: predict(t) / measured - 1.0, theta0)
    shared, per_card = unpack(theta)
    return {"shared": shared, "cards": per_card}, predict(theta) / measured - 1.0


def fit_prefill(points: Sequence[PrefillPoint]) -> tuple[dict[str, float], np.ndarray]:
    names = ["overhead_s", "eta_floor_bw", "eta_compute", "eta_attention"]

    def unpack(theta: np.ndarray) -> dict[str, float]:
        pos = np.exp(theta)
        params = {name: float(v) for name, v in zip(names, pos[:4], strict=True)}
        params["k"] = 1.0 + float(pos[4])
        return params

    model = _models_on_cards(points)
    batch = np.array([float(p.batch) for p in points])
    prompt = np.array([float(p.prompt) for p in points])

    def predict(theta: np.ndarray) -> np.ndarray:
        params = unpack(theta)
        return prefill_latency_s(
            params, prefill_terms(params, batch=batch, prompt=prompt, model=model)
        )

    measured = np.array([p.latency_s for p in points])
    theta0 = np.log(np.array([2e-4, 0.6, 0.6, 0.7, 2.0]))
    theta = _fit_minimax(lambda t: predict(t) / measured - 1.0, theta0)
    return unpack(theta), predict(theta) / measured - 1.0


def fit_util(data: CalibrationData, power_cap_w: float = 700.0) -> dict[str, Any]:
    """Counters as functions of load (see the module docstring)."""
    poisson = [
        u for u in data.util if u.workload == "prefill" and u.arrivals in ("poisson", "backtoback")
    ]
    busy = np.array([u.busy for u in poisson])
    counter = np.array([u.util_gpu for u in poisson])
    # Least squares through the origin: idle reads 0.
    prefill_util_per_busy = float(busy @ counter / (busy @ busy))

    def normalised_power(u: UtilPhase) -> float:
        idle = data.idle_power_w[u.dataset]
        return min(1.0, max(0.0, (u.power_w - idle) / (power_cap_w - idle)))

    power = np.array([normalised_power(u) for u in poisson])
    prefill_sm_per_busy = float(busy @ power / (busy @ busy))

    decode = [u for u in data.util if u.workload == "decode" and u.batch is not None]
    batches = sorted({u.batch for u in decode if u.batch is not None})
    sm_table = [
        float(np.mean([normalised_power(u) for u in decode if u.batch == b])) for b in batches
    ]
    # Monotone in batch (power only rises with work); removes sampling wiggles.
    sm_table = list(np.maximum.accumulate(np.array(sm_table)))
    return {
        "prefill_util_per_busy": prefill_util_per_busy,
        "decode_util_when_active": float(np.mean([u.util_gpu for u in decode])),
        "prefill_sm_active_per_busy": prefill_sm_per_busy,
        "decode_sm_active_batch": [float(b) for b in batches],
        "decode_sm_active_value": [round(float(v), 6) for v in sm_table],
        "power_cap_w": power_cap_w,
    }


def _round(value: Any, digits: int = 9) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def fit_all(calibration_dir: Path) -> dict[str, Any]:
    """Fit everything and return the content of ``calibration_fit.json``."""
    data = load_calibration(calibration_dir)
    decode, decode_err = fit_decode(data.decode)
    prefill, prefill_err = fit_prefill(data.prefill)
    util = fit_util(data)

    def quality(points: Sequence[Any], errors: np.ndarray) -> dict[str, Any]:
        per_dataset: dict[str, float] = {}
        for p, e in zip(points, errors, strict=True):
            per_dataset[p.dataset] = max(per_dataset.get(p.dataset, 0.0), abs(float(e)))
        return {
            "points": len(points),
            "max_abs_rel_error": float(np.max(np.abs(errors))),
            "rms_rel_error": float(math.sqrt(float(np.mean(errors**2)))),
            "max_abs_rel_error_by_dataset": per_dataset,
        }

    return _round(
        {
            "version": FIT_VERSION,
            "source": "shared/calibration (graph_fused rows); refit with `python -m reconciler.perfmodel.calibrate`",
            "source_sha256": data.files,
            "measured_cards": MEASURED_CARDS,
            "decode": decode,
            "prefill": prefill,
            "util": util,
            "quality": {
                "decode": quality(data.decode, decode_err),
                "prefill": quality(data.prefill, prefill_err),
            },
        }
    )


def first_difference(a: Any, b: Any, rtol: float = 1e-4, path: str = "") -> str | None:
    """Where two fitted documents differ beyond ``rtol`` (floats) or at all (anything
    else); ``None`` when they agree. A refit on another machine may differ in the last
    digits of the optimiser's floating point, not beyond this."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path or 'top level'}: keys {sorted(a.keys() ^ b.keys())} differ"
        for key in sorted(a):
            found = first_difference(a[key], b[key], rtol, f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, rtol, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        if not math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-12):
            return f"{path}: {a} != {b}"
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reconciler.perfmodel.calibrate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--calibration", type=Path, help="calibration folder (default: <shared>/calibration)"
    )
    parser.add_argument("--out", type=Path, default=FIT_PATH)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the shipped fit differs from a refit"
    )
    args = parser.parse_args(argv)
    folder = args.calibration
    if folder is None:
        shared = shared_dir()
        if shared is None:
            print(
                "error: shared data folder not found; set HETEROSCALE_SHARED or pass --calibration",
                file=sys.stderr,
            )
            return 1
        folder = shared / "calibration"
    try:
        fitted = fit_all(folder)
    except CalibrationDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(fitted, indent=2, sort_keys=True) + "\n"
    if args.check:
        current = json.loads(args.out.read_text()) if args.out.exists() else None
        difference = first_difference(current, fitted)
        if difference is not None:
            print(
                f"stale: {args.out} ({difference}); run `python -m reconciler.perfmodel.calibrate`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    q = fitted["quality"]
    print(
        f"wrote {args.out}: decode max error {q['decode']['max_abs_rel_error']:.1%} over {q['decode']['points']} points, "
        f"prefill max error {q['prefill']['max_abs_rel_error']:.1%} over {q['prefill']['points']} points"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
