"""What runs a fold model's forward at inference (infer.runtime, infer.compile): torch eager, torch.compile,
or OpenVINO on the CPU.

`to_openvino` converts a loaded fold model in memory (`openvino.convert_model`, traced on an example batch,
the batch dimension left dynamic so the last, partial batch and any number of TTA views fit) and compiles it
for the CPU with INFERENCE_PRECISION_HINT bf16 where the CPU runs bf16 natively, else f32. The result is an
`nn.Module` that takes the same normalised float32 NCHW batch the torch model takes and returns its logits,
so tta.predict_batched (views on the input, softmax in float32) and predict.predict_models run it unchanged.
`compile_torch` wraps torch.compile for inference: on the CPU with inductor's weight freezing (scoped to each
call), the batch padded to the warm-up batch's size so a short last batch never recompiles.
Whether either is kept is the infer stage's decision (the agreement check of nn.precision); openvino is
imported only here, and only when asked for.
Usage: ``ov_model = to_openvino(model, example); probs = tta.predict_batched(ov_model, x, ["identity"])``
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kpipe.errors import KpipeError
from kpipe.nn import precision
from kpipe.nn.precision import cpu_bf16

INSTALL = "pip install openvino"


def openvino_missing() -> str | None:
    """Why `import openvino` fails here, or None when it works."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return f"openvino is not importable ({e}); `{INSTALL}` adds it"
    return None


def require_openvino() -> None:
    """KpipeError naming the install command when openvino is missing (infer.runtime=openvino asked for)."""
    why = openvino_missing()
    if why is not None:
        raise KpipeError(f"infer.runtime=openvino: {why}, or set infer.runtime=auto or torch.")


def ov_precision_hint() -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for this CPU: bf16 where it is native (AVX512-BF16 / AMX), else f32
    (emulated bf16 would be slower than f32)."""
    return "bf16" if cpu_bf16() else "f32"


@dataclass(frozen=True)
class RuntimeChoice:
    """What runs the fold models' forward (torch | openvino), and why; `check` holds the agreement figures
    against torch fp32 when one was measured, `hint` OpenVINO's precision hint, `compile` infer.compile's record."""

    name: str
    reason: str
    hint: str | None = None
    check: dict[str, Any] | None = None
    compile: dict[str, Any] | None = None
    convert_seconds: float | None = None  # OpenVINO's conversion and compilation of every fold, when done

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.name,
            "reason": self.reason,
            "ov_precision_hint": self.hint,
            "check": self.check,
            "compile": self.compile,
            "convert_seconds": self.convert_seconds,
        }


def choose(
    requested: str,
    device: torch.device,
    convert: Callable[[str], list[nn.Module]],
    check: Callable[..., np.ndarray] | None,
) -> tuple[RuntimeChoice, list[nn.Module] | None]:
    """(the runtime, the OpenVINO fold models when it is openvino). `convert(hint)` gives the fold models in
    OpenVINO; `check(None, models)` the validation sample's (N, K) probabilities of `models` (None: the torch
    models in fp32), None when there is no sample. openvino, asked for or proposed by auto, is kept only when
    it agrees with torch fp32 (nn.precision's thresholds); asked for on CUDA or without openvino, it is an error."""
    if requested == "torch":
        return RuntimeChoice("torch", "infer.runtime=torch"), None
    if device.type != "cpu":
        if requested == "openvino":
            raise KpipeError(
                f"infer.runtime=openvino runs on the CPU, but inference runs on {device.type} (train.device). "
                "Set train.device=cpu, or infer.runtime=auto / torch."
            )
        return RuntimeChoice(
            "torch", f"torch: OpenVINO is offered on the CPU only (inference on {device.type})"
        ), None
    if requested == "openvino":
        require_openvino()
    else:
        missing = openvino_missing()
        if missing is not None:
            return RuntimeChoice("torch", f"torch: {missing}"), None
        if check is None:
            return RuntimeChoice(
                "torch", "torch: no validation images to check OpenVINO against fp32 on"
            ), None
    hint = ov_precision_hint()
    ov_models = convert(hint)
    if check is None:
        return RuntimeChoice(
            "openvino", f"infer.runtime=openvino, {hint} (not checked: no validation images)", hint
        ), ov_models
    ref = check(None)
    if ref.size == 0:
        if requested == "openvino":
            why = "not checked: none of the sampled validation images could be read"
            return RuntimeChoice("openvino", f"infer.runtime=openvino, {hint} ({why})", hint), ov_models
        return RuntimeChoice("torch", "torch: none of the sampled validation images could be read"), None
    stats = precision.agreement(ref, check(None, ov_models))
    figures = (
        f"argmax agreement {stats['argmax_agreement']:.2%} (min {precision.AGREEMENT_MIN:.1%}), max probability "
        f"difference {stats['max_prob_diff']:.4f} (max {precision.MAX_PROB_DIFF}) on {stats['images']} "
        "validation images"
    )
    if precision.passes(stats):
        return RuntimeChoice(
            "openvino", f"openvino, {hint}: agrees with torch fp32: {figures}", hint, stats
        ), ov_models
    return RuntimeChoice(
        "torch", f"torch: OpenVINO ({hint}) disagrees with fp32: {figures}", hint, stats
    ), None


class OpenVINOModel(nn.Module):
    """A fold model compiled by OpenVINO for the CPU, called like the torch model: (B, C, H, W) float32 -> logits."""

    def __init__(self, compiled: Any, hint: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.hint = hint
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # OpenVINO reads a plain NCHW float32 array (a channels_last tensor is made contiguous here).
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(self.compiled(arr)[0]))


def to_openvino(model: nn.Module, example: torch.Tensor, hint: str | None = None) -> OpenVINOModel:
    """`model` (eval mode, any device) converted and compiled by OpenVINO for the CPU; `example` is one
    normalised batch (B, C, H, W) at the run's image size. The batch dimension stays dynamic."""
    import openvino as ov

    hint = hint or ov_precision_hint()
    x = example.detach().to("cpu", torch.float32).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # convert_model traces with torch.jit.trace
        converted = ov.convert_model(
            model.eval().cpu(), example_input=x, input=[ov.PartialShape([-1, *x.shape[1:]])]
        )
    compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return OpenVINOModel(compiled, hint)


class CompiledModel(nn.Module):
    """torch.compile of an inference model at one static batch size: shorter batches are padded (eval mode
    treats rows independently) and longer ones split, so no batch recompiles. On the CPU inductor freezes the
    weights (constant-folds them into the graph), inside a config patch scoped to each call."""

    def __init__(self, model: nn.Module, batch: int, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.batch = batch
        self.freeze = device.type == "cpu"
        self.fn: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model, dynamic=False)
        self.eval()

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        if not self.freeze:
            return self.fn(x)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.fn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.batch:
            return torch.cat([self.forward(chunk) for chunk in x.split(self.batch)])
        if n < self.batch:
            pad = x[-1:].expand(self.batch - n, *x.shape[1:])
            x = torch.cat([x, pad]).contiguous(memory_format=_format(x))
        return self._call(x)[:n]


def _format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    )


def compile_torch(
    model: nn.Module, example: torch.Tensor, device: torch.device, amp: Callable[[], Any]
) -> tuple[CompiledModel, float]:
    """(`model` compiled for batches shaped like `example`, seconds the compile and its warm-up took).
    `amp()` is the autocast context inference runs under: the warm-up compiles the graph for it."""
    compiled = CompiledModel(model, example.shape[0], device)
    t0 = time.perf_counter()
    with torch.inference_mode(), amp():
        compiled(example)
    return compiled, time.perf_counter() - t0
