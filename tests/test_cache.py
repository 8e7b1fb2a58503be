"""Decode-once cache: content, reuse, staleness, resume after a kill, unreadable images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kpipe import paths
from kpipe.config import validate
from kpipe.data import cache
from kpipe.data.image import read_rgb, resize_square
from kpipe.errors import KpipeError

SIZE = 16


def _images(folder: Path, n: int = 10) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        ext = "png" if i % 2 else "jpg"
        p = folder / f"ïmg {i:03d}.{ext}"  # unicode + space: ids survive byte for byte
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_content_equals_fresh_decode(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img")
    arr = cache.build_cache(paths, SIZE, tmp_path / "c" / "train.npy", workers=2, chunk_rows=3)
    assert isinstance(arr, np.memmap) and arr.shape == (10, SIZE, SIZE, 3) and arr.dtype == np.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(arr[i], resize_square(read_rgb(p), SIZE))
    assert not arr.flags.writeable
    assert sorted(f.name for f in (tmp_path / "c").iterdir()) == [
        "train.index.json",
        "train.lock",
        "train.npy",
    ]
    np.testing.assert_array_equal(cache.open_cache(tmp_path / "c" / "train.npy", paths, SIZE), arr)


def test_reused_then_rebuilt_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "img", 4)
    target = tmp_path / "train.npy"
    cache.build_cache(paths, SIZE, target)
    calls: list[str] = []
    real = cache._load_one

    def counting(path: str, size: int) -> np.ndarray | str:
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(cache, "_load_one", counting)
    cache.build_cache(paths, SIZE, target)
    assert calls == []  # valid cache: nothing decoded
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(paths[1])  # source changed
    os.utime(paths[1], ns=(1, 1))
    with pytest.raises(KpipeError, match="stale"):
        cache.open_cache(target, paths, SIZE)
    arr = cache.build_cache(paths, SIZE, target)
    assert len(calls) == 4 and arr[1].max() == 0
    cache.build_cache(paths, SIZE * 2, tmp_path / "train32.npy")  # another size, another file
    assert len(calls) == 8


def test_killed_build_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _images(tmp_path / "img", 10)
    target = tmp_path / "train.npy"
    real = cache._load_one
    calls: list[str] = []

    def dies_at_7(path: str, size: int) -> np.ndarray | str:
        if path == paths[7]:
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-chunk
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(cache, "_load_one", dies_at_7)
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(paths, SIZE, target, workers=1, chunk_rows=3)
    assert not target.exists() and (tmp_path / "train.npy.partial").exists()
    with pytest.raises(KpipeError, match="no finished cache"):
        cache.open_cache(target)
    calls.clear()
    monkeypatch.setattr(cache, "_load_one", lambda p, s: calls.append(p) or real(p, s))
    arr = cache.build_cache(paths, SIZE, target, workers=1, chunk_rows=3)
    assert calls == paths[6:]  # rows 0-5 (two whole chunks) were kept
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(arr[i], resize_square(read_rgb(p), SIZE))
    assert not (tmp_path / "train.npy.partial").exists() and not (tmp_path / "train.progress.json").exists()


def test_unreadable_images_reported(tmp_path: Path) -> None:
    paths = _images(tmp_path / "img", 4)
    (tmp_path / "img" / "bad.png").write_text("not an image", encoding="utf-8")
    paths += [str(tmp_path / "img" / "bad.png"), str(tmp_path / "img" / "gone.jpg")]
    target = tmp_path / "test.npy"
    with pytest.raises(KpipeError, match=r"2 of 6 images could not be read.*bad.png: not an image"):
        cache.build_cache(paths, SIZE, target)
    arr = cache.build_cache(paths, SIZE, target, on_error="skip")  # finished once, not re-decoded
    assert arr.shape[0] == 6 and arr[4].max() == 0 and arr[5].max() == 0
    assert cache.failed_rows(target) == {
        4: "not an image (or a format neither OpenCV nor PIL decodes)",
        5: "file not found",
    }
    with pytest.raises(KpipeError, match="could not be read"):
        cache.build_cache(paths, SIZE, target)  # still raises for training use


def test_cache_file_for_and_empty(tmp_path: Path) -> None:
    cfg = validate({"competition": {"name": "demo"}, "data": {"cache_dir": str(tmp_path)}})
    assert paths.cache_file(cfg, 64, "train") == tmp_path / "demo" / "64" / "train.npy"
    with pytest.raises(KpipeError, match="no images"):
        cache.build_cache([], SIZE, tmp_path / "x.npy")


WAITS_FOR_LOCK = """
import sys, threading, time
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
from pathlib import Path
from kpipe.data import cache
from kpipe.io import exclusive
target, images = Path(sys.argv[1]), sys.argv[2:]
with exclusive(target.with_name(target.stem + ".lock")):  # another rank is building
    builder = threading.Thread(target=cache.build_cache, args=(images, 16, target))
    builder.start()
    time.sleep(1.0)
    print("built while locked" if target.exists() else "waited")
builder.join(timeout=60)
print("built" if target.exists() else "not built")
"""


def test_build_waits_for_the_lock_without_fcntl(tmp_path: Path) -> None:
    """A second builder of one cache waits for the first on every OS (Windows has no fcntl)."""
    images = _images(tmp_path / "img", 3)
    target = tmp_path / "c" / "train.npy"
    out = subprocess.run(
        [sys.executable, "-c", WAITS_FOR_LOCK, str(target), *images],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["waited", "built"]


def test_kpipe_cache_stage_builds_what_train_opens(tiny_cfg) -> None:
    from kpipe.data.folds import load_fold_table
    from kpipe.stages import cache as cache_stage
    from kpipe.stages import folds

    folds.run(tiny_cfg)
    path = cache_stage.run(tiny_cfg)
    assert path == paths.cache_file(tiny_cfg, 32, "train")
    df, _ = load_fold_table(tiny_cfg)
    arr = cache.open_cache(path, df["path"].tolist(), 32)  # not stale: what train's _cache would open as is
    np.testing.assert_array_equal(arr[0], resize_square(read_rgb(df["path"].iloc[0]), 32))
