"""The bench's decode rows: kpipe's inference loader with the JPEGs decoded by CPU workers vs on the GPU.

`decode_cases` times predict.make_eval_loader over the bench's JPEGs with infer.decode=cpu and =gpu, the
loader alone (uint8 batches ready on the device) and inside kpipe infer's loop (predict.predict_models with
the GPU section's model, in infer.precision=auto's form with channels_last). Written for CUDA, where the
GPU section runs; on CPU (tests) torchvision decodes on the CPU and the rows only prove the code runs.
Usage: ``cases = decode_cases(plan, paths, torch.device("cuda"), workers=15)``
"""

from __future__ import annotations

import time

import torch

from kpipe.config import DataConfig
from kpipe.data import transforms
from kpipe.nn import models, precision, predict
from kpipe.tools.bench.harness import Case, Plan, sync
from kpipe.tools.bench.images import N_CLASSES


def decode_cases(plan: Plan, paths: list[str], device: torch.device, workers: int) -> dict[str, Case]:
    """infer_loader_{cpu,gpu}_decode: the eval loader alone; kpipe_infer_{cpu,gpu}_decode: the whole infer loop."""
    model = models.create(plan.gpu_model, N_CLASSES).eval().to(device).to(memory_format=torch.channels_last)
    dc = models.resolve_data_config(model, DataConfig(img_size=plan.gpu_size))
    form = precision.native_fast(device)[0] or "fp32"
    prepare = transforms.Normalize(dc["mean"], dc["std"])
    loaders = {
        mode: predict.make_eval_loader(paths, dc, plan.gpu_batch, workers, device, True, mode)
        for mode in ("cpu", "gpu")
    }

    def loader_case(mode: str) -> Case:
        def run() -> float:
            it = iter(loaders[mode])  # persistent workers resume here, before the clock
            sync(device)
            t0, n = time.perf_counter(), 0
            for x, _, _, _ in it:
                n += len(x.to(device, non_blocking=True))
            sync(device)
            return n / (time.perf_counter() - t0)

        return run

    def infer_case(mode: str) -> Case:
        def run() -> float:
            t0 = time.perf_counter()
            predict.predict_models(
                [model], loaders[mode], ["identity"], N_CLASSES, device, precision.DTYPES[form], True, prepare
            )
            sync(device)
            return len(paths) / (time.perf_counter() - t0)

        return run

    cases = {
        "infer_loader_cpu_decode": loader_case("cpu"),
        "infer_loader_gpu_decode": loader_case("gpu"),
        "kpipe_infer_cpu_decode": infer_case("cpu"),
        "kpipe_infer_gpu_decode": infer_case("gpu"),
    }
    for run in cases.values():  # warm-up: workers, nvJPEG's state, kernel selection
        run()
    return cases
