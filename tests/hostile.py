"""A hostile competition for the robustness tests, written by code into a folder (no committed binaries).

Train and test both hold what real downloads hold: zero-byte files, truncated JPEGs and PNGs,
a text file named .png, RGBA / CMYK / 16-bit / EXIF-rotated images, ids with spaces, unicode
(NFC and NFD), leading zeros and a trailing space, CSV rows naming files that do not exist,
and labels with stray whitespace. Either ingest layout ("csv" or "folders"). Every class keeps
six plain images plus readable odd ones, so 2 folds always work.

Usage: ``h = build(tmp_path, layout="csv"); kpipe.cli.main(h.argv("folds"))``
"""

from __future__ import annotations

import io
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from conftest import path_overrides

CLASSES = ["cat", "dog", "fox"]
COMP = "hostile"
NFD_ID = unicodedata.normalize("NFD", "café 03")  # 'e' + combining accent: differs byte-wise from NFC
EXP = {
    "model": {"name": "test_resnet", "pretrained": False},
    "data": {"img_size": 32, "batch_size": 4, "num_workers": 0, "aug": "light"},
    "train": {"epochs": 1, "lr": 1e-3, "warmup_epochs": 0, "device": "cpu"},
    "folds": {"n_folds": 2},
    "infer": {"tta": ["identity"], "batch_size": 8},
}


@dataclass
class Hostile:
    """Where the competition is, and what the tests should find in it."""

    root: Path
    comp: Path  # competition YAML
    exp: Path  # experiment YAML
    layout: str
    good_train: dict[str, str] = field(default_factory=dict)  # id -> normalised label
    bad_train: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> words its reason may hold
    ws_train: list[str] = field(default_factory=list)  # ids whose raw label has stray whitespace
    test_ids: list[str] = field(default_factory=list)  # sample_submission order
    bad_test: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> words its reason may hold

    @property
    def data_dir(self) -> Path:
        return self.root / "data" / COMP

    def overrides(self) -> list[str]:
        """Every output under root (never the repository's data/, folds/, runs/)."""
        return path_overrides(self.root)

    def argv(self, stage: str, *extra: str, pre: tuple[str, ...] = ()) -> list[str]:
        """`kpipe <stage> [pre...] -c exp --comp comp <paths> <extra>`; `pre` holds positionals like a file."""
        return [stage, *pre, "-c", str(self.exp), "--comp", str(self.comp), *self.overrides(), *extra]


# ------------------------------------------------------------------ image bytes


def picture(k: int, rng: np.random.Generator, h: int = 32, w: int = 32) -> np.ndarray:
    """An RGB uint8 picture of class k (square, disc or bar) at a random place on noise; no two alike."""
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    cy, cx = int(rng.integers(10, h - 10)), int(rng.integers(10, w - 10))
    colour = [(255, 40, 40), (40, 255, 40), (40, 40, 255)][k]
    if k == 0:
        cv2.rectangle(img, (cx - 6, cy - 6), (cx + 6, cy + 6), colour, -1)
    elif k == 1:
        cv2.circle(img, (cx, cy), 7, colour, -1)
    else:
        cv2.rectangle(img, (1, cy - 3), (w - 2, cy + 3), colour, -1)
    return img


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))[1].tobytes()


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[
        1
    ].tobytes()


def rgba_png(rgb: np.ndarray) -> bytes:
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:4] = 0  # a transparent band: read_rgb composites it on white
    return cv2.imencode(".png", np.dstack([rgb[:, :, ::-1], alpha]))[1].tobytes()


def png16(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", rgb[:, :, ::-1].astype(np.uint16) * 257)[1].tobytes()


def cmyk_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def exif_jpeg(rgb: np.ndarray) -> bytes:
    """Stored sideways with EXIF orientation 6: a 32x20 (w x h) file that displays 20 wide, 32 high."""
    stored = np.ascontiguousarray(
        np.rot90(rgb[:, 6:26], k=1)
    )  # orientation 6 = rotate 90 clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 6 // 10]


# Readable odd files: (id, maker, class index). Unusable ones: (id, bytes maker or None for no file, reason).
ODD = [("rgba 1", rgba_png, 0), ("cmyk 1", cmyk_jpeg, 1), ("deep16 1", png16, 2), ("exif 1", exif_jpeg, 0)]
WEIRD_IDS = [("café 01", 0), ("猫 2", 1), (NFD_ID, 2), ("007", 2), ("end space ", 0)]
BAD = [
    ("zero bytes", ".png", lambda rgb: b"", ("zero",)),
    ("trunc jpg", ".jpg", lambda rgb: truncated(jpeg(rgb)), ("truncated",)),
    ("trunc png", ".png", lambda rgb: truncated(png(rgb)), ("truncated",)),
    ("text as png", ".png", lambda rgb: b"id,label\nthis is not an image\n", ("not_image", "not an image")),
]
MISSING = ("ghost 9", ("missing", "not found"))  # a CSV / sample row whose file does not exist


def _ext(maker: object) -> str:
    return ".jpg" if maker in (cmyk_jpeg, exif_jpeg, jpeg) else ".png"


def _raw_label(k: int, j: int) -> str:
    """Rows 1 and 4 of a class carry stray whitespace: a trailing space; a leading space and a tab."""
    return {1: CLASSES[k] + " ", 4: " " + CLASSES[k] + "\t"}.get(j, CLASSES[k])


# ------------------------------------------------------------------ the competition


def build(root: Path, layout: str = "csv", seed: int = 0) -> Hostile:
    """Write the hostile competition under root/data/hostile and its YAMLs under root."""
    rng = np.random.default_rng(seed)
    h = Hostile(root, root / "hostile.yaml", root / "hostile_exp.yaml", layout)
    _write_train(h, rng)
    _write_test(h, rng)
    comp = {"name": COMP, "data_dir": str(h.data_dir), "layout": layout}
    h.comp.write_text(yaml.safe_dump(comp, allow_unicode=True), encoding="utf-8")
    h.exp.write_text(yaml.safe_dump(EXP), encoding="utf-8")
    return h


def _write_train(h: Hostile, rng: np.random.Generator) -> None:
    rows: list[tuple[str, str]] = []  # (id as the CSV has it, raw label)
    train = h.data_dir / "train"

    def put(name: str, k: int, raw_label: str, data: bytes) -> str:
        # csv: id = file stem, flat folder; folders: id = "<folder>/<file>", the folder carries the raw label.
        stem, ext = name.rsplit(".", 1)
        if h.layout == "csv":
            path, image_id = train / name, stem
        else:
            path, image_id = train / raw_label / name, f"{raw_label}/{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((stem, raw_label))
        return image_id

    for k, cls in enumerate(CLASSES):
        for j in range(6):
            raw = _raw_label(k, j) if h.layout == "csv" else (cls + " " if j == 1 else cls)
            image_id = put(f"{cls}_{j:03d}.png", k, raw, png(picture(k, rng)))
            h.good_train[image_id] = cls
            if raw != cls and h.layout == "csv":
                h.ws_train.append(image_id)
            elif raw != cls:
                h.ws_train.append(raw)  # folders: the problem names the folder
    for name, maker, k in ODD + [(i, png, k) for i, k in WEIRD_IDS]:
        h.good_train[put(f"{name}{_ext(maker)}", k, CLASSES[k], maker(picture(k, rng)))] = CLASSES[k]
    for j, (name, ext, maker, reason) in enumerate(BAD):
        h.bad_train[put(f"{name}{ext}", j % 3, CLASSES[j % 3], maker(picture(j % 3, rng)))] = reason
    if h.layout == "csv":
        rows.append((MISSING[0], " dog "))
        h.bad_train[MISSING[0]] = MISSING[1]
        pd.DataFrame(rows, columns=["id", "label"]).to_csv(
            h.data_dir / "train.csv", index=False, encoding="utf-8"
        )
    else:
        (train / "cat" / "notes.txt").write_text("labelling notes, not an image\n", encoding="utf-8")


def _write_test(h: Hostile, rng: np.random.Generator) -> None:
    test = h.data_dir / "test"
    test.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, str, bytes]] = [(f"t{j:03d}", ".png", png(picture(j % 3, rng))) for j in range(6)]
    files += [(name, _ext(maker), maker(picture(k, rng))) for name, maker, k in ODD]
    files += [(name, ".png", png(picture(k, rng))) for name, k in WEIRD_IDS]
    files += [(name, ext, maker(picture(0, rng))) for name, ext, maker, _ in BAD]
    for name, ext, data in files:
        (test / f"{name}{ext}").write_bytes(data)
    h.bad_test = {name: reason for name, _, _, reason in BAD} | {MISSING[0]: MISSING[1]}
    h.test_ids = [name for name, _, _ in files] + [MISSING[0]]
    # The target column of the sample carries stray whitespace too; it is ignored, never copied.
    sample = pd.DataFrame({"id": h.test_ids, "label": "cat "})
    sample.to_csv(h.data_dir / "sample_submission.csv", index=False, encoding="utf-8")
