"""`kpipe explain` on a tiny trained run, and its pure helpers on small arrays."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.errors import KpipeError
from kpipe.eval import explain as ex
from kpipe.eval.oof import Oof
from kpipe.nn import models
from kpipe.stages import explain, folds, train


def _oof() -> Oof:
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    return Oof(
        ["a", "b", "c", "d", "e"],
        ["x", "y", "y", "z", "z"],
        ["x", "y", "z"],
        probs,
        np.array([0, 0, 1, 1, 1]),
    )


def test_top_losses_and_most_confused() -> None:
    top = ex.top_losses(_oof(), 2)
    assert top["id"].tolist() == ["e", "c"]  # p(given) 0.1, then 0.3
    assert np.isclose(top["loss"].iloc[0], -np.log(0.1)) and top["predicted"].tolist() == ["x", "x"]
    pairs = ex.most_confused(_oof(), 5)
    assert pairs.values.tolist() == [["y", "x", 1], ["z", "x", 1]]


def test_filter_grid_rgb_and_grey() -> None:
    rgb = ex.filter_grid(np.random.default_rng(0).normal(size=(16, 3, 3, 3)), cell=8)
    grey = ex.filter_grid(np.random.default_rng(0).normal(size=(5, 4, 3, 3)), cell=8)
    assert rgb.shape == (2 + 2 * 10, 2 + 8 * 10, 3) and rgb.dtype == np.uint8
    assert grey.shape == (2 + 10, 2 + 5 * 10, 3)


def test_grad_cam_shows_where_the_evidence_is() -> None:
    """Class 1 = mean activation, class 0 = minus it; the image is bright only top-left."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 1, 1, bias=False)
            self.head = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.body(x).mean(dim=(1, 2, 3))
            return torch.stack([-m, m], dim=1)

    model = Probe()
    model.head = nn.Linear(1, 1)  # a parameter, so the head counts as a stage as in real models
    nn.init.constant_(model.body.weight, 1.0)
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, :4, :4] = 1.0
    assert models.stage_names(model) == ["body", "head"]
    cam = ex.grad_cam(model, "body", x, [1, 0])
    assert cam.shape == (2, 16, 16)
    assert (
        cam[0, :3, :3].min() > 0.9 and cam[0, 8:, 8:].max() < 0.1
    )  # evidence for class 1: the bright corner
    assert cam[1].max() < 1e-6  # nothing speaks for class 0


def test_model_without_conv_says_what_is_unsupported() -> None:
    with pytest.raises(KpipeError, match="no Conv2d.*filters picture is unsupported"):
        ex.first_conv(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))
    with pytest.raises(KpipeError, match="Grad-CAM and feature maps are unsupported"):
        ex.cam_stage(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), {})


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_explain_on_a_tiny_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path, n_per_class=6))
    folds.run(cfg)
    train.run(cfg)
    run = explain.run(cfg, images=3)
    page = run.explain_html.read_text()
    parser = _Images()
    parser.feed(page)
    assert "filters.png" in parser.src and "gradcam_given.png" in parser.src
    assert any(s.startswith("maps_layer4_") for s in parser.src)  # every stage of test_resnet is drawn
    for src in parser.src:  # every picture on the page exists beside it and is a PNG
        assert (run.explain_dir / src).read_bytes().startswith(b"\x89PNG"), src
    assert "Most confused pairs" in page and "Top losses" in page
    assert paths.run_dir(cfg).explain_dir == run.explain_dir
    with pytest.raises(KpipeError, match="fold 7 has no best.pt"):
        explain.run(cfg, fold=7)
