"""Per-image albumentations presets and whole-batch torch augmentation/normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kpipe.data import transforms as T
from kpipe.data.image import resize_square
from kpipe.errors import KpipeError
from kpipe.registry import AUG_PRESETS

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _img(h: int = 50, w: int = 70, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("preset", AUG_PRESETS.names())
def test_presets_ship_uint8_chw(preset: str) -> None:
    tf = T.build_train(preset, 32)
    for seed in range(5):
        x = tf(image=_img(seed=seed))["image"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8


def test_eval_matches_cache_resize() -> None:
    img = _img()
    for size in (32, 100):  # down and up
        x = T.build_eval(size)(image=img)["image"]
        assert x.dtype == torch.uint8
        np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), resize_square(img, size))


def test_unknown_preset() -> None:
    with pytest.raises(KpipeError, match="light"):
        T.build_train("extreme", 32)


class _Aug(Dataset):
    def __init__(self) -> None:
        self.transform = T.build_train("heavy", 16)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(image=_img(24, 24))["image"]


def _epoch(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loader = DataLoader(_Aug(), batch_size=4, num_workers=2, worker_init_fn=T.seed_worker)
    return torch.cat(list(loader))


def test_seed_worker_gives_workers_own_streams() -> None:
    # Same image 8 times; worker 0 serves samples 0-3, worker 1 samples 4-7.
    a = _epoch(0)
    assert not torch.equal(a[:4], a[4:])  # without seed_worker both workers draw the same
    assert torch.equal(a, _epoch(0))  # and still reproducible from torch.manual_seed


def test_batch_augment_identity_and_flips() -> None:
    x = torch.from_numpy(np.stack([_img(32, 32, s) for s in range(4)]))  # NHWC uint8
    nchw = x.permute(0, 3, 1, 2)
    same = T.batch_augment(x, scale=(1, 1), ratio=(1, 1), hflip=0.0)
    assert same.dtype == torch.uint8 and torch.equal(same, nchw)
    assert torch.equal(T.batch_augment(nchw, scale=(1, 1), ratio=(1, 1), hflip=1.0), nchw.flip(-1))
    assert torch.equal(T.batch_augment(nchw, scale=(1, 1), ratio=(1, 1), hflip=0.0, vflip=1.0), nchw.flip(-2))


def test_batch_augment_random_crops() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(np.stack([_img(40, 40, s) for s in range(8)]))
    y = T.batch_augment(x, size=24, scale=(0.2, 0.5), generator=g)
    assert y.shape == (8, 3, 24, 24) and y.dtype == torch.uint8
    # Crops differ per sample: the same image repeated gives different outputs.
    same = T.batch_augment(x[:1].repeat(8, 1, 1, 1), size=24, scale=(0.2, 0.5), generator=g)
    assert len({bytes(s.numpy()) for s in same}) == 8
    f = T.batch_augment(x.float(), size=24, generator=g)
    assert f.dtype == torch.float32 and 0 <= f.min() and f.max() <= 255


def test_normalize() -> None:
    x = torch.from_numpy(np.stack([_img(8, 8, s) for s in range(2)]))
    ref = (x.permute(0, 3, 1, 2).double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    for batch in (x, x.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2).contiguous()):  # NHWC, its NCHW view, NCHW
        y = T.Normalize(MEAN, STD)(batch)
        assert y.shape == (2, 3, 8, 8) and y.dtype == torch.float32 and y.is_contiguous()
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)
    f = x.float()
    T.Normalize(MEAN, STD)(f)
    assert torch.equal(f, x.float())  # a float input is copied, never normalised in place
    with pytest.raises(ValueError, match="4-D"):
        T.Normalize(MEAN, STD)(x[0])
    with pytest.raises(KpipeError, match="std"):
        T.Normalize(MEAN, (0.2, 0.0, 0.2))


def test_crop_grid_matches_affine_grid() -> None:
    # Reference: the same draws through F.affine_grid with theta [[sx, 0, tx], [0, sy, ty]].
    b, h, w, out, scale, ratio = 6, 40, 30, 24, (0.2, 1.0), (0.75, 1.33)
    grid = T._crop_flip_grid(b, h, w, out, scale, ratio, 0.5, 0.5, torch.Generator().manual_seed(3))
    u = torch.rand(b, 6, generator=torch.Generator().manual_seed(3))
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    r = torch.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[:, 1])
    fw, fh = torch.sqrt(area * r * h / w).clamp(max=1.0), torch.sqrt(area / r * w / h).clamp(max=1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = torch.where(u[:, 4] < 0.5, -fw, fw)
    theta[:, 1, 1] = torch.where(u[:, 5] < 0.5, -fh, fh)
    theta[:, 0, 2], theta[:, 1, 2] = (1 - fw) * (2 * u[:, 2] - 1), (1 - fh) * (2 * u[:, 3] - 1)
    ref = torch.nn.functional.affine_grid(theta, [b, 3, out, out], align_corners=False)
    torch.testing.assert_close(grid, ref, atol=1e-5, rtol=0)
    assert grid.abs().max() <= 1 + 1e-6  # crops stay inside the image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_ops_on_cuda() -> None:
    x = torch.from_numpy(np.stack([_img(32, 32, s) for s in range(4)])).cuda()
    y = T.Normalize(MEAN, STD)(T.batch_augment(x, size=24))
    assert y.is_cuda and y.shape == (4, 3, 24, 24)
    same = T.batch_augment(x, scale=(1, 1), ratio=(1, 1), hflip=1.0)
    assert torch.equal(same.cpu(), x.permute(0, 3, 1, 2).flip(-1).cpu())


def test_batch_augment_class_gives_normalised_float_batches() -> None:
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    out = T.BatchAugment("medium", 16, MEAN, STD, hflip=True)(x)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16)
    lo = min((0 - m) / s for m, s in zip(MEAN, STD, strict=True))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD, strict=True))
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    # "none": no crop, no flip, exactly the normalised input
    plain = T.BatchAugment("none", 16, MEAN, STD)(x)
    assert torch.allclose(plain, T.Normalize(MEAN, STD)(x))


def test_aug_list_form_adds_one_op_at_a_time() -> None:
    from kpipe.data.presets import NOTHING, compose, resolve
    from kpipe.registry import AUG_OPS

    assert resolve([]) == NOTHING == AUG_PRESETS.get("none") and resolve([]).is_identity
    p = resolve(["hflip", "rotate"])
    assert p.flip and not p.crop and p.rotate == 15 and p.affine_p == 0.5 and p.jitter_p == 0
    assert compose(["rotate", "shear"]).affine_p == 0.5 and compose(["rotate", "shear"]).shear == 10
    names = lambda aug: [type(t).__name__ for t in T.build_train(aug, 32).transforms]  # noqa: E731
    assert names([]) == ["Resize", "ToTensorV2"]
    assert names(["hflip"]) == ["Resize", "HorizontalFlip", "ToTensorV2"]
    assert names(["crop", "hflip", "color_jitter", "grayscale"]) == [
        "RandomResizedCrop",
        "HorizontalFlip",
        "ColorJitter",
        "ToGray",
        "ToTensorV2",
    ]
    for op in AUG_OPS.names():  # every op builds and ships uint8 CHW, per image and (flips, crop) per batch
        x = T.build_train([op], 32)(image=_img())["image"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
        y = T.BatchAugment([op], 32, MEAN, STD)(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        assert y.shape == (2, 3, 32, 32) and y.dtype == torch.float32
    # flip alone: the batch op flips without cropping (ratio and scale fixed at 1)
    b = T.BatchAugment(["hflip"], 32, (0, 0, 0), (1 / 255,) * 3)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = b(x).round().to(torch.uint8)
    same = [torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(same) and not torch.equal(y, x)
