"""Augmentation and normalisation: per-image albumentations pipelines and whole-batch torch ops.

Loaders ship uint8 and the consumer normalises. Per image (in DataLoader workers),
`build_train(preset, ...)` and `build_eval(...)` return albumentations Composes that take an
(H, W, 3) uint8 RGB array and give a uint8 CHW tensor: a uint8 batch is a quarter of a float32
one to pass between processes and to copy to the GPU. Eval resizes with cv2.INTER_AREA, exactly
like the decode-once cache, so cached and uncached runs see the same eval pixels.

Per batch (on the consumer's device, the GPU when there is one): `Normalize` turns a uint8 batch
into the model's normalised float32 input (mean/std in 0-1 units, timm style), and
`BatchAugment` (data.batch_aug) first does random flips and a random resized crop per sample on
the whole batch in one grid_sample call. train.py and infer.py run one of them on every batch.

Albumentations seeds each Compose once, in the process that builds it, so forked DataLoader
workers would all draw the same augmentations: pass `worker_init_fn=seed_worker` to the DataLoader.
Usage: ``tf = build_train("medium", 224); x = Normalize(mean, std)(default_collate([tf(image=rgb)["image"]]))``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

from kpipe.data import presets
from kpipe.data.presets import Preset
from kpipe.errors import KpipeError


def build_train(preset: str | Sequence[str], img_size: int, hflip: bool = True) -> A.Compose:
    """Training pipeline for `data.aug` (a preset name or a list of ops, kpipe.data.presets), ending in a
    uint8 CHW tensor.

    hflip=False for classes a mirror changes (digits, text, left/right anatomy).
    """
    p: Preset = presets.resolve(preset)
    if p.is_identity:
        return build_eval(img_size)
    # area_for_downscale: antialiased (INTER_AREA) when the crop shrinks, bilinear when it grows.
    ops: list[Any] = [
        A.RandomResizedCrop(size=(img_size, img_size), scale=(p.min_scale, 1.0), area_for_downscale="image")
        if p.crop
        else A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA),
    ]
    if p.flip:
        ops.append(A.HorizontalFlip(p=0.5 if hflip else 0.0))
    if p.vflip:
        ops.append(A.VerticalFlip(p=0.5))
    if p.affine_p:
        shear = {"shear": (-p.shear, p.shear)} if p.shear else {}
        ops.append(
            A.Affine(rotate=(-p.rotate, p.rotate), **shear, border_mode=cv2.BORDER_REFLECT_101, p=p.affine_p)
        )
    if p.jitter_p:
        ops.append(
            A.ColorJitter(
                brightness=p.jitter, contrast=p.jitter, saturation=p.jitter, hue=p.hue, p=p.jitter_p
            )
        )
    if p.gray_p:
        ops.append(A.ToGray(p=p.gray_p))
    if p.dropout_p:
        ops.append(
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.2),
                hole_width_range=(0.05, 0.2),
                p=p.dropout_p,
            )
        )
    return A.Compose([*ops, ToTensorV2()])


def build_eval(img_size: int) -> A.Compose:
    """Resize to img_size x img_size (cv2.INTER_AREA, as the cache does), to a uint8 CHW tensor."""
    return A.Compose([A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA), ToTensorV2()])


def seed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Reseed a Compose with one numpy and one Python generator, shared by all its transforms.

    Not albumentations' `set_random_seed`: it gives every transform its own generator with the same seed,
    so the transforms draw the same numbers. With 'light', a flip then happened 62 % of the time on the
    smaller crops and 40 % on the larger ones (3,000 seeds); shared, 50 % and 51 %. It is also 4x cheaper
    (10 µs against 38 µs a sample, which at 32 px is more than the augmentation itself).
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream; leave stops to the main process.

    Reseeds numpy and the Compose found as `.transform` on the worker's dataset (or on the
    dataset a Subset wraps) from torch's per-worker seed, which itself follows torch.manual_seed.
    (Training goes further: loader.AugSeeds seeds every sample's augmentation from its place in the epoch.)

    Each worker leaves the main process's process group: Ctrl-C, `timeout` and `kill -- -PGID` (what
    batch schedulers send) signal the whole group, and a worker killed before the main process has saved last.pt turns the
    stop into a DataLoader crash. Out of the group, only the main process gets the stop; it saves,
    then shuts its workers down as usual. (Ignoring SIGTERM in the worker instead would also ignore
    the main process's own terminate() of a worker at exit, and hang there.) A worker whose main
    process is SIGKILLed notices within seconds (torch's watchdog) and exits. (A stop that still kills a
    worker, e.g. Slurm signalling every process of the job, is turned into the same save by engine.train_epoch.)
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    if hasattr(os, "setpgid"):  # POSIX; Windows has no process groups to leave
        os.setpgid(0, 0)
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.BaseCompose):
            seed_transform(transform, seed)
        dataset = getattr(dataset, "dataset", None)


# ---------------------------------------------------------------- whole-batch ops (torch)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C) batch as (B, C, H, W) (a view); (B, C, H, W) passes through.

    NHWC is assumed when the last dim is 1 or 3 and dim 1 is not.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return x.permute(0, 3, 1, 2)
    return x


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """A new float32 NCHW tensor with x's values, laid out contiguously.

    The uint8 copy comes first: on CPU, converting a strided (NHWC) view straight to float32 took
    four times as long as making the uint8 contiguous and converting that.
    """
    return to_nchw(x).contiguous().to(torch.float32, copy=True)


class Normalize:
    """0-255 batch (uint8, NCHW or NHWC) -> float32 NCHW, (x/255 - mean) / std; mean/std in 0-1 units.

    The step every kpipe loader's batches go through on the consumer side, after the copy to the
    device. One multiply and one add, in place on the new float tensor.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise KpipeError(
                f"data.mean {list(mean)} / data.std {list(std)}: need one positive std per mean."
            )
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scale_shift(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._consts:
            m = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            self._consts[device] = ((1 / (255 * s)).float().to(device), (-m / s).float().to(device))
        return self._consts[device]

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float NCHW 0-255 tensor in place (and return it)."""
        scale, shift = self._scale_shift(x.device)
        return x.mul_(scale).add_(shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_(_as_float(x))


def _crop_flip_grid(
    b: int,
    h: int,
    w: int,
    out: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    vflip: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """grid_sample's (B, out, out, 2) sampling grid for one random resized crop + flips per sample."""
    u = torch.rand(b, 6, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    # Crop width/height as fractions of the image's, clipped to the image.
    fw = torch.sqrt(area * r * h / w).clamp(max=1.0)
    fh = torch.sqrt(area / r * w / h).clamp(max=1.0)
    tx = (1 - fw) * (2 * u[:, 2] - 1)  # crop centre in grid_sample's [-1, 1] coordinates
    ty = (1 - fh) * (2 * u[:, 3] - 1)
    sx = torch.where(u[:, 4] < hflip, -fw, fw)
    sy = torch.where(u[:, 5] < vflip, -fh, fh)
    # A crop with flips has no rotation or shear, so x depends on the column only and y on the row
    # only: one (B, out) vector each, where F.affine_grid would multiply out every pixel (3x slower).
    centres = (torch.arange(out, dtype=torch.float32) * 2 + 1) / out - 1  # pixel centres, align_corners=False
    grid = torch.empty(b, out, out, 2)
    grid[..., 0] = (sx[:, None] * centres + tx[:, None])[:, None, :]
    grid[..., 1] = (sy[:, None] * centres + ty[:, None])[:, :, None]
    return grid


def _crop_flip(
    x: torch.Tensor,
    size: int | None,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    vflip: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Float32 NCHW result of the random crops + flips of x (any dtype, NCHW or NHWC)."""
    xf = _as_float(x)
    b, _, h, w = xf.shape
    grid = _crop_flip_grid(b, h, w, size or h, scale, ratio, hflip, vflip, generator).to(xf.device)
    return F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)


def batch_augment(
    x: torch.Tensor,
    size: int | None = None,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    vflip: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crop + flips, drawn per sample, applied to the whole batch in one grid_sample.

    x: uint8 (or float) batch, NCHW or NHWC, on any device. Returns NCHW of the same dtype,
    size x size (default: the input's height). scale is the crop's share of the image area,
    ratio its width/height range, as in RandomResizedCrop; hflip/vflip are probabilities.
    Random draws use `generator` (CPU) or torch's global RNG.
    """
    y = _crop_flip(x, size, scale, ratio, hflip, vflip, generator)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


class BatchAugment:
    """data.batch_aug: whole uint8 batches of cached images get, on the consumer's device, the preset's
    random resized crop and flips, then normalisation; float32 NCHW out.

    Colour jitter, rotation and the other per-image ops of the presets are not applied in this mode;
    it is for when the loader, not the model, is the bottleneck (see README, Speed).
    """

    def __init__(
        self,
        preset: str | Sequence[str],
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: bool = True,
    ) -> None:
        p: Preset = presets.resolve(preset)
        self.crop = p.crop
        self.scale = (p.min_scale, 1.0) if p.crop else (1.0, 1.0)
        self.ratio = (3 / 4, 4 / 3) if p.crop else (1.0, 1.0)
        self.hflip = 0.5 if hflip and p.flip else 0.0
        self.vflip = 0.5 if p.vflip else 0.0
        self.size = img_size
        self.normalize = Normalize(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.crop or self.hflip or self.vflip):
            return self.normalize(x)
        # Bilinear sampling is linear with weights summing to 1, so normalising the sampled 0-255
        # floats equals sampling normalised ones: one pass fewer than a uint8 round trip.
        y = _crop_flip(x, self.size, self.scale, self.ratio, self.hflip, self.vflip, None)
        return self.normalize.apply_(y)
