"""Shared fixtures: a tiny competition written to tmp_path (a dozen 32-px PNGs, 3 classes).

Images are drawn so a tiny CNN can tell the classes apart in an epoch or two: each class
has its own bright shape on noise.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from kpipe.config import Config, load_config

CLASSES = ["cat", "dog", "fox"]


def draw(label_idx: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A BGR uint8 image whose class is visible: a square, a disc or a bar on noise."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    c = size // 2 + int(rng.integers(-3, 4))
    colour = [(255, 60, 60), (60, 255, 60), (60, 60, 255)][label_idx]
    if label_idx == 0:
        cv2.rectangle(img, (c - 8, c - 8), (c + 8, c + 8), colour, -1)
    elif label_idx == 1:
        cv2.circle(img, (c, c), 9, colour, -1)
    else:
        cv2.rectangle(img, (2, c - 3), (size - 3, c + 3), colour, -1)
    return img


def write_competition(
    root: Path,
    n_per_class: int = 4,
    n_test: int = 6,
    layout: str = "csv",
    labels: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a Kaggle-layout competition under root; return the competition YAML path."""
    labels = labels or CLASSES
    rng = np.random.default_rng(seed)
    data = root / "data" / "tiny"
    rows = []
    for k, label in enumerate(labels):
        for j in range(n_per_class):
            image_id = f"{label}_{j:03d}"
            if layout == "csv":
                path = data / "train" / f"{image_id}.png"
            else:
                path = data / "train" / label / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), draw(k % 3, rng))
            rows.append((image_id, label))
    if layout == "csv":
        pd.DataFrame(rows, columns=["id", "label"]).to_csv(data / "train.csv", index=False)
    test_ids = []
    (data / "test").mkdir(parents=True, exist_ok=True)
    for j in range(n_test):
        image_id = f"t{j:03d}"
        cv2.imwrite(str(data / "test" / f"{image_id}.png"), draw(j % 3, rng))
        test_ids.append(image_id)
    pd.DataFrame({"id": test_ids, "label": labels[0]}).to_csv(data / "sample_submission.csv", index=False)
    comp = {"name": "tiny", "data_dir": str(data), "layout": layout}
    comp_path = root / "tiny.yaml"
    comp_path.write_text(yaml.safe_dump(comp))
    return comp_path


TINY_EXP = {
    "model": {"name": "test_resnet", "pretrained": False},
    "data": {"img_size": 32, "batch_size": 4, "num_workers": 0, "aug": "light"},
    "train": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0, "device": "cpu"},
    "folds": {"n_folds": 2},
    "infer": {"tta": ["identity", "hflip"], "batch_size": 8},
}


def path_overrides(root: Path) -> list[str]:
    """`paths.*=` and `data.cache_dir=` overrides that put every output of a run under `root`."""
    folders = {
        "data_root": "data",
        "folds_dir": "folds",
        "runs_dir": "runs",
        "predictions_dir": "predictions",
        "submissions_dir": "submissions",
    }
    return [*(f"paths.{k}={root / v}" for k, v in folders.items()), f"data.cache_dir={root / 'cache'}"]


def tiny_config(root: Path, comp_path: Path, overrides: list[str] = (), exp: dict | None = None) -> Config:
    exp_path = root / "tiny_exp.yaml"
    exp_path.write_text(yaml.safe_dump(exp or TINY_EXP))
    return load_config(exp_path, comp_path, [*path_overrides(root), *overrides])


@pytest.fixture
def tiny_comp(tmp_path: Path) -> Path:
    return write_competition(tmp_path)


@pytest.fixture
def tiny_cfg(tmp_path: Path, tiny_comp: Path) -> Config:
    return tiny_config(tmp_path, tiny_comp)
