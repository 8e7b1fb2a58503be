"""loader.CachedBatches: whole batches from the cache, in the sampler's order, resumable and sharded;
ImageDataset pickles the cache as a reference to its file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kpipe.data import transforms
from kpipe.data.loader import CachedBatches, EpochSampler, ImageDataset

ARR = np.random.default_rng(0).integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)  # the cache: NHWC rows
LABELS = np.arange(10) % 3


def _cat(batches: list[tuple[torch.Tensor, ...]], i: int) -> torch.Tensor:
    return torch.cat([b[i] for b in batches])


def test_batches_follow_the_sampler() -> None:
    sampler = EpochSampler(np.arange(10), 7)
    sampler.set_epoch(2)
    loader = CachedBatches(ARR, LABELS, sampler, 4)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2] and len(loader) == 3
    idx = _cat(batches, 2).numpy()
    assert idx.tolist() == sampler.order()
    x = _cat(batches, 0)
    assert (
        x.dtype == torch.uint8 and x.shape == (10, 3, 4, 5) and x.is_contiguous()
    )  # NCHW, like the workers'
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), ARR[idx])
    assert _cat(batches, 1).tolist() == LABELS[idx].tolist() and _cat(batches, 1).dtype == torch.long
    assert bool(_cat(batches, 3).all())


def test_drop_last_resume_and_shards() -> None:
    rows = np.array([1, 2, 3, 5, 6, 8, 9])  # a fold's training rows
    sampler = EpochSampler(rows, 0)
    sampler.set_epoch(1)
    full = list(CachedBatches(ARR, LABELS, sampler, 3, drop_last=True))
    assert [len(b[0]) for b in full] == [3, 3] and len(
        CachedBatches(ARR, LABELS, sampler, 3, drop_last=True)
    ) == 2
    sampler.set_epoch(1, start=3)  # resumed after one batch: the rest of the same order
    rest = list(CachedBatches(ARR, LABELS, sampler, 3, drop_last=True))
    assert _cat(rest, 2).tolist() == _cat(full, 2)[3:].tolist()
    seen = []
    for rank in range(2):
        shard = EpochSampler(rows, 0, shuffle=False, rank=rank, world=2, pad=False)
        seen += _cat(list(CachedBatches(ARR, None, shard, 2)), 2).tolist()
    assert sorted(seen) == rows.tolist()  # each row once across the ranks
    assert set(_cat(list(CachedBatches(ARR, None, shard, 2)), 1).tolist()) == {-1}  # no labels (test images)


def test_dataset_over_the_cache_pickles_as_a_reference(tmp_path: Path) -> None:
    """A `spawn` DataLoader worker gets the dataset pickled: the cache must travel as its file, not its bytes."""
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)  # 786 KB
    np.save(tmp_path / "train.npy", arr)
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r")  # as cache.build_cache / open_cache return it
    tf = transforms.build_eval(64)
    ds = ImageDataset([f"img{i}.png" for i in range(64)], np.arange(64) % 3, tf, mapped)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000, f"{len(blob)} bytes pickled: the cache went along"
    back = pickle.loads(blob)
    assert isinstance(back.cache, np.memmap) and not back.cache.flags.writeable
    np.testing.assert_array_equal(back.cache, arr)
    for i in (0, 17, 63):
        torch.testing.assert_close(back[i][0], ds[i][0])
        assert back[i][1:] == ds[i][1:]


def test_dataset_over_a_view_or_an_array_pickles_its_data(tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", ARR)
    mapped = np.load(tmp_path / "train.npy", mmap_mode="r")
    tf = transforms.build_eval(4)
    for cache in (mapped[3:7], mapped[::2], ARR):  # not a whole-file mapping: its rows go by value
        ds = ImageDataset(["x"] * len(cache), None, tf, cache)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds)).cache, cache)


def _drawn_counts(sampling: str, labels: np.ndarray, epoch: int = 0) -> np.ndarray:
    from kpipe.data.loader import balanced_weights

    rows = np.arange(100, 100 + len(labels))  # dataset rows of the fold: labels[i] belongs to rows[i]
    weights = balanced_weights(labels, 3) if sampling == "weighted" else None
    resample = sampling if sampling in ("oversample", "undersample") else "none"
    sampler = EpochSampler(rows, 5, weights=weights, labels=labels, resample=resample)
    sampler.set_epoch(epoch)
    drawn = np.array(list(sampler))
    assert len(drawn) == len(sampler) and set(drawn) <= set(rows)
    return np.bincount(labels[drawn - 100], minlength=3)


def test_class_counts_drawn_per_epoch() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 6)  # mean class count 32
    assert _drawn_counts("none", labels).tolist() == [60, 30, 6]
    assert _drawn_counts("oversample", labels).tolist() == [60, 32, 32]  # only classes below the mean grow
    assert _drawn_counts("undersample", labels).tolist() == [32, 30, 6]  # only classes above it shrink
    w = _drawn_counts("weighted", labels)
    assert w.sum() == 96 and w.min() > 20  # each class about a third
    # undersampling keeps a fresh subset each epoch; oversampling keeps every original image
    rows = np.arange(100, 196)
    over = EpochSampler(rows, 5, labels=labels, resample="undersample")
    firsts = []
    for epoch in (0, 1):
        over.set_epoch(epoch)
        firsts.append({r for r in over if labels[r - 100] == 0})
    assert firsts[0] != firsts[1]
    up = EpochSampler(rows, 5, labels=labels, resample="oversample")
    assert set(up) == set(rows.tolist())


def test_sampling_config() -> None:
    from kpipe.config import DataConfig

    assert DataConfig(balanced_sampling=True).sampling_mode == "weighted"
    assert DataConfig(sampling="oversample").sampling_mode == "oversample"
    with pytest.raises(ValueError, match="contradict"):
        DataConfig(balanced_sampling=True, sampling="undersample")
    with pytest.raises(ValueError, match="oversample"):
        DataConfig(sampling="over")


def test_a_samples_seed_drives_its_transforms_independently() -> None:
    """AugSeeds reseeds each sample's Compose. albumentations' own set_random_seed gave every transform a
    generator with the same seed, so they drew the same numbers: flips came with the smaller crops (62 % vs 40 %
    over 3,000 seeds). kpipe's seed_transform shares one generator: the flip rate does not depend on the crop."""
    from kpipe.data.loader import AugSeeds

    g = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))
    cache = np.repeat(np.stack([g, g, g], -1)[None], 2000, axis=0)  # the column index, as brightness
    ds = ImageDataset(["x"] * len(cache), None, transforms.build_train("light", 32), cache)
    flips, spans = [], []
    for i, seed in AugSeeds(EpochSampler(np.arange(len(ds)), seed=3)):
        row = ds[(i, seed)][0].numpy()[0, 16].astype(int)
        flips.append(row[0] > row[-1])
        spans.append(abs(row[-1] - row[0]))  # how much of the width the crop kept
    flips, small = np.array(flips), np.array(spans) < np.median(spans)
    assert abs(flips.mean() - 0.5) < 0.04
    assert abs(flips[small].mean() - flips[~small].mean()) < 0.06
    again = ImageDataset(["x"] * len(cache), None, transforms.build_train("light", 32), cache)
    assert torch.equal(ds[(5, 1234)][0], again[(5, 1234)][0])  # the same seed still gives the same sample
