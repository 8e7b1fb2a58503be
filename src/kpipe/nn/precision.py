"""Which numeric form inference runs in (infer.precision), checked against fp32 before it is trusted.

`auto` proposes the fastest form the device runs natively: AMP on CUDA (bf16 where the GPU has it,
else fp16), bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX, as torch.cpu reports;
without them autocast emulates bf16 and is slower than fp32). The proposal is kept only if, on a
sample of the run's own validation images (each fold model on its own fold), its predictions agree
with fp32: argmax agreement >= AGREEMENT_MIN and every probability within MAX_PROB_DIFF. Otherwise
inference runs in fp32 and the choice says why in one line. An explicit fp32/bf16/fp16 is obeyed
unchecked. The choice and the check's figures go into the submission sidecar.
Usage: ``choice = choose("auto", device, check=lambda dtype: sample_probs(dtype))``
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

AGREEMENT_MIN = 0.995  # share of sample images whose top class is the same as fp32's (the issue's target)
MAX_PROB_DIFF = 0.05  # largest |p - p_fp32| over every sample image and class
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """The form inference runs in, and why; `check` holds the agreement figures when one was measured."""

    name: str  # fp32 | bf16 | fp16
    channels_last: bool
    reason: str
    check: dict[str, Any] | None = None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.name,
            "channels_last": self.channels_last,
            "reason": self.reason,
            "check": self.check,
        }


def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX tiles), as torch's own probes report."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def native_fast(device: torch.device) -> tuple[str | None, str]:
    """(the faster form this device runs natively, or None; why)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA AMP, bf16"
        return "fp16", "CUDA AMP, fp16 (this GPU has no bf16)"
    if device.type == "cpu":
        if cpu_bf16():
            return "bf16", "CPU with native bf16 (AVX512-BF16 / AMX)"
        return (
            None,
            "this CPU has no native bf16 (AVX512-BF16 or AMX): autocast would emulate it, slower than fp32",
        )
    return None, f"no reduced precision is tried on {device.type}"


def agreement(ref: np.ndarray, fast: np.ndarray) -> dict[str, Any]:
    """Argmax agreement and largest probability difference of (N, K) `fast` against fp32 `ref`."""
    if ref.shape != fast.shape or len(ref) == 0:
        raise ValueError(f"agreement: shapes {ref.shape} and {fast.shape} must match and be non-empty")
    ref64, fast64 = ref.astype(np.float64), fast.astype(np.float64)
    finite = bool(np.isfinite(fast64).all())
    return {
        "images": len(ref),
        "argmax_agreement": float((ref64.argmax(1) == fast64.argmax(1)).mean()),
        "max_prob_diff": float(np.abs(ref64 - fast64).max()) if finite else float("inf"),
        "min_agreement": AGREEMENT_MIN,
        "max_diff_allowed": MAX_PROB_DIFF,
    }


def passes(stats: dict[str, Any]) -> bool:
    return stats["argmax_agreement"] >= AGREEMENT_MIN and stats["max_prob_diff"] <= MAX_PROB_DIFF


def choose(
    requested: str,
    device: torch.device,
    channels_last: bool,
    check: Callable[[torch.dtype | None], np.ndarray] | None,
) -> PrecisionChoice:
    """The form to run in. `check(dtype)` returns the sample's (N, K) probabilities under that autocast
    dtype (None: fp32); None when there is no validation sample to check on."""
    if requested != "auto":
        return PrecisionChoice(requested, channels_last, f"infer.precision={requested} (not checked)")
    name, why = native_fast(device)
    if name is None:
        return PrecisionChoice("fp32", channels_last, f"fp32: {why}")
    if check is None:
        return PrecisionChoice(
            "fp32", channels_last, f"fp32: no validation images to check {name} against fp32 on"
        )
    ref = check(None)
    if ref.size == 0:
        return PrecisionChoice(
            "fp32",
            channels_last,
            f"fp32: none of the validation images sampled to check {name} against fp32 could be read",
        )
    stats = agreement(ref, check(DTYPES[name]))
    figures = (
        f"argmax agreement {stats['argmax_agreement']:.2%} (min {AGREEMENT_MIN:.1%}), max probability "
        f"difference {stats['max_prob_diff']:.4f} (max {MAX_PROB_DIFF}) on {stats['images']} validation images"
    )
    if passes(stats):
        return PrecisionChoice(name, channels_last, f"{name}: {why}; agrees with fp32: {figures}", stats)
    return PrecisionChoice("fp32", channels_last, f"fp32: {name} disagrees with fp32: {figures}", stats)
