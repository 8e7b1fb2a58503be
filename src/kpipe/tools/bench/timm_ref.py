"""End-to-end training against timm's own pipeline: JPEGs on disk -> loader -> AMP step, img/s.

`timm_train_case` builds timm's training pipeline from timm's library calls, the way its train.py
wires them (create_dataset over class folders, resolve_data_config, create_loader with its
device-side prefetcher, create_optimizer_v2, create_scheduler_v2 stepped per update, autocast and
channels_last), and with the two switches train.py turns on when CUDA is present (cuDNN's benchmark mode
and TF32 matmuls), set only while timm's case runs; kpipe's cases set them as `kpipe train` does
(train.cudnn_benchmark, on by default, through nn.dist.pick_device). Nothing of train.py is copied. One departure, in timm's favour: train.py reads `loss.item()`
every step (a wait for the GPU each step); here the loss is read once per epoch, as engine.train_epoch
does, so the reference is at least as fast as train.py's own loop.

`kpipe_train_cases` runs kpipe's own path on the same images: ImageDataset + AugSeeds + make_loader
(uncached: decode the JPEGs; cached: rows of the decode-once cache), or CachedBatches + BatchAugment
(data.batch_aug), into engine.train_epoch with kpipe's optimiser, schedule and precision policy, as
stages/train.py builds a fold.

Same work on both sides: the model, batch, image size, worker count, optimiser kind, lr and weight
decay; augmentation is a random resized crop (scale 0.7-1, kpipe's default data.aug=light) and a
horizontal flip, no colour jitter. Every repetition runs whole epochs until at least `steps` optimiser
steps are done; the clock includes the loader and stops once the device is done.
Written for CUDA (bf16 autocast + channels_last there); on CPU both run fp32, which is how the tests
run them with a tiny model.
Usage: ``cases = e2e_cases(plan, out_dir, torch.device("cuda"))``
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kpipe.config import DataConfig, TrainConfig
from kpipe.data import cache, transforms
from kpipe.data.loader import AugSeeds, CachedBatches, EpochSampler, ImageDataset, make_loader
from kpipe.nn import dist, engine, models
from kpipe.nn.optim import Schedule, build_optimizer
from kpipe.tools.bench.harness import Case, Plan, cpus, sync
from kpipe.tools.bench.images import N_CLASSES, image_set

AUG = "light"  # kpipe's default data.aug: random resized crop (scale 0.7-1) + horizontal flip
MIN_SCALE = 0.7  # the same crop scale on timm's side


def e2e_workers(plan: Plan) -> int:
    """Loader workers per case: plan.gpu_workers, or (when it is -1) every core but one, for the training process."""
    return plan.gpu_workers if plan.gpu_workers >= 0 else max(1, cpus() - 1)


def _timed(
    epoch: Callable[[], Any], train: Callable[[Iterable[Any]], int], steps: int, device: torch.device
) -> Case:
    """A Case: whole epochs of `epoch()` (a loader, set to its next epoch) until at least `steps` training steps
    are done; `train(loader)` trains on one epoch and returns the images seen. Whole epochs, so no worker is
    left decoding batches nobody takes while the next case is timed. The first epoch's iterator is made
    before the clock starts (persistent workers resume there), every later one inside it."""

    def run() -> float:
        loader = epoch()
        n_epochs = max(1, -(-steps // max(len(loader), 1)))
        it, seen = iter(loader), 0
        sync(device)
        t0 = time.perf_counter()
        for e in range(n_epochs):
            if e:
                it = iter(epoch())
            seen += train(it)
        sync(device)
        if not seen:
            raise RuntimeError("bench: a training loader yielded no batch")
        return seen / (time.perf_counter() - t0)

    return run


# ---------------------------------------------------------------- timm's pipeline


def timm_train_case(
    root: Path, model_name: str, size: int, batch: int, steps: int, workers: int, device: torch.device
) -> Case:
    """timm's training pipeline over the class folders under `root`, from timm's library calls."""
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    t = TrainConfig()  # the optimiser kind, lr and weight decay kpipe's side uses
    amp_dtype, _ = engine.amp_settings(device, t)  # bf16 on a CUDA device that has it: no loss scaler needed
    fast = device.type == "cuda"
    model = timm.create_model(model_name, num_classes=N_CLASSES).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    dc = resolve_data_config({"input_size": (3, size, size)}, model=model)
    dataset = create_dataset("", root=str(root), split="train", is_training=True, batch_size=batch)
    loader = create_loader(
        dataset,
        input_size=dc["input_size"],
        batch_size=batch,
        is_training=True,
        use_prefetcher=True,  # uint8 batches copied to the device on a side stream, normalised there
        scale=(MIN_SCALE, 1.0),
        hflip=0.5,
        color_jitter=None,
        interpolation="bilinear",
        mean=dc["mean"],
        std=dc["std"],
        num_workers=workers,
        pin_memory=fast,
        device=device,
        persistent_workers=workers > 0,
    )
    opt = create_optimizer_v2(model, opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=t.epochs, updates_per_epoch=len(loader))
    criterion = nn.CrossEntropyLoss()
    updates = [0]

    def train(batches: Iterable[Any]) -> int:
        model.train()
        total, seen = torch.zeros((), device=device), 0
        for x, y in batches:  # already on the device, normalised float
            if fast:
                x = x.contiguous(memory_format=torch.channels_last)
            with engine.autocast(device, amp_dtype):
                loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            updates[0] += 1
            sched.step_update(num_updates=updates[0])
            total += loss.detach()
            seen += len(x)
        float(total)  # read once per epoch as train_epoch does (train.py: loss.item() every step)
        return seen

    timed = _timed(lambda: loader, train, steps, device)

    def case() -> float:
        if not fast:
            return timed()
        flags = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True  # as train.py on CUDA
        try:
            return timed()
        finally:
            torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags

    case()  # warm-up: workers, kernel selection (cuDNN's benchmark runs here), allocator
    return case


# ---------------------------------------------------------------- kpipe's pipeline


def kpipe_train_cases(
    paths: list[str],
    labels: np.ndarray,
    arr: np.ndarray,
    model_name: str,
    plan_sizes: tuple[int, int, int, int],
    device: torch.device,
) -> dict[str, Case]:
    """kpipe's training path on the same images: uncached (decode the JPEGs), cached (the decode-once cache,
    per-image augmentation in workers) and cached + data.batch_aug (whole batches augmented on the device).
    plan_sizes: (image size, batch, steps, workers)."""
    size, batch, steps, workers = plan_sizes
    t = TrainConfig()
    pin = device.type == "cuda"
    rows = np.arange(len(paths))
    tf = transforms.build_train(AUG, size)

    def case(loader: Any, sampler: EpochSampler, prepare: Any) -> Case:
        if device.type == "cuda":  # cuDNN benchmark + TF32, as kpipe train sets them
            dist.pick_device("cuda", t.cudnn_benchmark)
        model = models.create(model_name, N_CLASSES).to(device)
        dc = models.resolve_data_config(model, DataConfig(img_size=size))
        precision = engine.Precision.of(device, t)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(model, t)
        st = engine.FoldState(
            model,
            opt,
            Schedule(opt, t, max(len(loader), 1)),
            torch.amp.GradScaler(device.type, enabled=precision.scaler),
        )
        step = engine.Step(precision, nn.CrossEntropyLoss(), prepare(dc), N_CLASSES)
        epochs = itertools.count()

        def epoch() -> Any:
            sampler.set_epoch(next(epochs))
            return loader

        def train(batches: Iterable[Any]) -> int:
            return engine.train_epoch(st, batches, step, lambda n, loss: None)[1]

        c = _timed(epoch, train, steps, device)
        c()  # warm-up: workers, kernel selection, allocator
        return c

    def normalize(dc: dict[str, Any]) -> Any:
        return transforms.Normalize(dc["mean"], dc["std"])

    def batch_aug(dc: dict[str, Any]) -> Any:
        return transforms.BatchAugment(AUG, size, dc["mean"], dc["std"])

    samplers = [EpochSampler(rows, seed) for seed in range(3)]
    drop = len(rows) > batch  # as train.py: drop the last partial batch

    def files_loader(s: EpochSampler, rgb: np.ndarray | None) -> Any:
        return make_loader(ImageDataset(paths, labels, tf, rgb), AugSeeds(s), batch, workers, 0, pin, drop)

    return {
        "kpipe_train_uncached": case(files_loader(samplers[0], None), samplers[0], normalize),
        "kpipe_train_cached": case(files_loader(samplers[1], arr), samplers[1], normalize),
        "kpipe_train_cached_batch_aug": case(
            CachedBatches(arr, labels, samplers[2], batch, drop, pin), samplers[2], batch_aug
        ),
    }


def e2e_cases(plan: Plan, out_dir: Path, device: torch.device) -> dict[str, Case]:
    """timm's pipeline and kpipe's three paths over the bench's JPEG set at the GPU section's model/size/batch."""
    root, paths, labels = image_set(out_dir, plan)
    size = plan.gpu_size
    arr = cache.build_cache(paths, size, out_dir / "cache" / f"{root.name}_{size}.npy")
    workers = e2e_workers(plan)
    steps = plan.gpu_e2e_steps
    cases = {
        "timm_train": timm_train_case(root, plan.gpu_model, size, plan.gpu_batch, steps, workers, device)
    }
    cases.update(
        kpipe_train_cases(paths, labels, arr, plan.gpu_model, (size, plan.gpu_batch, steps, workers), device)
    )
    return cases
