"""Eval images decoded on the model's device (infer.decode=gpu): workers read bytes, the device decodes.

For a batch of test images, DataLoader workers only read each file: a plain JPEG (image.read_plain_jpeg)
goes to the main process as its raw bytes, and the whole batch is decoded there in one
`torchvision.io.decode_jpeg(list, device=device)` call (nvJPEG on CUDA), then each image is resized on
the device to img_size x img_size with the same weights as cv2.INTER_AREA, the CPU eval path's resize
(transforms.build_eval and the cache): out = Wy @ image @ Wx^T per channel, rounded to uint8. Any other
file (PNG, CMYK, a rotated photo, one the device decoder refuses) is decoded by the CPU path with its own
rules, per file, so a bad image raises or, in a tolerant (inference) loader, becomes a blank image with
ok=False: no test row is ever dropped. Batches come out as an eval DataLoader's do: (uint8 NCHW on the
device, labels, dataset indices, ok flags).
Written for CUDA; every function takes the device, and the tests run it on the CPU, where torchvision
decodes with libjpeg-turbo like OpenCV: the pixels match read_rgb's, and the resize cv2's within 1 level.
nvJPEG's decoded pixels differ a little from libjpeg-turbo's (torchvision's own tests allow a mean
difference under 2 levels); that difference is not measured here.
Usage: ``dl = DeviceDecodeLoader(ImageDataset(files, None, build_eval(224), tolerant=True), 224, 64, 4, dev)``
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from kpipe.data.image import ImageReadError, read_plain_jpeg
from kpipe.data.loader import EpochSampler, ImageDataset, make_loader

Item = tuple[bytes | torch.Tensor, bool, int, bool]  # (raw bytes or decoded CHW uint8, is raw, index, ok)


class RawJpegs(Dataset):
    """`cpu`'s images as device decoding wants them: a plain JPEG's bytes, anything else decoded by `cpu`
    (an eval ImageDataset: its resize, its tolerance for unreadable files)."""

    def __init__(self, cpu: ImageDataset) -> None:
        self.cpu = cpu

    def __len__(self) -> int:
        return len(self.cpu)

    def __getitem__(self, i: int) -> Item:
        try:
            buf = read_plain_jpeg(self.cpu.paths[i])
        except ImageReadError:
            buf = None  # the CPU path's rules decide: raise, or a blank image with ok=False
        if buf is None:
            x, _, _, ok = self.cpu[i]
            return x, False, i, ok
        # bytes, not a tensor: a worker's tensor crosses to the main process through shared memory, one file
        # descriptor each while in flight (batch x prefetched batches x workers of them); bytes are pickled.
        return buf, True, i, True


def as_list(items: list[Item]) -> list[Item]:
    """collate_fn: the batch's items as they are (raw byte tensors differ in length)."""
    return items


def _area_axis(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """cv2.INTER_AREA's (n_out, n_in) weights along a shrinking axis (n_out <= n_in): each output pixel the
    area-weighted mean of the input pixels its cell covers (OpenCV drops overlaps under 1e-3)."""
    scale = 1 / (n_out / n_in)  # as OpenCV derives it
    f1 = torch.arange(n_out, dtype=torch.float64, device=device)[:, None] * scale
    s = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(s + 1, f1 + scale) - torch.maximum(s, f1)).clamp_(min=0)
    overlap = torch.where(overlap > 1e-3, overlap, 0.0)
    return (overlap / torch.clamp(n_in - f1, max=scale)).float()


def _linear_axis(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """cv2.INTER_AREA's (n_out, n_in) weights along an axis when the image grows on either axis: OpenCV then
    interpolates linearly with its own area-style coefficients, edge pixels repeated."""
    inv = n_out / n_in
    d = torch.arange(n_out, dtype=torch.float64, device=device)
    s = torch.floor(d * (1 / inv))
    f = ((d + 1) - (s + 1) * inv).float()  # OpenCV rounds to float before taking the fraction
    f = torch.where(f <= 0, 0.0, f - torch.floor(f))
    lo, hi = s.long().clamp(0, n_in - 1), (s.long() + 1).clamp(0, n_in - 1)
    w = torch.zeros((n_out, n_in), device=device)
    w.scatter_add_(1, lo[:, None], (1 - f)[:, None])
    w.scatter_add_(1, hi[:, None], f[:, None])
    return w


@lru_cache(maxsize=128)
def _weights(h: int, w: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Built on the device itself (a few element-wise kernels, no host loop, no copy); cached per image shape."""
    axis = _area_axis if h >= size and w >= size else _linear_axis
    return axis(h, size, device), axis(w, size, device)


def resize_area(img: torch.Tensor, size: int) -> torch.Tensor:
    """A CHW uint8 image (any device) resized to size x size as image.resize_square (cv2.INTER_AREA) does,
    within one level of 255 (rounding)."""
    _, h, w = img.shape
    if h == size and w == size:
        return img
    wy, wx = _weights(h, w, size, img.device)
    out = torch.einsum("oh,chw,pw->cop", wy, img.float(), wx)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_all(raws: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Each JPEG decoded to CHW uint8 RGB on `device`, or None where the device decoder refused it:
    one batched call, and file by file only when the batch as a whole fails."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not raws:
        return []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raws]
    if device.type == "cuda":
        # nvJPEG's hardware engine may write its outputs before work already queued on the stream has run,
        # into blocks the caching allocator recycled from tensors that work still reads (pytorch/vision#9606;
        # torchcodec waits for the stream the same way). predict_models reads every batch's probabilities
        # back anyway, so this wait costs it nothing.
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole call: decode file by file to find it
        return [_decode_one(raw, device) for raw in data]


def _decode_one(raw: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None  # the caller reads this file again with the CPU path, whose rules decide


def decode_batch(
    items: list[Item], cpu: ImageDataset, size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of RawJpegs items -> (uint8 NCHW on `device`, labels -1, indices, ok), in the items' order.
    A JPEG the device decoder refuses is read again by `cpu` (ImageDataset: its decoder, its tolerance)."""
    n = len(items)
    x = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    ok = torch.tensor([good for _, _, _, good in items], dtype=torch.bool)
    raw_pos = [k for k, (_, is_raw, _, _) in enumerate(items) if is_raw]
    for k, (payload, is_raw, _, _) in enumerate(items):
        if not is_raw:
            x[k] = payload.to(device, non_blocking=True)
    raws = [items[k][0] for k in raw_pos]
    for k, img in zip(raw_pos, _decode_all(raws, device), strict=True):
        if img is None:
            cpu_x, _, _, good = cpu[items[k][2]]
            x[k], ok[k] = cpu_x.to(device), good
        else:
            x[k] = resize_area(img, size)
    idx = torch.tensor([i for _, _, i, _ in items], dtype=torch.long)
    return x, torch.full((n,), -1, dtype=torch.long), idx, ok


class DeviceDecodeLoader:
    """An eval loader over `cpu`'s files in order whose JPEGs are decoded on `device` (module docstring);
    `dataset` and len() as a DataLoader's, so predict.predict_models takes it as it is."""

    def __init__(
        self, cpu: ImageDataset, size: int, batch_size: int, num_workers: int, device: torch.device
    ) -> None:
        self.dataset, self.size, self.device = RawJpegs(cpu), size, device
        sampler = EpochSampler(np.arange(len(cpu)), 0, shuffle=False, pad=False)
        self.loader = make_loader(self.dataset, sampler, batch_size, num_workers, collate_fn=as_list)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for items in self.loader:
            yield decode_batch(items, self.dataset.cpu, self.size, self.device)
