"""Datasets, samplers and DataLoaders for training and inference.

One Dataset reads either the decode-once cache (uint8, memory-mapped) or the image files
(OpenCV, see image.py), then applies an albumentations pipeline in DataLoader workers.
`CachedBatches` serves whole batches of cached images with no per-image work at all (validation
from the cache, and data.batch_aug, which augments on the consumer side): it slices the memmap
in the training process, since workers would only add the cost of passing each batch back.
Every loader yields (uint8 NCHW images, labels, dataset indices, ok flags); the consumer
normalises (transforms.Normalize). A dataset over the cache memmap pickles as the file's name and
layout, so a worker started with `spawn` (macOS, Windows) maps the file itself instead of receiving a
copy of every image. The sampler owns the epoch's order, seeded by (seed, epoch),
so a run resumed mid-epoch replays the same order and skips what was done, and a DDP rank takes
its own shard (class-balanced sampling too: weighted draws, or over/under-sampling to the mean
class count, `SAMPLINGS`); `AugSeeds` gives each sample of that order its own augmentation seed, so
the resumed epoch also augments exactly as the uninterrupted one would.

Usage: ``ds = ImageDataset(paths, labels, tf); dl = make_loader(ds, EpochSampler(train_rows, 42), 32, 2)``
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kpipe.data.image import ImageReadError, read_rgb
from kpipe.data.transforms import seed_transform, seed_worker
from kpipe.errors import KpipeError

# data.sampling: how an epoch treats unequal classes. weighted: n draws with replacement, each class
# equally likely; oversample: every class below the mean count drawn up to it (with replacement, all
# its images kept); undersample: every class above the mean count cut to a fresh random subset of it.
SAMPLINGS = ("none", "weighted", "oversample", "undersample")


class ImageDataset(Dataset):
    """(image tensor, label, index) from a cache array or from files.

    `tolerant=True` (inference only) returns a blank image and ok=False for a file that can't be
    read, so the caller can give that row the class prior instead of dropping it.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray | None,
        transform: Callable[..., dict[str, Any]],
        cache: np.ndarray | None = None,
        tolerant: bool = False,
        blank_size: int = 32,
    ) -> None:
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.cache = cache
        self.tolerant = tolerant
        self.blank_size = blank_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a `spawn` worker: a whole-file memmap goes as a reference, not as its bytes."""
        state = self.__dict__.copy()
        state["cache"] = _MappedRef.of(self.cache) or self.cache
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["cache"], _MappedRef):
            state["cache"] = state["cache"].open()
        self.__dict__.update(state)

    def _image(self, i: int) -> tuple[np.ndarray, bool]:
        if self.cache is not None:
            # A copy: the memmap is read-only, and a tensor over it (ToTensorV2 of an unresized row) must not be.
            return np.array(self.cache[i]), True
        try:
            return read_rgb(self.paths[i]), True
        except ImageReadError as e:
            if not self.tolerant:
                raise ImageReadError(
                    e.path,
                    f"{e.reason}; run `kpipe audit`, then `kpipe folds`, "
                    "to leave unreadable images out of training",
                ) from None
            return np.zeros((self.blank_size, self.blank_size, 3), np.uint8), False

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, bool]:
        """key: a row index, or (row index, augmentation seed) from AugSeeds."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_transform(self.transform, seed)  # type: ignore[arg-type]
        img, ok = self._image(i)
        x = self.transform(image=img)["image"]
        y = int(self.labels[i]) if self.labels is not None else -1
        return x, y, i, ok


class SoftTargets(Dataset):
    """A dataset whose label is replaced by a row of probability targets (pseudo-labels, weights folded in)."""

    def __init__(self, dataset: ImageDataset, targets: np.ndarray) -> None:
        if len(targets) != len(dataset):
            raise ValueError(f"{len(targets)} target rows for {len(dataset)} images")
        self.dataset, self.targets = dataset, np.asarray(targets, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        x, _, idx, ok = self.dataset[i]  # i may carry its augmentation seed (AugSeeds): idx is the row
        return x, torch.from_numpy(self.targets[idx]), idx, ok


class _MappedRef:
    """Where a read-only memmap's bytes live (file, offset, shape, dtype, order): enough to map it again."""

    def __init__(
        self, filename: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, order: str
    ) -> None:
        self.filename, self.offset, self.shape, self.dtype, self.order = filename, offset, shape, dtype, order

    @staticmethod
    def of(arr: np.ndarray | None) -> _MappedRef | None:
        """The reference of a memmap that maps its file directly (not a slice or view of one), else None."""
        if not (isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename):
            return None
        if arr.flags.c_contiguous:
            order = "C"
        elif arr.flags.f_contiguous:
            order = "F"
        else:
            return None
        return _MappedRef(arr.filename, arr.offset, arr.shape, arr.dtype, order)

    def open(self) -> np.memmap:
        return np.memmap(self.filename, self.dtype, "r", self.offset, self.shape, self.order)


class EpochSampler(Sampler[int]):
    """The epoch's order over `indices` (a fold's rows of the dataset): seeded by seed + epoch;
    optionally class-balanced (`weights` per index; or `labels` per index with `resample`
    "oversample"/"undersample", which changes the epoch's length to a fixed one); sharded per rank.

    Training (`pad=True`) pads the order so every rank gets the same count (DDP steps must match);
    evaluation (`pad=False`) shards without padding so each sample is predicted exactly once.
    `set_epoch(epoch, start)` skips the first `start` samples of this rank's shard (mid-epoch resume).
    """

    def __init__(
        self,
        indices: np.ndarray,
        seed: int,
        shuffle: bool = True,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
        labels: np.ndarray | None = None,
        resample: str = "none",
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.n, self.seed, self.shuffle = len(self.indices), seed, shuffle
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.groups: list[np.ndarray] = []  # positions in `indices` of each class, for resample
        self.target = 0  # the mean class count every class is brought to (up or down)
        if resample not in ("none", "oversample", "undersample"):
            raise KpipeError(f"data.sampling='{resample}' is not one of {', '.join(SAMPLINGS)}.")
        self.resample = resample
        if resample != "none":
            if labels is None or len(labels) != self.n:
                raise ValueError("resample needs one label per index")
            labels = np.asarray(labels)
            self.groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
            self.target = max(round(self.n / len(self.groups)), 1) if self.groups else 0
            keep = max if resample == "oversample" else min
            self.n = sum(keep(len(g), self.target) for g in self.groups)
        self.rank, self.world, self.pad = rank, world, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        if self.resample != "none":
            idx = self._resampled(g)
        elif self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.arange(self.n)
        if self.world > 1 and self.pad and self.n % self.world:
            idx = torch.cat([idx, idx[: self.world - self.n % self.world]])
        return self.indices[idx[self.rank :: self.world].numpy()].tolist()

    def _resampled(self, g: torch.Generator) -> torch.Tensor:
        """This epoch's positions: each class brought to the mean count (only up, or only down), shuffled."""
        parts = []
        for pos in self.groups:
            have = len(pos)
            if self.resample == "oversample" and have < self.target:
                extra = torch.randint(have, (self.target - have,), generator=g).numpy()
                parts.append(np.concatenate([pos, pos[extra]]))
            elif self.resample == "undersample" and have > self.target:
                parts.append(pos[torch.randperm(have, generator=g)[: self.target].numpy()])
            else:
                parts.append(pos)
        chosen = torch.from_numpy(np.concatenate(parts))
        return chosen[torch.randperm(len(chosen), generator=g)] if self.shuffle else chosen

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world) if self.pad else len(range(self.rank, self.n, self.world))
        return max(per_rank - self.start, 0)


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of a rank's epoch order (a 32-bit int)."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, rank, position]).generate_state(1)[0])


class AugSeeds(Sampler[tuple[int, int]]):
    """An EpochSampler's indices, each paired with its augmentation seed (ImageDataset reseeds its
    transform with it): sample_seed(sampler seed, epoch, rank, position in the epoch).

    A per-worker stream would depend on which worker drew which batch and on how far it had got,
    so a run resumed mid-epoch (fresh workers, the order skipped to the resume point) would crop and
    flip differently from one never stopped. Seeded by its place, each sample gets the same
    augmentation whatever the worker count and wherever the run was stopped.
    """

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        for position, i in enumerate(s, start=s.start):
            yield i, sample_seed(s.seed, s.epoch, s.rank, position)


class CachedBatches:
    """Whole uint8 NCHW batches straight from the decode-once cache, in `sampler`'s order.

    No workers: a cached row needs no per-image work, so the batch is one memmap slice in this
    process (what a worker would do, without shipping the batch back through shared memory).
    Mid-epoch resume and DDP sharding come from the EpochSampler as for a DataLoader.
    """

    def __init__(
        self,
        cache: np.ndarray,
        labels: np.ndarray | None,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.cache, self.labels, self.sampler = cache, labels, sampler
        self.batch_size, self.drop_last, self.pin_memory = batch_size, drop_last, pin_memory

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                return
            x = torch.from_numpy(self.cache[idx]).permute(0, 3, 1, 2).contiguous()  # NHWC rows -> NCHW
            y = (
                torch.from_numpy(self.labels[idx]).long()
                if self.labels is not None
                else torch.full((len(idx),), -1, dtype=torch.long)
            )
            if self.pin_memory:
                x = x.pin_memory()
            yield x, y, torch.from_numpy(idx), torch.ones(len(idx), dtype=torch.bool)


def balanced_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-sample weights so every class is drawn equally often."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    return 1.0 / counts[labels]


def make_loader(
    dataset: Dataset,
    sampler: Sampler[int],
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """collate_fn: None for torch's default (tensors stacked); device_decode passes its own."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn,
        # Workers stay alive across epochs: restarting them re-imports torch and re-opens the cache.
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,  # each worker its own, reproducible augmentation stream
        generator=torch.Generator().manual_seed(seed),
    )
