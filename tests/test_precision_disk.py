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
import torch

from kpipe import paths
from kpipe.config import Config
from kpipe.data import cache
from kpipe.errors import KpipeError
from kpipe.nn import precision, predict
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


# ---------------------------------------------------------------- infer.precision


class NoisyInBF16(torch.nn.Module):
    """A model that is fine in fp32 but whose bf16 output is noise: the agreement check must catch it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if y.dtype == torch.bfloat16:
            y = y + 10 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        return y


def _sidecar(cfg: Config) -> dict:
    return json.loads(paths.sidecar(paths.submission_csv(cfg, "a")).read_text())


def test_auto_falls_back_to_fp32_when_bf16_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = setup(tmp_path, ["infer.runtime=torch"])  # torch's own precision choice (OpenVINO: test_runtime.py)
    load = predict.load_run

    def noisy_run(*args: object, **kw: object) -> predict.RunModels:
        rm = load(*args, **kw)
        return predict.RunModels(
            rm.run, rm.cfg, rm.folds, [NoisyInBF16(m).eval() for m in rm.models], rm.data_cfg
        )

    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)  # propose bf16 on any CPU
    monkeypatch.setattr(predict, "load_run", noisy_run)
    infer.run(cfg)
    (form,) = _sidecar(cfg)["precision"].values()
    assert form["precision"] == "fp32" and form["reason"].startswith("fp32: bf16 disagrees with fp32")
    check = form["check"]
    assert check["images"] == 12 and check["max_prob_diff"] > precision.MAX_PROB_DIFF
    assert check["min_agreement"] == precision.AGREEMENT_MIN and form["channels_last"] is True


def test_auto_keeps_fp32_without_native_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = setup(tmp_path, ["infer.runtime=torch"])
    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)
    infer.run(cfg)
    (form,) = _sidecar(cfg)["precision"].values()
    assert form["precision"] == "fp32" and "no native bf16" in form["reason"] and form["check"] is None


def test_explicit_precision_is_obeyed_unchecked(tmp_path: Path) -> None:
    cfg = setup(tmp_path, ["infer.precision=bf16", "infer.channels_last=false", "infer.runtime=torch"])
    infer.run(cfg)
    (form,) = _sidecar(cfg)["precision"].values()
    assert form == {
        "precision": "bf16",
        "channels_last": False,
        "reason": "infer.precision=bf16 (not checked)",
        "check": None,
    }


def test_choose_keeps_an_agreeing_proposal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    p = np.random.default_rng(0).dirichlet(np.ones(5), 200).astype(np.float32)
    close = lambda dtype: p if dtype is None else p + 1e-3  # noqa: E731
    choice = precision.choose("auto", torch.device("cpu"), True, close)
    assert choice.name == "bf16" and choice.amp_dtype == torch.bfloat16
    assert choice.check["argmax_agreement"] == 1.0 and choice.check["max_prob_diff"] == pytest.approx(
        1e-3, rel=1e-4
    )
    flipped = p.copy()
    flipped[:2] = flipped[:2, ::-1]  # 1% of the argmaxes change: below the 99.5% bar
    assert (
        precision.choose("auto", torch.device("cpu"), True, lambda d: p if d is None else flipped).name
        == "fp32"
    )
    assert precision.choose("auto", torch.device("cpu"), True, None).reason.startswith(
        "fp32: no validation images"
    )
    unreadable = precision.choose("auto", torch.device("cpu"), True, lambda d: np.zeros((0, 0), np.float32))
    assert unreadable.name == "fp32" and "could be read" in unreadable.reason
