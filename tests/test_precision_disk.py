"""infer.precision's agreement check, the free-space check before large writes, and infer.save_views.

Hand-built random-weight runs (test_infer.make_run); the disk is made "full" by monkeypatching
shutil.disk_usage, so nothing large is ever written.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kpipe import paths
from kpipe.data import cache
from kpipe.errors import KpipeError
from kpipe.stages import infer
from test_infer import setup

Usage = namedtuple("Usage", "total used free")


def _full_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * free + 1, 9 * free, free))


def test_cache_refuses_when_the_disk_is_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = setup(tmp_path)
    files = sorted(str(p) for p in (Path(cfg.competition.data_dir) / "train").glob("*.png"))
    _full_disk(monkeypatch, 1000)
    out = tmp_path / "cache" / "c.npy"
    with pytest.raises(KpipeError) as e:
        cache.build_cache(files, 32, out)
    msg = str(e.value)
    needed = len(files) * 32 * 32 * 3
    assert f"needs {needed / 1024:.1f} KB" in msg and "only 1000 B is free" in msg and "data.cache_dir" in msg
    assert not out.exists()
    monkeypatch.undo()
    assert cache.build_cache(files, 32, out).shape == (len(files), 32, 32, 3)  # with room, it builds


def test_infer_refuses_when_predictions_do_not_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = setup(tmp_path)
    _full_disk(monkeypatch, 500)
    with pytest.raises(KpipeError, match=r"needs .* only 500 B is free .*infer.save_views"):
        infer.run(cfg)
    assert not paths.predictions_dir(cfg, "a").exists()


def test_predictions_bytes_shrink_with_save_views() -> None:
    full = infer.predictions_bytes(1000, 100, 10, "float32")
    half = infer.predictions_bytes(1000, 100, 10, "float16")
    none = infer.predictions_bytes(1000, 100, 10, False)
    assert full - none == 2 * (half - none) == 1000 * 100 * 10 * 4


@pytest.mark.parametrize("save_views", ["float16", False])
def test_save_views(tmp_path: Path, save_views: str | bool) -> None:
    cfg = setup(tmp_path, [f"infer.save_views={str(save_views).lower()}"])
    ref = setup(tmp_path / "ref")
    infer.run(cfg)
    infer.run(ref)
    out, ref_out = paths.predictions_dir(cfg, "a"), paths.predictions_dir(ref, "a")
    index, ref_index = (json.loads((d / "members.json").read_text()) for d in (out, ref_out))
    assert len(index) == len(ref_index) == 4  # 2 folds x 2 views
    pd.testing.assert_frame_equal(pd.read_csv(out / "probs.csv"), pd.read_csv(ref_out / "probs.csv"))
    for m, r in zip(index, ref_index, strict=True):
        full = np.load(ref_out / r["file"])
        assert full.dtype == np.float32 and r["dtype"] == "float32"
        if save_views is False:
            assert m["file"] is None and m["dtype"] is None
            continue
        half = np.load(out / m["file"])
        assert half.dtype == np.float16 and m["dtype"] == "float16"
        np.testing.assert_allclose(half.astype(np.float32), full, atol=1e-3, rtol=1e-3)
    if save_views is False:
        assert not (out / "members").exists()
