"""`kpipe bench`: how fast kpipe loads, predicts and trains on this machine, against plain baselines.

It writes its own photo-like JPEG set (gradients, smoothed noise at three scales, shapes and grain,
quality 90, 500x375, in 10 class folders; kept in <out>/ between runs, like the decode-once cache
built from it) and measures everything in one run, the repetitions interleaved (each round visits
every case, in a rotated order) so a slow minute on a shared machine hits all cases alike:

- data: ready training batches per second (batch 32, 224 px, 2 workers) for the tutorial loader
  (ImageFolder + PIL + torchvision transforms), kpipe's loader from files and from its cache, and
  kpipe's data.batch_aug path (cached batches, augmented whole on the consumer side); plus the
  ceilings (decoding alone; cache to normalised float batches without augmentation) and a one-core
  breakdown of where the time goes;
- inference: kpipe infer's loop (infer.predict_models over the JPEGs) without TTA and with hflip;
  the model alone (tta.predict_batched on a random batch) in fp32 / bf16 / channels_last;
- training: engine.train_epoch against a bare hand-written loop over the same in-memory batches;
- GPU (CUDA only): resnet50 training fp32 vs bf16 + channels_last, kpipe vs bare, inference eager
  vs torch.compile.

Writes <out>/results.json and <out>/results.md and prints the table. Figures are medians with the
min-max of the repetitions; ratios are ratios of medians.
Usage: ``kpipe bench --out bench --images 1000 --repeats 3`` (``--quick``: smoke run, under a minute).
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, default_collate

from kpipe.config import DataConfig, TrainConfig
from kpipe.data import cache, transforms
from kpipe.data.image import read_rgb
from kpipe.data.loader import CachedBatches, EpochSampler, ImageDataset, make_loader
from kpipe.errors import KpipeError
from kpipe.io import write_json, write_text
from kpipe.nn import engine, models, predict, tta

console = Console()
IMAGES_VERSION = 1  # bump when the generator changes, so old image sets are rebuilt
N_CLASSES = 10
Case = Callable[[], float]  # one repetition of one measurement -> images per second

# (results key path, comparison, target, what it says)
TARGETS: list[tuple[tuple[str, ...], str, float, str]] = [
    (("data", "ratios", "kpipe_files"), ">=", 1.8, "kpipe loader (files) vs tutorial"),
    (("data", "ratios", "kpipe_cache"), ">=", 2.8, "kpipe loader (cache) vs tutorial"),
    (("data", "ratios", "kpipe_cache_batch_aug"), ">=", 4.5, "cache + batch augmentation vs tutorial"),
    (("inference", "ratios", "hflip_cost"), "<=", 2.05, "kpipe infer: hflip TTA cost vs no TTA (ideal 2.0)"),
    (("training", "ratios", "kpipe"), ">=", 0.95, "kpipe training step vs bare loop"),
]


@dataclass(frozen=True)
class Plan:
    """Sizes of one bench run; `make_plan` gives the full and the --quick ones."""

    n_images: int
    repeats: int
    quick: bool
    photo_hw: tuple[int, int] = (375, 500)
    img_size: int = 224
    batch: int = 32
    workers: int = 2
    min_seconds: float = 2.0  # each data measurement runs whole epochs until it has lasted this long
    model: str = "resnet18"
    infer_batches: int = 6
    train_size: int = 224
    train_steps: int = 6
    gpu_model: str = "resnet50"
    gpu_size: int = 224
    gpu_batch: int = 128
    gpu_steps: int = 50  # per repetition: 20 left the kpipe/bare ratio within ±4 % noise on an H100
    gpu_compile: bool = True


def make_plan(n_images: int, repeats: int, quick: bool) -> Plan:
    if repeats < 1:
        raise KpipeError(f"--repeats must be at least 1, got {repeats}.")
    if quick:
        plan = Plan(min(n_images, 64), repeats, True, photo_hw=(120, 160), img_size=64, batch=16, min_seconds=0.0,
                    infer_batches=1, train_size=64, train_steps=2, gpu_model="resnet18", gpu_size=64,
                    gpu_batch=32, gpu_steps=3, gpu_compile=False)
    else:
        plan = Plan(n_images, repeats, False)
    if plan.n_images < 2 * plan.batch:
        raise KpipeError(f"--images must be at least {2 * plan.batch} (two batches), got {n_images}.")
    return plan


# ---------------------------------------------------------------- synthetic photos


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 image that JPEG-codes like a photo: smooth regions, texture, edges, grain."""
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    t = t + np.linspace(0, 1, h, dtype=np.float32)[:, None] * rng.uniform(-1, 1)
    c0, c1 = rng.uniform(40, 200, 3).astype(np.float32), rng.uniform(40, 200, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    for cells, amp in ((8, 40.0), (32, 25.0), (96, 15.0)):  # clouds at three scales
        noise = rng.standard_normal((max(2, cells * h // w), cells, 3)).astype(np.float32)
        img += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, max(9, w // 5)))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.circle(img, (x, y), r, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + r, y + int(rng.integers(8, max(9, h // 3)))), colour, -1)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, (x, y), end, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    # Sensor grain: what makes a photo's JPEG cost more to decode than a drawing's.
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6.0
    return np.clip(img, 0, 255).astype(np.uint8)


def image_set(out_dir: Path, plan: Plan, seed: int = 0) -> tuple[Path, list[str], np.ndarray]:
    """(root, paths, labels) of the JPEG set, written once into <out>/images_<n>_<w>x<h>/<class>/.

    The set is written into a .partial folder renamed into place when complete, and a manifest
    (written last) vouches for it: a killed run never leaves a half set that looks finished.
    """
    h, w = plan.photo_hw
    root = out_dir / f"images_{plan.n_images}_{w}x{h}"
    spec = {"version": IMAGES_VERSION, "n": plan.n_images, "hw": [h, w], "quality": 90, "seed": seed}
    rel = [f"c{i % N_CLASSES}/img_{i:05d}.jpg" for i in range(plan.n_images)]
    manifest = root / "manifest.json"
    if not (manifest.is_file() and _read_manifest(manifest) == spec and all((root / r).is_file() for r in rel)):
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for c in range(N_CLASSES):
            (partial / f"c{c}").mkdir(parents=True, exist_ok=True)

        def write(i: int) -> None:
            rgb = photo(np.random.default_rng([seed, i]), h, w)
            ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise KpipeError(f"bench: OpenCV could not encode synthetic image {i}")
            (partial / rel[i]).write_bytes(buf.tobytes())

        console.print(f"bench: writing {plan.n_images} synthetic JPEGs ({w}x{h}) to {root} (once)")
        with ThreadPoolExecutor(max_workers=_cpus()) as pool:  # OpenCV releases the GIL
            list(pool.map(write, range(plan.n_images)))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(partial, root)
        write_json(manifest, spec)
    paths = [str(root / r) for r in rel]
    return root, paths, np.arange(plan.n_images) % N_CLASSES


def _read_manifest(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- measuring


def interleave(cases: dict[str, Case], repeats: int, title: str) -> dict[str, list[float]]:
    """Run every case once per round, `repeats` rounds, rotating the order each round."""
    names = list(cases)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            runs[name].append(cases[name]())
        console.print(f"bench: {title} round {r + 1}/{repeats} done", style="dim")
    return runs


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 2) for v in values]}


def summarise(runs: dict[str, list[float]], base: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {name: summary(v) for name, v in runs.items()}
    if base is not None:
        out["ratios"] = {name: out[name]["median"] / out[base]["median"] for name in runs if name != base}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- data


def tutorial_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[..., Any]:
    """The reference: a typical tutorial's torchvision pipeline, with kpipe's 'medium' probabilities
    (rotation and colour jitter each half the time) so both loaders do the same work."""
    from torchvision import transforms as tv

    return tv.Compose([
        tv.Resize(int(size * 256 / 224)),
        tv.RandomResizedCrop(size, scale=(0.5, 1.0)),
        tv.RandomHorizontalFlip(),
        tv.RandomApply([tv.RandomRotation(15)], p=0.5),
        tv.RandomApply([tv.ColorJitter(0.2, 0.2, 0.2, 0.02)], p=0.5),
        tv.RandomGrayscale(0.05),
        tv.ToTensor(),
        tv.Normalize(mean, std),
    ])


Prep = Callable[[torch.Tensor], torch.Tensor]


def consumer_batch_aug(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Prep:
    """kpipe's data.batch_aug consumer step (train.py): the 'medium' preset's resized crop + flips on the
    whole uint8 batch, then normalisation (transforms.BatchAugment)."""
    return transforms.BatchAugment("medium", size, mean, std)


def consumer_threads(workers: int) -> int:
    """Torch threads for the process that consumes a worker-fed loader: the cores its workers leave
    (at least one). On 2 cores with 2 workers, a 2-thread normalisation and the workers preempted each
    other: kpipe's loader from files measured 1.80-1.84x the tutorial so, 2.0-2.1x with one thread."""
    return max(1, _cpus() - workers)


def on_device(consume: Prep, device: torch.device) -> Prep:
    """The training loop's side of a loader: the batch copied to `device` (a no-op on CPU), then `consume`."""
    return lambda x: consume(x.to(device, non_blocking=True))


def _epoch_case(loader: DataLoader | CachedBatches, consume: Prep | None, min_seconds: float,
                threads: int | None = None, device: torch.device | None = None) -> Case:
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
                    _sync(device)
                busy += time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return n / busy

    return run


def data_cases(plan: Plan, root: Path, paths: list[str], labels: np.ndarray, arr: np.ndarray,
               mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device) -> tuple[dict[str, Case], list[DataLoader]]:
    """Ready batches on `device`: on CUDA each loader's batch is copied to the GPU, kpipe's from pinned memory
    and normalised (or batch-augmented) there, as kpipe train does; the tutorial's float batch as it comes."""
    from torchvision.datasets import ImageFolder

    b, nw, size, pin = plan.batch, plan.workers, plan.img_size, device.type == "cuda"
    # Persistent workers for the tutorial too: every case is measured in steady state.
    tut = DataLoader(ImageFolder(str(root), transform=tutorial_transform(size, mean, std)), batch_size=b,
                     shuffle=True, num_workers=nw, persistent_workers=True)
    rows = np.arange(len(paths))
    files = make_loader(ImageDataset(paths, labels, transforms.build_train("medium", size)), EpochSampler(rows, 0), b,
                        nw, pin_memory=pin)
    cached = make_loader(ImageDataset(paths, labels, transforms.build_train("medium", size), arr),
                         EpochSampler(rows, 1), b, nw, pin_memory=pin)
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
        "kpipe_cache_batch_aug": _epoch_case(CachedBatches(arr, labels, EpochSampler(rows, 2), b, pin_memory=pin),
                                             aug, t, None, d),
        "ceiling_cache_to_float": _epoch_case(CachedBatches(arr, labels, EpochSampler(rows, 3), b, pin_memory=pin),
                                              prep, t, None, d),
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


def breakdown(plan: Plan, paths: list[str], mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, float]:
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
        batches = timed("collate uint8 batch (in-process)", lambda: [default_collate(u8[i:i + plan.batch])
                                                                     for i in range(0, n, plan.batch)])
        norm = transforms.Normalize(mean, std)
        timed("consumer: transforms.Normalize", lambda: [norm(x) for x in batches])
        g = consumer_batch_aug(size, mean, std)
        timed("consumer: transforms.BatchAugment (crop + flip, normalise)", lambda: [g(x) for x in batches])
    finally:
        torch.set_num_threads(threads)
    return ms


# ---------------------------------------------------------------- inference and training


def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX); elsewhere autocast would emulate it."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def infer_cases(model_name: str, size: int, batch: int, n_batches: int, device: torch.device,
                bf16: bool, compile_: bool = False) -> dict[str, Case]:
    """tta.predict_batched images/s: no TTA vs hflip (fp32), and bf16 autocast / channels_last variants."""
    model = models.create(model_name, N_CLASSES).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)

    def case(m: nn.Module, views: list[str], dtype: torch.dtype | None, channels_last: bool) -> Case:
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def run() -> float:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                with engine.autocast(device, dtype):
                    tta.predict_batched(m, xx, views)
            _sync(device)
            return batch * n_batches / (time.perf_counter() - t0)

        return run

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cases = {"fp32": case(model, ["identity"], None, False), "fp32_hflip": case(model, ["identity", "hflip"], None, False),
             "fp32_channels_last": case(cl, ["identity"], None, True)}
    if bf16:
        cases["bf16"] = case(model, ["identity"], torch.bfloat16, False)
        cases["bf16_channels_last"] = case(cl, ["identity"], torch.bfloat16, True)
        cases["bf16_channels_last_hflip"] = case(cl, ["identity", "hflip"], torch.bfloat16, True)
    if compile_:
        cases["bf16_channels_last_compiled"] = case(torch.compile(cl), ["identity"], torch.bfloat16, True)
    for run in cases.values():  # warm-up: kernel selection, oneDNN primitives, compilation
        run()
    return cases


def infer_pipeline_cases(plan: Plan, paths: list[str], device: torch.device) -> tuple[dict[str, Case], DataLoader]:
    """kpipe infer's own loop (infer.predict_models) over real JPEGs: the eval loader's workers decode and
    resize, the batch is normalised, and every TTA view goes through the model in one forward.
    The ideal hflip cost is just under 2.0: decoding is shared by the views."""
    model = models.create(plan.model, N_CLASSES).eval().to(device)
    dc = models.resolve_data_config(model, DataConfig(img_size=plan.img_size))
    sample = paths[: plan.infer_batches * plan.batch]
    loader = predict.make_eval_loader(sample, dc, plan.batch, plan.workers, device, tolerant=False)
    prepare = transforms.Normalize(dc["mean"], dc["std"])

    def case(views: list[str]) -> Case:
        def run() -> float:
            t0 = time.perf_counter()
            predict.predict_models([model], loader, views, N_CLASSES, device, None, False, prepare)
            _sync(device)
            return len(sample) / (time.perf_counter() - t0)

        return run

    cases = {"kpipe_infer": case(["identity"]), "kpipe_infer_hflip": case(["identity", "hflip"])}
    for run in cases.values():  # warm-up: workers, oneDNN primitives
        run()
    return cases, loader


def _batches(size: int, batch: int, steps: int, device: torch.device, channels_last: bool) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (batch,), generator=g).to(device)
    idx, ok = torch.arange(batch), torch.ones(batch, dtype=torch.bool)
    return [(x, y, idx, ok)] * steps  # an in-memory "loader": the step alone is measured


def kpipe_train_step(model: nn.Module, device: torch.device, t: TrainConfig) -> Callable[[list[tuple]], float]:
    """engine.train_epoch as train.py drives it: kpipe's optimiser groups, schedule, scaler, AMP policy."""
    opt = engine.build_optimizer(model, t)
    amp_dtype, need_scaler = engine.amp_settings(device, t)
    st = engine.FoldState(model, opt, engine.build_scheduler(opt, t, 10),
                          torch.amp.GradScaler(device.type, enabled=need_scaler))
    criterion = nn.CrossEntropyLoss()

    def run(batches: list[tuple]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        _, seen = engine.train_epoch(st, batches, device, t, amp_dtype, criterion, None, lambda n, loss: None)
        _sync(device)
        return seen / (time.perf_counter() - t0)

    return run


def bare_train_step(model: nn.Module, device: torch.device, t: TrainConfig,
                    dtype: torch.dtype | None) -> Callable[[list[tuple]], float]:
    """The hand-written loop: AdamW, forward, backward, step; the loss read once at the end."""
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    criterion = nn.CrossEntropyLoss()

    def run(batches: list[tuple]) -> float:
        model.train()
        _sync(device)
        t0, total = time.perf_counter(), torch.zeros((), device=device)
        for x, y, _, _ in batches:
            opt.zero_grad(set_to_none=True)
            with engine.autocast(device, dtype):
                loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach()
        float(total)
        _sync(device)
        return sum(len(b[0]) for b in batches) / (time.perf_counter() - t0)

    return run


def train_cases(model_name: str, size: int, batch: int, steps: int, device: torch.device,
                fp32_too: bool) -> dict[str, Case]:
    """kpipe loop vs bare loop at kpipe's precision for `device` (AMP bf16 + channels_last on CUDA);
    with fp32_too, also kpipe in fp32 without channels_last."""
    t = TrainConfig()
    fast = device.type == "cuda"  # engine's policy: AMP and channels_last on CUDA only
    amp_dtype, _ = engine.amp_settings(device, t)
    base = models.create(model_name, N_CLASSES).to(device)
    base = base.to(memory_format=torch.channels_last) if fast else base
    batches = _batches(size, batch, steps, device, fast)
    steps_by_name = {"kpipe": (kpipe_train_step(copy.deepcopy(base), device, t), batches),
                     "bare": (bare_train_step(copy.deepcopy(base), device, t, amp_dtype), batches)}
    if fp32_too:
        plain = models.create(model_name, N_CLASSES).to(device)
        t32 = t.model_copy(update={"amp": False, "channels_last": False})
        steps_by_name["kpipe_fp32"] = (kpipe_train_step(plain, device, t32), _batches(size, batch, steps, device, False))
    for step, b in steps_by_name.values():  # warm-up: the first steps allocate and pick kernels
        step(b[:2])
    return {name: (lambda step=step, b=b: step(b)) for name, (step, b) in steps_by_name.items()}


def gpu_section(plan: Plan, device: torch.device) -> dict[str, Any]:
    """resnet50 at 224, batch 128: training fp32 vs AMP bf16 + channels_last, kpipe vs bare loop;
    inference eager vs torch.compile. Synthetic batches already on the device: the model alone is measured.
    (Written for CUDA; runs on CPU too, for tests, where engine's policy keeps fp32.)"""
    tr = train_cases(plan.gpu_model, plan.gpu_size, plan.gpu_batch, plan.gpu_steps, device, fp32_too=True)
    training = summarise(interleave(tr, plan.repeats, "gpu training"))
    med = {k: v["median"] for k, v in training.items()}
    training["ratios"] = {"amp_bf16_channels_last_vs_fp32": med["kpipe"] / med["kpipe_fp32"],
                          "kpipe_vs_bare": med["kpipe"] / med["bare"]}
    del tr
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_bf16()
    inf = infer_cases(plan.gpu_model, plan.gpu_size, plan.gpu_batch, max(plan.gpu_steps // 2, 1), device, bf16,
                      compile_=plan.gpu_compile and bf16)
    inference = summarise(interleave(inf, plan.repeats, "gpu inference"), base="fp32")
    if "bf16_channels_last_compiled" in inference:
        inference["ratios"]["compiled_vs_eager"] = (inference["bf16_channels_last_compiled"]["median"]
                                                    / inference["bf16_channels_last"]["median"])
    del inf
    if cuda:
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    return {"device": name, "model": plan.gpu_model, "img_size": plan.gpu_size, "batch": plan.gpu_batch,
            "training": training, "inference": inference}


# ---------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    import albumentations
    import PIL
    import timm
    import torchvision

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": _cpus(), "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_bf16(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "albumentations": albumentations.__version__, "cv2": cv2.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def data_section(plan: Plan, out_dir: Path) -> dict[str, Any]:
    root, paths, labels = image_set(out_dir, plan)
    arr = cache.build_cache(paths, plan.img_size, out_dir / "cache" / f"{root.name}_{plan.img_size}.npy")
    # Preprocessing follows the model: the mean/std the loaders use are the benchmarked model's.
    dc = models.resolve_data_config(models.create(plan.model, N_CLASSES), DataConfig(img_size=plan.img_size))
    mean, std = dc["mean"], dc["std"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases, loaders = data_cases(plan, root, paths, labels, arr, mean, std, device)
    try:
        runs = interleave(cases, plan.repeats, "data")
    finally:
        cases.clear()
        loaders.clear()  # persistent workers end with their loaders
    out = summarise(runs, base="tutorial")
    out["consumer_threads"] = consumer_threads(plan.workers)
    out["consumer_device"] = device.type
    out["breakdown_ms_per_image"] = breakdown(plan, paths, mean, std)
    return out


def run(out_dir: Path, n_images: int, repeats: int, quick: bool) -> dict[str, Any]:
    """Measure, write <out>/results.json and results.md, print the table; return the results."""
    plan = make_plan(n_images, repeats, quick)
    start, load_start = time.perf_counter(), os.getloadavg()
    if load_start[0] > 0.5:
        console.print(f"[yellow]bench: load average {load_start[0]:.2f}: other work is running here, so the figures "
                      "will be low and noisy (the ratios suffer less: cases are interleaved).")
    torch.manual_seed(0)
    res: dict[str, Any] = {"command": _command(out_dir, n_images, repeats, quick),
                           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "plan": asdict(plan)}
    res["data"] = data_section(plan, out_dir)
    cpu = torch.device("cpu")
    bf16 = cpu_bf16()
    pipeline, loader = infer_pipeline_cases(plan, image_set(out_dir, plan)[1], cpu)
    cases = {**pipeline, **infer_cases(plan.model, plan.img_size, plan.batch, plan.infer_batches, cpu, bf16)}
    res["inference"] = summarise(interleave(cases, plan.repeats, "inference"), base="kpipe_infer")
    del cases, pipeline, loader  # its workers end with the loader
    med = {k: v["median"] for k, v in res["inference"].items() if isinstance(v, dict) and "median" in v}
    res["inference"]["ratios"]["hflip_cost"] = med["kpipe_infer"] / med["kpipe_infer_hflip"]
    res["inference"]["ratios"]["model_hflip_cost"] = med["fp32"] / med["fp32_hflip"]
    res["training"] = summarise(interleave(
        train_cases(plan.model, plan.train_size, plan.batch, plan.train_steps, cpu, False), plan.repeats, "training"),
        base="bare")
    res["gpu"] = (gpu_section(plan, torch.device("cuda")) if torch.cuda.is_available()
                  else {"skipped": "no CUDA device here: GPU section not run"})
    res["targets"] = check_targets(res)
    res["load_average"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}
    res["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out_dir / "results.json", res)
    write_text(out_dir / "results.md", render_md(res))
    print_table(res)
    console.print(f"bench: wrote {out_dir / 'results.md'} and results.json in {res['seconds']:.0f} s")
    return res


def _command(out_dir: Path, n_images: int, repeats: int, quick: bool) -> str:
    return f"kpipe bench --out {out_dir} --images {n_images} --repeats {repeats}" + (" --quick" if quick else "")


def _get(res: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        res = res[key]
    return res


def check_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, op, goal, what in TARGETS:
        value = float(_get(res, path))
        out.append({"target": what, "key": ".".join(path), "value": round(value, 4), "goal": f"{op} {goal}",
                    "met": value >= goal if op == ">=" else value <= goal})
    return out


# ---------------------------------------------------------------- reporting

LABELS = {
    "tutorial": "(a) tutorial: ImageFolder + PIL + torchvision",
    "kpipe_files": "(b) kpipe loader, from files (albumentations 'medium')",
    "kpipe_cache": "(c) kpipe loader, from the cache",
    "kpipe_cache_batch_aug": "(d) kpipe data.batch_aug: cached batches -> BatchAugment on the consumer",
    "ceiling_cache_to_float": "ceiling: cache -> normalised float batch (in-process), no augmentation",
    "ceiling_decode": "ceiling: decode only (image.read_rgb, one thread per core)",
    "kpipe_infer": "kpipe infer loop (JPEGs -> eval loader -> model), fp32, no TTA",
    "kpipe_infer_hflip": "kpipe infer loop, fp32, hflip TTA (2 views in one forward)",
    "fp32": "model alone (random batch): fp32, no TTA",
    "fp32_hflip": "fp32, hflip TTA (2 views)",
    "fp32_channels_last": "fp32 + channels_last",
    "bf16": "bf16 autocast",
    "bf16_channels_last": "bf16 autocast + channels_last",
    "bf16_channels_last_hflip": "bf16 + channels_last, hflip TTA",
    "bf16_channels_last_compiled": "bf16 + channels_last, torch.compile",
    "kpipe": "kpipe engine.train_epoch",
    "bare": "bare hand-written loop",
    "kpipe_fp32": "kpipe engine.train_epoch, fp32 (cuDNN's default TF32 convolutions), no channels_last",
}


BASES = {"tutorial", "kpipe_infer", "fp32", "bare"}  # the cases other rows of their section are compared with


def section_rows(sec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(case, median, min-max, ratio) for every case of a section; ratio to the section's base if any."""
    ratios = sec.get("ratios", {})
    rows = []
    for key, val in sec.items():
        if not (isinstance(val, dict) and "median" in val):
            continue
        ratio = f"{ratios[key]:.2f}x" if key in ratios else ("1.00x" if ratios and key in BASES else "")
        rows.append((LABELS.get(key, key), f"{val['median']:,.1f}", f"{val['min']:,.1f}–{val['max']:,.1f}", ratio))
    return rows



def _sections(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    p = res["plan"]
    ct, cd = res["data"].get("consumer_threads"), res["data"].get("consumer_device", "cpu")
    out = [(f"Data: ready training batches/s on {cd} (batch {p['batch']}, {p['img_size']} px, {p['workers']} workers"
            + (f" and a {ct}-thread consumer" if ct else "")
            + f", {p['n_images']} JPEGs {p['photo_hw'][1]}x{p['photo_hw'][0]}), img/s, ratio to (a)", res["data"]),
           (f"Inference: {p['model']} at {p['img_size']} px, batch {p['batch']}, CPU, img/s, ratio to kpipe infer",
            res["inference"]),
           (f"Training: {p['model']} at {p['train_size']} px, batch {p['batch']}, fp32, CPU, in-memory batches, img/s",
            res["training"])]
    g = res["gpu"]
    if "skipped" not in g:
        out += [(f"GPU training: {g['model']} at {g['img_size']} px, batch {g['batch']} ({g['device']}), img/s",
                 g["training"]),
                (f"GPU inference: {g['model']} at {g['img_size']} px, batch {g['batch']}, img/s", g["inference"])]
    return out


def print_table(res: dict[str, Any]) -> None:
    table = Table(title="kpipe bench (median of the repetitions)")
    for col, just in (("case", "left"), ("img/s", "right"), ("min–max", "right"), ("ratio", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for title, sec in _sections(res):
        table.add_row(f"[bold]{title}", "", "", "")
        for row in section_rows(sec):
            table.add_row(*row)
        for name, value in sec.get("ratios", {}).items():
            if name not in sec:
                table.add_row(f"  ratio {name}", "", "", f"{value:.2f}x")
        table.add_section()
    console.print(table)
    if "skipped" in res["gpu"]:
        console.print(f"GPU: {res['gpu']['skipped']}")
    targets = Table(title="targets")
    for col in ("target", "measured", "goal", "met"):
        targets.add_column(col)
    for t in res["targets"]:
        targets.add_row(t["target"], f"{t['value']:.2f}", t["goal"], "[green]yes" if t["met"] else "[red]no")
    console.print(targets)


def _md_table(header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_md(res: dict[str, Any]) -> str:
    m, la = res["machine"], res["load_average"]
    parts = [
        "# kpipe bench\n",
        f"`{res['command']}` on {res['date']}, {res['seconds']:.0f} s.\n",
        f"Machine: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}, native CPU bf16: "
        f"{'yes' if m['cpu_bf16'] else 'no'}), GPU: {m['cuda'] or 'none'}. Python {m['python']}, torch {m['torch']}, "
        f"torchvision {m['torchvision']}, timm {m['timm']}, albumentations {m['albumentations']}, OpenCV {m['cv2']}, "
        f"numpy {m['numpy']}, Pillow {m['pillow']}. Load average (1 min) before the run: {la['start']}"
        + (" — other work was running, so these figures are lower bounds." if la["start"] > 0.5 else ".") + "\n",
        "Figures are medians over the repetitions (run interleaved), with their min–max; ratios are ratios of medians.\n",
        "## Targets\n",
        _md_table(["target", "measured", "goal", "met"],
                  [(t["target"], f"{t['value']:.2f}", t["goal"], "yes" if t["met"] else "**no**") for t in res["targets"]]),
    ]
    for title, sec in _sections(res):
        parts += [f"\n## {title}\n", _md_table(["case", "img/s", "min–max", "ratio"], section_rows(sec))]
        extra = [(k, f"{v:.2f}x") for k, v in sec.get("ratios", {}).items() if k not in sec]
        if extra:
            parts.append("\n" + _md_table(["ratio", "value"], extra))
        if "breakdown_ms_per_image" in sec:
            rows = [(k, f"{v:.3f}") for k, v in sec["breakdown_ms_per_image"].items()]
            parts += ["\nWhere the time goes (one core, main process, ms per image):\n",
                      _md_table(["step", "ms/image"], rows)]
    if "skipped" in res["gpu"]:
        parts.append(f"\n## GPU\n\n{res['gpu']['skipped']}.")
    parts.append(NOTES)
    return "\n".join(parts) + "\n"


NOTES = """
## How it was measured

- Images: synthetic photo-like JPEGs (gradients, smoothed noise at three scales, shapes, sensor grain;
  quality 90), ~60 KB each at 500x375, in 10 class folders, so `ImageFolder` reads them as they are.
- (a) the tutorial loader: `ImageFolder` (PIL) with Resize(256), RandomResizedCrop(224, scale 0.5-1),
  flip, rotation ±15° and ColorJitter(0.2, 0.2, 0.2, 0.02) each with p=0.5 (as kpipe's 'medium'),
  RandomGrayscale(0.05), ToTensor, Normalize; `DataLoader(shuffle=True, num_workers=2)`.
- (b)/(c) `loader.ImageDataset` + `transforms.build_train('medium')` + `loader.make_loader`, from the
  files or from `cache.build_cache`. kpipe's loaders ship uint8 batches, normalised on the consumer
  (`transforms.Normalize`), and that time counts.
- (d) kpipe's `data.batch_aug`, as `kpipe train` runs it: whole uint8 batches sliced from the cache
  memmap in the training process (`loader.CachedBatches`, no workers), then
  `transforms.BatchAugment('medium')` (resized crop + flips on the whole batch, then normalisation)
  on the consumer.
- "Ready" means on the device the model uses: with CUDA, every batch is copied to the GPU (kpipe's
  from pinned memory) and kpipe's are normalised or batch-augmented there, as `kpipe train` does; the
  tutorial's float batches are copied as they come. Without CUDA, the consumer is the CPU main process.
- The process consuming a worker-fed loader ((a)-(c)) runs with as many torch threads as the workers
  leave cores (`bench.consumer_threads`, at least 1); (d) and the cache ceiling, with no workers, use
  them all. With 2 threads on 2 cores, (b)'s normalisation and its workers preempted each other:
  1.80-1.84x instead of 2.0-2.1x.
- Inference: kpipe infer's loop (`infer.make_eval_loader` + `infer.predict_models`, 2 workers) over the
  first 6 batches of the JPEGs, with no TTA and with hflip (one forward of both views); the other rows
  are the model alone on a random batch.
- All loaders keep their workers between epochs (steady state); an epoch is timed from `iter()` to its
  last batch. Training, and the inference rows after the first two, use random tensors: the model alone.
"""
