"""The bench's cases: each builds what it measures once, then returns a `Case` (one repetition -> img/s).

Data: the tutorial loader (ImageFolder + PIL + torchvision), kpipe's loader from files and from the
cache, kpipe's data.batch_aug path, two ceilings and a one-core breakdown of where the time goes.
Inference: kpipe infer's loop over the JPEGs with and without hflip TTA, in infer.precision=auto's form,
compiled, and through OpenVINO; and the model alone in fp32 / bf16 / channels_last, compiled, OpenVINO. Training: engine.train_epoch against a bare
hand-written loop over the same in-memory batches. docs/bench.md says what each row measures.
Usage: ``cases = infer_cases("resnet18", 224, 32, 6, torch.device("cpu"), bf16=False)``
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import nn
from torch.utils.data import DataLoader, default_collate

from kpipe.config import DataConfig, TrainConfig
from kpipe.data import transforms
from kpipe.data.image import read_rgb
from kpipe.data.loader import CachedBatches, EpochSampler, ImageDataset, make_loader
from kpipe.nn import engine, models, precision, predict, runtime, tta
from kpipe.nn.optim import Schedule, build_optimizer
from kpipe.tools.bench.harness import Case, Plan, cpus, sync
from kpipe.tools.bench.images import N_CLASSES

# ---------------------------------------------------------------- data


def tutorial_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[..., Any]:
    """The reference: a typical tutorial's torchvision pipeline, with kpipe's 'medium' probabilities
    (rotation and colour jitter each half the time) so both loaders do the same work."""
    from torchvision import transforms as tv

    return tv.Compose(
        [
            tv.Resize(int(size * 256 / 224)),
            tv.RandomResizedCrop(size, scale=(0.5, 1.0)),
            tv.RandomHorizontalFlip(),
            tv.RandomApply([tv.RandomRotation(15)], p=0.5),
            tv.RandomApply([tv.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5),
            tv.RandomGrayscale(0.05),
            tv.ToTensor(),
            tv.Normalize(mean, std),
        ]
    )


Prep = Callable[[torch.Tensor], torch.Tensor]


def consumer_batch_aug(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Prep:
    """kpipe's data.batch_aug consumer step (train.py): the 'medium' preset's resized crop + flips on the
    whole uint8 batch, then normalisation (transforms.BatchAugment)."""
    return transforms.BatchAugment("medium", size, mean, std)


def consumer_threads(workers: int) -> int:
    """Torch threads for the process that consumes a worker-fed loader: the cores its workers leave
    (at least one). On 2 cores with 2 workers, a 2-thread normalisation and the workers preempted each
    other: kpipe's loader from files measured 1.80-1.84x the tutorial so, 2.0-2.1x with one thread."""
    return max(1, cpus() - workers)


def on_device(consume: Prep, device: torch.device) -> Prep:
    """The training loop's side of a loader: the batch copied to `device` (a no-op on CPU), then `consume`."""
    return lambda x: consume(x.to(device, non_blocking=True))


def _epoch_case(
    loader: DataLoader | CachedBatches,
    consume: Prep | None,
    min_seconds: float,
    threads: int | None = None,
    device: torch.device | None = None,
) -> Case:
    """Whole epochs, as many as fill min_seconds (a fast loader's single epoch is too short to time);
    `consume` runs with `threads` torch threads (default: as set); the clock stops once `device` is done."""
    epoch = [0]

    def run() -> float:
        n, busy = 0, 0.0
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            while busy < min_seconds or n == 0:
                epoch[0] += 1
                if isinstance(loader.sampler, EpochSampler):
                    loader.sampler.set_epoch(epoch[0])
                it = iter(loader)  # persistent workers: resuming them is not part of the epoch's cost
                t0 = time.perf_counter()
                for batch in it:
                    n += len(consume(batch[0]) if consume is not None else batch[0])
                if device is not None:
                    sync(device)
                busy += time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return n / busy

    return run


def data_cases(
    plan: Plan,
    root: Path,
    paths: list[str],
    labels: np.ndarray,
    arr: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> tuple[dict[str, Case], list[DataLoader]]:
    """Ready batches on `device`: on CUDA each loader's batch is copied to the GPU, kpipe's from pinned memory
    and normalised (or batch-augmented) there, as kpipe train does; the tutorial's float batch as it comes."""
    from torchvision.datasets import ImageFolder

    b, nw, size, pin = plan.batch, plan.workers, plan.img_size, device.type == "cuda"
    # Persistent workers for the tutorial too: every case is measured in steady state.
    tut = DataLoader(
        ImageFolder(str(root), transform=tutorial_transform(size, mean, std)),
        batch_size=b,
        shuffle=True,
        num_workers=nw,
        persistent_workers=True,
    )
    rows = np.arange(len(paths))
    files = make_loader(
        ImageDataset(paths, labels, transforms.build_train("medium", size)),
        EpochSampler(rows, 0),
        b,
        nw,
        pin_memory=pin,
    )
    cached = make_loader(
        ImageDataset(paths, labels, transforms.build_train("medium", size), arr),
        EpochSampler(rows, 1),
        b,
        nw,
        pin_memory=pin,
    )
    loaders = [tut, files, cached]
    for dl in loaders:  # start every worker before the main process runs any parallel torch op
        next(iter(dl))
    t, d = plan.min_seconds, device
    # kpipe's loaders ship uint8; the training loop's side normalises (or batch-augments), and that counts.
    prep = on_device(transforms.Normalize(mean, std), d)
    aug = on_device(consumer_batch_aug(size, mean, std), d)
    ct = consumer_threads(nw)  # worker-fed cases; the in-process ones below use every core
    cases = {
        "tutorial": _epoch_case(tut, on_device(lambda x: x, d), t, ct, d),
        "kpipe_files": _epoch_case(files, prep, t, ct, d),
        "kpipe_cache": _epoch_case(cached, prep, t, ct, d),
        # data.batch_aug as train.py builds it: whole uint8 batches from the cache, BatchAugment on the consumer.
        "kpipe_cache_batch_aug": _epoch_case(
            CachedBatches(arr, labels, EpochSampler(rows, 2), b, pin_memory=pin), aug, t, None, d
        ),
        "ceiling_cache_to_float": _epoch_case(
            CachedBatches(arr, labels, EpochSampler(rows, 3), b, pin_memory=pin), prep, t, None, d
        ),
        "ceiling_decode": _decode_case(paths, nw, t),
    }
    return cases, loaders


def _decode_case(paths: list[str], threads: int, min_seconds: float) -> Case:
    def run() -> float:
        n, t0 = 0, time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:  # OpenCV releases the GIL
            while time.perf_counter() - t0 < min_seconds or n == 0:
                n += sum(1 for _ in pool.map(read_rgb, paths))
        return n / (time.perf_counter() - t0)

    return run


def breakdown(
    plan: Plan, paths: list[str], mean: tuple[float, ...], std: tuple[float, ...]
) -> dict[str, float]:
    """Milliseconds per image of each step, one core, main process: where the loader's time goes."""
    from PIL import Image

    sample = paths[: min(len(paths), 4 * plan.batch)]
    size, n = plan.img_size, len(sample)
    ms: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any], per: int = n) -> Any:
        t0 = time.perf_counter()
        out = fn()
        ms[key] = (time.perf_counter() - t0) * 1e3 / per
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pil = timed("tutorial: PIL open + decode", lambda: [Image.open(p).convert("RGB") for p in sample])
        tut = tutorial_transform(size, mean, std)
        timed("tutorial: torchvision transforms", lambda: [tut(im) for im in pil])
        rgb = timed("kpipe: image.read_rgb (cv2 decode)", lambda: [read_rgb(p) for p in sample])
        ops = list(transforms.build_train("medium", size).transforms)
        aug = A.Compose([o for o in ops if not isinstance(o, ToTensorV2)])
        to_t = ToTensorV2()
        augd = timed("kpipe: albumentations 'medium' augment", lambda: [aug(image=im)["image"] for im in rgb])
        u8 = timed("kpipe: ToTensorV2 (uint8 CHW)", lambda: [to_t(image=im)["image"] for im in augd])
        batches = timed(
            "collate uint8 batch (in-process)",
            lambda: [default_collate(u8[i : i + plan.batch]) for i in range(0, n, plan.batch)],
        )
        norm = transforms.Normalize(mean, std)
        timed("consumer: transforms.Normalize", lambda: [norm(x) for x in batches])
        g = consumer_batch_aug(size, mean, std)
        timed("consumer: transforms.BatchAugment (crop + flip, normalise)", lambda: [g(x) for x in batches])
    finally:
        torch.set_num_threads(threads)
    return ms


# ---------------------------------------------------------------- inference and training


def infer_cases(
    model_name: str,
    size: int,
    batch: int,
    n_batches: int,
    device: torch.device,
    bf16: bool,
    compile_: bool = False,
    openvino: bool = False,
) -> dict[str, Case]:
    """tta.predict_batched images/s: no TTA vs hflip (fp32), and bf16 autocast / channels_last variants;
    with compile_, the fastest of those compiled (runtime.CompiledModel: weights frozen on CPU); with openvino
    (CPU only), the model converted and compiled by OpenVINO (nn.runtime, bf16 hint where native)."""
    model = models.create(model_name, N_CLASSES).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def case(m: nn.Module, views: list[str], dtype: torch.dtype | None, channels_last: bool) -> Case:
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def run() -> float:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                with engine.autocast(device, dtype):
                    tta.predict_batched(m, xx, views)
            sync(device)
            return batch * n_batches / (time.perf_counter() - t0)

        return run

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cases = {
        "fp32": case(model, ["identity"], None, False),
        "fp32_hflip": case(model, ["identity", "hflip"], None, False),
        "fp32_channels_last": case(cl, ["identity"], None, True),
    }
    if bf16:
        cases["bf16"] = case(model, ["identity"], torch.bfloat16, False)
        cases["bf16_channels_last"] = case(cl, ["identity"], torch.bfloat16, True)
        cases["bf16_channels_last_hflip"] = case(cl, ["identity", "hflip"], torch.bfloat16, True)
    if compile_:
        name, dtype = ("bf16", torch.bfloat16) if bf16 else ("fp32", None)
        compiled = runtime.CompiledModel(copy.deepcopy(cl), batch, device)
        cases[f"{name}_channels_last_compiled"] = case(compiled, ["identity"], dtype, True)
    if openvino and device.type == "cpu":
        hint = runtime.ov_precision_hint()
        cases[f"openvino_{hint}"] = case(
            runtime.to_openvino(copy.deepcopy(model), x, hint), ["identity"], None, False
        )
    for run in cases.values():  # warm-up: kernel selection, oneDNN primitives, compilation
        run()
    return cases


def infer_pipeline_cases(
    plan: Plan, paths: list[str], device: torch.device, openvino: bool = False
) -> tuple[dict[str, Case], DataLoader, dict[str, dict[str, Any]]]:
    """kpipe infer's own loop (predict.predict_models) over real JPEGs: the eval loader's workers decode and
    resize, the batch is normalised, and every TTA view goes through the model in one forward.
    The ideal hflip cost is just under 2.0: decoding is shared by the views. `kpipe_infer_auto` is the loop in
    the form infer.precision=auto proposes on this device (bf16 + channels_last on a CPU with native bf16,
    else fp32 + channels_last); `kpipe_infer_compiled` the same form with infer.compile (plan.infer_compile);
    `kpipe_infer_openvino` the loop with infer.runtime=openvino's models (with `openvino`). Returned beside
    the cases: each fast form and its agreement with the fp32 loop here, by case name."""
    model = models.create(plan.model, N_CLASSES).eval().to(device)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    form = precision.native_fast(device)[0] or "fp32"
    dc = models.resolve_data_config(model, DataConfig(img_size=plan.img_size))
    sample = paths[: plan.infer_batches * plan.batch]
    loader = predict.make_eval_loader(sample, dc, plan.batch, plan.workers, device, tolerant=False)
    prepare = transforms.Normalize(dc["mean"], dc["std"])
    dtype = precision.DTYPES[form]
    # (model, autocast dtype, channels_last, the form's description) of each loop row
    rows: dict[str, tuple[nn.Module, torch.dtype | None, bool, str]] = {
        "kpipe_infer": (model, None, False, "fp32"),
        "kpipe_infer_auto": (fast, dtype, True, f"{form} + channels_last"),
    }
    if plan.infer_compile:
        compiled = runtime.CompiledModel(copy.deepcopy(fast), plan.batch, device)
        rows["kpipe_infer_compiled"] = (compiled, dtype, True, f"{form} + channels_last, infer.compile")
    if openvino and device.type == "cpu":
        hint = runtime.ov_precision_hint()
        x = torch.zeros(plan.batch, 3, plan.img_size, plan.img_size)
        ov_model = runtime.to_openvino(copy.deepcopy(model), x, hint)
        rows["kpipe_infer_openvino"] = (ov_model, None, False, f"OpenVINO, {hint} hint")

    def forward(name: str, views: list[str]) -> np.ndarray:
        m, dt, cl, _ = rows[name]
        return predict.predict_models([m], loader, views, N_CLASSES, device, dt, cl, prepare)[0]

    def case(name: str, views: list[str]) -> Case:
        def run() -> float:
            t0 = time.perf_counter()
            forward(name, views)
            sync(device)
            return len(sample) / (time.perf_counter() - t0)

        return run

    cases = {name: case(name, ["identity"]) for name in rows}
    cases["kpipe_infer_hflip"] = case("kpipe_infer", ["identity", "hflip"])
    for run in cases.values():  # warm-up: workers, oneDNN primitives, compilation
        run()
    # Random weights: near-uniform outputs, so argmax agreement here is a harsh lower bound (docs/bench.md).
    ref = forward("kpipe_infer", ["identity"])[0, 0]
    forms = {
        name: {"form": rows[name][3], **precision.agreement(ref, forward(name, ["identity"])[0, 0])}
        for name in rows
        if name != "kpipe_infer"
    }
    return cases, loader, forms


def _batches(size: int, batch: int, steps: int, device: torch.device, channels_last: bool) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    idx, ok = torch.arange(batch), torch.ones(batch, dtype=torch.bool)
    return [(x, y, idx, ok)] * steps  # an in-memory "loader": the step alone is measured


def kpipe_train_step(
    model: nn.Module, device: torch.device, t: TrainConfig
) -> Callable[[list[tuple]], float]:
    """engine.train_epoch as train.py drives it: kpipe's optimiser groups, schedule, scaler, AMP policy."""
    opt = build_optimizer(model, t)
    precision = engine.Precision.of(device, t)
    st = engine.FoldState(
        model, opt, Schedule(opt, t, 10), torch.amp.GradScaler(device.type, enabled=precision.scaler)
    )
    # The batches are already float on the device (the step alone is measured): nothing to prepare.
    step = engine.Step(precision, nn.CrossEntropyLoss(), None, N_CLASSES)

    def run(batches: list[tuple]) -> float:
        sync(device)
        t0 = time.perf_counter()
        _, seen = engine.train_epoch(st, batches, step, lambda n, loss: None)
        sync(device)
        return seen / (time.perf_counter() - t0)

    return run


def bare_train_step(
    model: nn.Module, device: torch.device, t: TrainConfig, dtype: torch.dtype | None
) -> Callable[[list[tuple]], float]:
    """The hand-written loop: AdamW, forward, backward, step; the loss read once at the end."""
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    criterion = nn.CrossEntropyLoss()

    def run(batches: list[tuple]) -> float:
        model.train()
        sync(device)
        t0, total = time.perf_counter(), torch.zeros((), device=device)
        for x, y, _, _ in batches:
            opt.zero_grad(set_to_none=True)
            with engine.autocast(device, dtype):
                loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach()
        float(total)
        sync(device)
        return sum(len(b[0]) for b in batches) / (time.perf_counter() - t0)

    return run


def train_cases(
    model_name: str, size: int, batch: int, steps: int, device: torch.device, fp32_too: bool
) -> dict[str, Case]:
    """kpipe loop vs bare loop at kpipe's precision for `device` (AMP bf16 + channels_last on CUDA);
    with fp32_too, also kpipe in fp32 without channels_last."""
    t = TrainConfig()
    fast = device.type == "cuda"  # engine's policy: AMP and channels_last on CUDA only
    amp_dtype, _ = engine.amp_settings(device, t)
    base = models.create(model_name, N_CLASSES).to(device)
    base = base.to(memory_format=torch.channels_last) if fast else base
    batches = _batches(size, batch, steps, device, fast)
    steps_by_name = {
        "kpipe": (kpipe_train_step(copy.deepcopy(base), device, t), batches),
        "bare": (bare_train_step(copy.deepcopy(base), device, t, amp_dtype), batches),
    }
    if fp32_too:
        plain = models.create(model_name, N_CLASSES).to(device)
        t32 = t.model_copy(update={"amp": False, "channels_last": False})
        steps_by_name["kpipe_fp32"] = (
            kpipe_train_step(plain, device, t32),
            _batches(size, batch, steps, device, False),
        )
    for step, b in steps_by_name.values():  # warm-up: the first steps allocate and pick kernels
        step(b[:2])
    return {name: (lambda step=step, b=b: step(b)) for name, (step, b) in steps_by_name.items()}
