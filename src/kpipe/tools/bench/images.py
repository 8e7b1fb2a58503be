"""The bench's image set: synthetic photo-like JPEGs, written once and reused between runs.

Each image has gradients, smoothed noise at three scales, shapes and sensor grain, so it JPEG-codes
(quality 90) and decodes like a photo, not like a flat drawing. The set lives in
<out>/images_<n>_<w>x<h>/c<k>/ (10 class folders, so torchvision's ImageFolder reads it as it is),
vouched for by a manifest written last.
Usage: ``root, paths, labels = image_set(Path("bench"), plan)``
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kpipe.console import console, safe
from kpipe.errors import KpipeError
from kpipe.io import write_json
from kpipe.tools.bench.harness import Plan, cpus

IMAGES_VERSION = 1  # bump when the generator changes, so old image sets are rebuilt
N_CLASSES = 10


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 image that JPEG-codes like a photo: smooth regions, texture, edges, grain."""
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    t = t + np.linspace(0, 1, h, dtype=np.float32)[:, None] * rng.uniform(-1, 1)
    c0, c1 = rng.uniform(40, 200, 3).astype(np.float32), rng.uniform(40, 200, 3).astype(np.float32)
    img = c0 + (c1 - c0) * t[..., None]
    for cells, amp in ((8, 40.0), (32, 25.0), (96, 15.0)):  # clouds at three scales
        noise = rng.standard_normal((max(2, cells * h // w), cells, 3)).astype(np.float32)
        img += amp * cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(4, 10))):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(8, max(9, w // 5)))
        kind = int(rng.integers(3))
        if kind == 0:
            cv2.circle(img, (x, y), r, colour, -1, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + r, y + int(rng.integers(8, max(9, h // 3)))), colour, -1)
        else:
            end = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, (x, y), end, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 0.8)
    # Sensor grain: what makes a photo's JPEG cost more to decode than a drawing's.
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6.0
    return np.clip(img, 0, 255).astype(np.uint8)


def image_set(out_dir: Path, plan: Plan, seed: int = 0) -> tuple[Path, list[str], np.ndarray]:
    """(root, paths, labels) of the JPEG set, written once into <out>/images_<n>_<w>x<h>/<class>/.

    The set is written into a .partial folder renamed into place when complete, and a manifest
    (written last) vouches for it: a killed run never leaves a half set that looks finished.
    """
    h, w = plan.photo_hw
    root = out_dir / f"images_{plan.n_images}_{w}x{h}"
    spec = {"version": IMAGES_VERSION, "n": plan.n_images, "hw": [h, w], "quality": 90, "seed": seed}
    rel = [f"c{i % N_CLASSES}/img_{i:05d}.jpg" for i in range(plan.n_images)]
    manifest = root / "manifest.json"
    if not (
        manifest.is_file() and _read_manifest(manifest) == spec and all((root / r).is_file() for r in rel)
    ):
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for c in range(N_CLASSES):
            (partial / f"c{c}").mkdir(parents=True, exist_ok=True)

        def write(i: int) -> None:
            rgb = photo(np.random.default_rng([seed, i]), h, w)
            ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise KpipeError(f"bench: OpenCV could not encode synthetic image {i}")
            (partial / rel[i]).write_bytes(buf.tobytes())

        console.print(f"bench: writing {plan.n_images} synthetic JPEGs ({w}x{h}) to {safe(root)} (once)")
        with ThreadPoolExecutor(max_workers=cpus()) as pool:  # OpenCV releases the GIL
            list(pool.map(write, range(plan.n_images)))
        shutil.rmtree(root, ignore_errors=True)
        os.replace(partial, root)
        write_json(manifest, spec)
    paths = [str(root / r) for r in rel]
    return root, paths, np.arange(plan.n_images) % N_CLASSES


def _read_manifest(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
