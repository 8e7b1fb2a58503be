"""loader.CachedBatches: whole batches from the cache, in the sampler's order, resumable and sharded."""

from __future__ import annotations

import numpy as np
import torch

from kpipe.data.loader import CachedBatches, EpochSampler

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
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 4, 5) and x.is_contiguous()  # NCHW, like the workers'
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), ARR[idx])
    assert _cat(batches, 1).tolist() == LABELS[idx].tolist() and _cat(batches, 1).dtype == torch.long
    assert bool(_cat(batches, 3).all())


def test_drop_last_resume_and_shards() -> None:
    rows = np.array([1, 2, 3, 5, 6, 8, 9])  # a fold's training rows
    sampler = EpochSampler(rows, 0)
    sampler.set_epoch(1)
    full = list(CachedBatches(ARR, LABELS, sampler, 3, drop_last=True))
    assert [len(b[0]) for b in full] == [3, 3] and len(CachedBatches(ARR, LABELS, sampler, 3, drop_last=True)) == 2
    sampler.set_epoch(1, start=3)  # resumed after one batch: the rest of the same order
    rest = list(CachedBatches(ARR, LABELS, sampler, 3, drop_last=True))
    assert _cat(rest, 2).tolist() == _cat(full, 2)[3:].tolist()
    seen = []
    for rank in range(2):
        shard = EpochSampler(rows, 0, shuffle=False, rank=rank, world=2, pad=False)
        seen += _cat(list(CachedBatches(ARR, None, shard, 2)), 2).tolist()
    assert sorted(seen) == rows.tolist()  # each row once across the ranks
    assert set(_cat(list(CachedBatches(ARR, None, shard, 2)), 1).tolist()) == {-1}  # no labels (test images)
