"""Which form a run's models predict in, and running them: what `kpipe infer` and `kpipe oof-tta` share.

infer.runtime (nn.runtime: OpenVINO on the CPU), infer.precision (nn.precision: bf16 / AMP), infer.compile and
infer.decode (nn.predict: JPEGs decoded on the GPU) are chosen per run. The reduced forms are kept only after
they agree with fp32 on a sample of validation images (`sample_check`: each fold model on its own fold's, from
the folds table or a package's check/), and every choice says why in one line. `predict_run` then runs all of
a run's fold models over a list of files with every TTA view, with a progress bar.
Usage: ``rm, choice, rt = choose_forms(cfg, rm, device, table, n_views); probs, ok, rate = predict_run(...)``
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kpipe.config import Config
from kpipe.console import console, safe
from kpipe.data import transforms
from kpipe.data.folds import check_sample
from kpipe.errors import KpipeError
from kpipe.nn import precision, predict, runtime
from kpipe.nn.engine import autocast


def sample_check(
    cfg: Config, rm: predict.RunModels, device: torch.device, table: pd.DataFrame | KpipeError
) -> Callable[..., np.ndarray] | None:
    """The predictor both checks (infer.precision, infer.runtime) run on a sample of the run's own validation
    images (each fold model on its own fold); None, said aloud, when the folds table could not be read."""
    if isinstance(table, KpipeError):
        console.print(f"[yellow]{safe(rm.run)}: no agreement check: {safe(str(table))}", soft_wrap=True)
        return None
    sample = check_sample(table, rm.folds, cfg.infer.precision_check_images)
    if not any(sample.values()):
        return None
    return predict.sample_predictor(rm, sample, cfg.infer.batch_size, device, cfg.infer.channels_last)


def choose_precision(
    cfg: Config,
    rm: predict.RunModels,
    device: torch.device,
    table: pd.DataFrame | KpipeError,
    sampler: Callable[..., np.ndarray] | None = None,
) -> precision.PrecisionChoice:
    """infer.precision for this run; with `auto`, the proposal is checked on the run's own validation images
    (each fold model on a sample of its fold: `table` is the folds table, or why it could not be read;
    `sampler`, when given, is sample_check's predictor for it)."""
    inf = cfg.infer
    check = None
    if inf.precision == "auto" and precision.native_fast(device)[0] is not None:
        check = sampler or sample_check(cfg, rm, device, table)
    choice = precision.choose(inf.precision, device, inf.channels_last, check)
    console.print(f"{safe(rm.run)}: precision {choice.reason}", soft_wrap=True)
    return choice


def example_batch(rm: predict.RunModels, rows: int, device: torch.device, cl: bool) -> torch.Tensor:
    """A normalised-looking batch of `rows` at the run's image size: what conversion and warm-up trace with."""
    s = int(rm.data_cfg["img_size"])
    x = torch.randn(rows, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def choose_forms(
    cfg: Config,
    rm: predict.RunModels,
    device: torch.device,
    table: pd.DataFrame | KpipeError,
    n_views: int,
) -> tuple[predict.RunModels, precision.PrecisionChoice, runtime.RuntimeChoice]:
    """infer.runtime, then (when torch runs) infer.precision and infer.compile for this run: (the run with the
    models that will predict, the precision record, the runtime record)."""
    inf = cfg.infer
    need = (inf.runtime != "torch" and device.type == "cpu") or (
        inf.precision == "auto" and precision.native_fast(device)[0] is not None
    )
    sampler = sample_check(cfg, rm, device, table) if need else None  # both checks share its fp32 result

    took: list[float] = []

    def convert(hint: str) -> list[torch.nn.Module]:
        x, t0 = example_batch(rm, 2, device, False), time.perf_counter()
        out = [runtime.to_openvino(m, x, hint) for m in rm.models]
        took.append(round(time.perf_counter() - t0, 2))
        return out

    rt, ov_models = runtime.choose(inf.runtime, device, convert, sampler)
    rt = replace(rt, convert_seconds=took[0] if took else None)
    console.print(f"{safe(rm.run)}: runtime {rt.reason}", soft_wrap=True)
    if ov_models is not None:
        why = f"OpenVINO runs the models (INFERENCE_PRECISION_HINT {rt.hint}); torch applies the TTA views in fp32"
        choice = precision.PrecisionChoice("fp32", False, why, rt.check)
        rt = replace(
            rt, compile={"compiled": False, "reason": "infer.compile is ignored: OpenVINO runs the models"}
        )
        return predict.RunModels(rm.run, rm.cfg, rm.folds, ov_models, rm.data_cfg), choice, rt
    choice = choose_precision(cfg, rm, device, table, sampler)
    if not inf.compile:
        return rm, choice, replace(rt, compile={"compiled": False, "reason": "infer.compile=false"})
    x = example_batch(rm, inf.batch_size * n_views, device, choice.channels_last)
    compiled, seconds = [], 0.0
    for m in rm.models:
        c, t = runtime.compile_torch(m, x, device, lambda: autocast(device, choice.amp_dtype))
        compiled.append(c)
        seconds += t
    frozen = " with frozen weights" if device.type == "cpu" else ""
    console.print(
        f"{safe(rm.run)}: torch.compile{frozen}, {len(compiled)} folds, {seconds:.1f} s with warm-up"
    )
    record = {"compiled": True, "reason": f"infer.compile=true{frozen}", "seconds": round(seconds, 2)}
    return (
        predict.RunModels(rm.run, rm.cfg, rm.folds, compiled, rm.data_cfg),
        choice,
        replace(rt, compile=record),
    )


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def predict_run(
    cfg: Config,
    rm: predict.RunModels,
    files: list[str],
    views: list[str],
    n_classes: int,
    device: torch.device,
    tolerant: bool,
    label: str,
    choice: precision.PrecisionChoice,
    decode: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, float]:
    """All fold models of a run on `files`, the JPEGs decoded where `decode` says (cpu | gpu); returns
    (probs (F, V, N, K), ok (N,), images/s)."""
    loader = predict.make_eval_loader(
        files, rm.data_cfg, cfg.infer.batch_size, cfg.data.num_workers, device, tolerant, decode
    )
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(files))
        prepare = transforms.Normalize(rm.data_cfg["mean"], rm.data_cfg["std"])
        probs, ok = predict.predict_models(
            rm.models,
            loader,
            views,
            n_classes,
            device,
            choice.amp_dtype,
            choice.channels_last,
            prepare,
            lambda n: progress.advance(task, n),
        )
    return probs, ok, len(files) / max(time.perf_counter() - start, 1e-9)


def choose_decode(
    cfg: Config, rm: predict.RunModels, files: list[str], device: torch.device
) -> predict.DecodeChoice:
    """infer.decode for this run (at its image size); with auto on CUDA, both decoders timed on the first files."""
    inf = cfg.infer
    choice = predict.choose_decode(
        inf.decode,
        device,
        lambda: predict.decode_rates(files, rm.data_cfg, inf.batch_size, cfg.data.num_workers, device),
    )
    console.print(f"{safe(rm.run)}: decode {choice.reason}", soft_wrap=True)
    return choice
