"""TTA views on a known array, and the batched forward against a loop over views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kpipe.errors import KpipeError
from kpipe.nn import tta

X = torch.arange(16.0).reshape(1, 1, 4, 4)
A = X[0, 0].numpy()
S2 = np.array([0.75, 1.25, 1.75, 2.25])  # bilinear x2 source coords of the centre 4x4 crop
C = np.array([0.0, 0.25, 0.75, 1.0])  # bilinear 2->4 source coords (clamped at the edges)

EXPECTED = {
    "identity": A,
    "hflip": A[:, ::-1],
    "vflip": A[::-1, :],
    "rot90": np.rot90(A, 1),
    "rot180": np.rot90(A, 2),
    "rot270": np.rot90(A, 3),
    # arange is linear in (row, col), so bilinear resampling is exact: value = 4 * row + col.
    "scale2": 4 * S2[:, None] + S2[None, :],
    "fivecrop0.5_tl": 4 * C[:, None] + C[None, :],
    "fivecrop0.5_tr": 4 * C[:, None] + (2 + C)[None, :],
    "fivecrop0.5_bl": 4 * (2 + C)[:, None] + C[None, :],
    "fivecrop0.5_br": 4 * (2 + C)[:, None] + (2 + C)[None, :],
    "fivecrop0.5_c": 4 * (1 + C)[:, None] + (1 + C)[None, :],
}


@pytest.mark.parametrize("view", list(EXPECTED))
def test_view_on_known_array(view: str) -> None:
    out = tta.apply_view(X, view)
    assert out.shape == X.shape
    np.testing.assert_allclose(out[0, 0].numpy(), EXPECTED[view], atol=1e-5)


def test_rot90_is_counter_clockwise() -> None:
    # the top-right corner moves to the top-left
    assert tta.apply_view(X, "rot90")[0, 0, 0, 0] == X[0, 0, 0, 3]


def test_scale_down_pads_by_repeating_the_edge() -> None:
    x = torch.full((2, 3, 8, 8), 5.0)
    x[..., 0, :] = -1.0  # a dark top row: the padding above must continue it, not draw a frame
    out = tta.apply_view(x, "scale0.5")
    assert out.shape == x.shape
    assert torch.all(out[..., 6:, :] == 5.0)
    assert torch.all(out[..., 0, :] == out[..., 2, :])  # rows above the shrunk image repeat its top edge


def test_scale_one_is_identity_and_keeps_non_square_shape() -> None:
    x = torch.randn(2, 3, 6, 10)
    assert torch.equal(tta.apply_view(x, "scale1.0"), x)
    assert tta.apply_view(x, "scale1.3").shape == x.shape
    assert tta.apply_view(x, "fivecrop_c").shape == x.shape


def test_rot90_rejects_non_square() -> None:
    with pytest.raises(KpipeError, match="square"):
        tta.apply_views(torch.zeros(1, 3, 4, 6), ["rot90"])
    assert tta.apply_views(torch.zeros(1, 3, 4, 6), ["rot180"]).shape == (1, 3, 4, 6)


def test_parse_views_expands_fivecrop_and_suggests() -> None:
    assert tta.parse_views(["identity", "fivecrop"]) == ["identity"] + [
        f"fivecrop_{p}" for p in tta.CROP_POSITIONS
    ]
    assert tta.parse_views(["fivecrop0.8_c", "scale1.15"]) == ["fivecrop0.8_c", "scale1.15"]
    with pytest.raises(KpipeError, match="did you mean 'hflip'"):
        tta.parse_views(["hflp"])
    with pytest.raises(KpipeError, match="fraction"):
        tta.parse_views(["fivecrop1.5"])
    with pytest.raises(KpipeError, match="twice"):
        tta.parse_views(["hflip", "hflip"])
    with pytest.raises(KpipeError, match="no views"):
        tta.parse_views([])


def test_apply_and_split_are_view_major() -> None:
    x = torch.randn(3, 2, 4, 4)
    views = ["identity", "hflip", "rot90"]
    big = tta.apply_views(x, views)
    assert big.shape == (9, 2, 4, 4)
    parts = tta.split_views(big, 3)
    for v, name in enumerate(views):
        assert torch.equal(parts[v], tta.apply_view(x, name))


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()


@pytest.mark.parametrize("max_batch", [None, 7])
def test_batched_equals_loop(max_batch: int | None) -> None:
    model = _tiny_model()
    x = torch.randn(4, 3, 8, 8)
    views = ["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "scale1.2", "scale0.8", "fivecrop"]
    probs = tta.predict_batched(model, x, views, max_batch=max_batch)
    names = tta.parse_views(views)
    assert probs.shape == (len(names), 4, 5)
    with torch.no_grad():
        loop = torch.stack([model(tta.apply_view(x, v)).softmax(-1) for v in names])
    assert torch.allclose(probs, loop, atol=1e-6)


def test_predict_batched_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval"):
        tta.predict_batched(_tiny_model().train(), torch.randn(1, 3, 8, 8), ["identity"])


def test_aggregate_mean_and_geomean() -> None:
    p = torch.tensor([[[0.8, 0.2]], [[0.2, 0.8]], [[0.5, 0.5]]])
    assert torch.allclose(tta.aggregate(p, "mean"), torch.tensor([[0.5, 0.5]]))
    g = tta.aggregate(p.numpy(), "geomean")
    assert isinstance(g, np.ndarray)
    np.testing.assert_allclose(g, [[0.5, 0.5]], atol=1e-9)
    q = np.array([[[0.9, 0.1]], [[0.6, 0.4]]])
    gm = np.sqrt(q[0] * q[1])
    np.testing.assert_allclose(tta.aggregate(q, "geomean"), gm / gm.sum(), atol=1e-9)
    np.testing.assert_allclose(tta.aggregate(q, "mean", weights=np.array([3.0, 1.0])), [[0.825, 0.175]])
    with pytest.raises(KpipeError, match="geomean"):
        tta.aggregate(q, "median")
