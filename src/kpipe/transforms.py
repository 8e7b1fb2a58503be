"""Augmentation and normalisation: per-image albumentations pipelines and whole-batch torch ops.

Per image (in DataLoader workers): `build_train(preset, ...)` and `build_eval(...)` return
albumentations Composes that take an (H, W, 3) uint8 RGB array and give a float CHW tensor.
mean/std are in 0-1 units (timm style). Eval resizes with cv2.INTER_AREA, exactly like the
decode-once cache, so cached and uncached runs see the same eval pixels.

Per batch (on the consumer side, GPU when there is one): `batch_augment` does random flips and
a random resized crop per sample on a whole uint8 batch in one grid_sample call, and
`normalize_batch` turns uint8 into normalised float. With the cache this moves all per-image
work off the CPU workers.

Albumentations seeds each Compose once, in the process that builds it, so forked DataLoader
workers would all draw the same augmentations: pass `worker_init_fn=seed_worker` to the DataLoader.
Usage: ``tf = build_train("medium", 224, mean, std); x = tf(image=rgb)["image"]``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

from kpipe.errors import KpipeError

PRESETS = ("none", "light", "medium", "heavy")


MIN_SCALE = {"light": 0.7, "medium": 0.5, "heavy": 0.3}  # smallest crop share of the image per preset


def build_train(
    preset: str, img_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True
) -> A.Compose:
    """Training pipeline for `preset` (none < light < medium < heavy), ending in a float CHW tensor.

    hflip=False for classes a mirror changes (digits, text, left/right anatomy).
    """
    if preset not in PRESETS:
        raise KpipeError(f"data.aug='{preset}' is not one of {', '.join(PRESETS)}.")
    if preset == "none":
        return build_eval(img_size, mean, std)
    size = (img_size, img_size)
    # area_for_downscale: antialiased (INTER_AREA) when the crop shrinks, bilinear when it grows.
    min_scale = MIN_SCALE[preset]
    ops: list[Any] = [
        A.RandomResizedCrop(size=size, scale=(min_scale, 1.0), area_for_downscale="image"),
        A.HorizontalFlip(p=0.5 if hflip else 0.0),
    ]
    if preset == "medium":
        ops += [
            A.Affine(rotate=(-15, 15), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
            A.ToGray(p=0.05),
        ]
    elif preset == "heavy":
        ops += [
            A.Affine(rotate=(-30, 30), shear=(-10, 10), border_mode=cv2.BORDER_REFLECT_101, p=0.7),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, p=0.8),
            A.ToGray(p=0.1),
            A.CoarseDropout(
                num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5
            ),
        ]
    return A.Compose([*ops, *_to_tensor(mean, std)])


def build_eval(img_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize to img_size x img_size (cv2.INTER_AREA, as the cache does), normalise, to tensor."""
    resize = A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA)
    return A.Compose([resize, *_to_tensor(mean, std)])


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream.

    Reseeds numpy and the Compose found as `.transform` on the worker's dataset (or on the
    dataset a Subset wraps) from torch's per-worker seed, which itself follows torch.manual_seed.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.BaseCompose):
            transform.set_random_seed(seed)
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
    x = to_nchw(x)
    b, c, h, w = x.shape
    out = size or h
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
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, [b, c, out, out], align_corners=False)
    y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


class BatchAugment:
    """data.batch_aug: the dataset ships uint8 CHW tensors (`build_uint8()`), and this runs on whole
    batches on the consumer's device: the preset's random resized crop and flips, then normalisation.

    Colour jitter, rotation and the other per-image ops of the presets are not applied in this mode;
    it is for when the loader, not the model, is the bottleneck (see README, Speed).
    """

    def __init__(self, preset: str, img_size: int, mean: Sequence[float], std: Sequence[float],
                 hflip: bool = True) -> None:
        if preset not in PRESETS:
            raise KpipeError(f"data.aug='{preset}' is not one of {', '.join(PRESETS)}.")
        self.crop = preset != "none"
        self.scale = (MIN_SCALE.get(preset, 1.0), 1.0)
        self.hflip = 0.5 if hflip and preset != "none" else 0.0
        self.size, self.mean, self.std = img_size, tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop or self.hflip:
            x = batch_augment(x, self.size, scale=self.scale, hflip=self.hflip)
        return normalize_batch(x, self.mean, self.std)


def build_uint8() -> A.Compose:
    """Per-image pipeline for batch augmentation: HWC uint8 -> CHW uint8 tensor, nothing else."""
    return A.Compose([ToTensorV2()])


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """0-255 batch (uint8, NCHW or NHWC) -> float32 NCHW, (x/255 - mean) / std; mean/std in 0-1 units.

    Run it after moving the uint8 batch to the GPU: 4x less to copy than float.
    """
    x = to_nchw(x)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) * 255
    return (x.float() - m) / s
