"""infer.runtime (OpenVINO on the CPU, checked against torch fp32) and infer.compile, through the real infer stage.

Hand-built random-weight runs (test_infer.setup: test_resnet, 32 px, 2 folds). OpenVINO runs with the f32
hint where figures are compared (bf16 on near-uniform random-weight outputs would make the check a coin toss).
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kpipe import paths
from kpipe.config import Config
from kpipe.errors import KpipeError
from kpipe.nn import runtime
from kpipe.stages import infer
from test_infer import setup

pytest.importorskip("openvino")


def _sidecar(cfg: Config) -> dict:
    return json.loads(paths.sidecar(paths.submission_csv(cfg, "a")).read_text())


def _probs(cfg: Config) -> pd.DataFrame:
    return pd.read_csv(paths.predictions_dir(cfg, "a") / "probs.csv").set_index("id")


def _members(cfg: Config) -> dict[str, np.ndarray]:
    out = paths.predictions_dir(cfg, "a")
    return {m["file"]: np.load(out / m["file"]) for m in json.loads((out / "members.json").read_text())}


def test_openvino_matches_torch_fp32_with_every_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    views = "infer.tta=[identity,hflip,rot90,scale0.9]"
    # batch 4 over 6 test images: the last batch is partial (the converted model's batch stays dynamic)
    ov = setup(tmp_path / "ov", ["infer.runtime=openvino", "infer.batch_size=4", views])
    ref = setup(
        tmp_path / "ref", ["infer.runtime=torch", "infer.precision=fp32", "infer.batch_size=4", views]
    )
    monkeypatch.setattr(runtime, "ov_precision_hint", lambda: "f32")
    infer.run(ov)
    infer.run(ref)
    (rt,) = _sidecar(ov)["runtime"].values()
    assert rt["runtime"] == "openvino" and rt["ov_precision_hint"] == "f32"
    assert rt["reason"].startswith("openvino, f32: agrees with torch fp32")
    assert rt["check"]["images"] == 12 and rt["check"]["argmax_agreement"] == 1.0
    assert rt["compile"]["compiled"] is False and rt["convert_seconds"] > 0
    (form,) = _sidecar(ov)["precision"].values()
    assert "OpenVINO runs the models" in form["reason"] and form["channels_last"] is False
    (ref_rt,) = _sidecar(ref)["runtime"].values()
    assert ref_rt["runtime"] == "torch" and ref_rt["reason"] == "infer.runtime=torch"
    pd.testing.assert_frame_equal(_probs(ov), _probs(ref), atol=1e-4, rtol=1e-4)
    got, want = _members(ov), _members(ref)
    assert len(got) == 2 * 4  # 2 folds x 4 views, each view through OpenVINO
    for name, p in want.items():
        np.testing.assert_allclose(got[name], p, atol=1e-4)


def test_auto_falls_back_to_torch_when_openvino_disagrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = setup(tmp_path, ["infer.runtime=auto"])
    forward = runtime.OpenVINOModel.forward

    def permuted(self: runtime.OpenVINOModel, x: torch.Tensor) -> torch.Tensor:
        return forward(self, x).roll(1, dims=1)  # every image's classes shifted by one: a wrong argmax

    monkeypatch.setattr(runtime.OpenVINOModel, "forward", permuted)
    infer.run(cfg)
    (rt,) = _sidecar(cfg)["runtime"].values()
    assert rt["runtime"] == "torch" and rt["reason"].startswith("torch: OpenVINO (")
    assert "disagrees with fp32" in rt["reason"] and "\n" not in rt["reason"]
    assert rt["check"]["argmax_agreement"] < 0.995
    (form,) = _sidecar(cfg)["precision"].values()
    assert "OpenVINO" not in form["reason"]  # torch's own precision choice, as without OpenVINO


def test_runtime_openvino_without_openvino_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_openvino(name: str, *args: object, **kw: object) -> object:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    cfg = setup(tmp_path, ["infer.runtime=openvino"])
    with pytest.raises(
        KpipeError, match=r"infer.runtime=openvino: openvino is not importable.*pip install openvino"
    ):
        infer.run(cfg)
    auto = setup(tmp_path / "auto", ["infer.runtime=auto"])
    infer.run(auto)
    (rt,) = _sidecar(auto)["runtime"].values()
    assert rt["runtime"] == "torch" and "pip install openvino" in rt["reason"]


def test_runtime_openvino_on_cuda_is_refused_and_auto_keeps_torch() -> None:
    cuda = torch.device("cuda")
    with pytest.raises(KpipeError, match="runs on the CPU"):
        runtime.choose("openvino", cuda, lambda hint: [], None)
    choice, models = runtime.choose("auto", cuda, lambda hint: [], None)
    assert choice.name == "torch" and models is None and "CPU only" in choice.reason


def test_compiled_model_pads_and_splits_batches() -> None:
    """CompiledModel's batch handling, with torch.compile's work stood in for by the eager model."""
    model = torch.nn.Linear(3, 2).eval()
    c = runtime.CompiledModel(model, 4, torch.device("cpu"))
    c.fn = model  # the padding and splitting are under test here, not inductor
    for n in (1, 4, 9):
        x = torch.randn(n, 3)
        torch.testing.assert_close(c(x), model(x))


def test_infer_compile_agrees_with_eager(tmp_path: Path) -> None:
    base = ["infer.runtime=torch", "infer.precision=fp32", "infer.batch_size=4"]
    comp = setup(tmp_path / "c", [*base, "infer.compile=true"])
    eager = setup(tmp_path / "e", base)
    infer.run(comp)
    infer.run(eager)
    (rt,) = _sidecar(comp)["runtime"].values()
    assert rt["compile"]["compiled"] is True and "frozen weights" in rt["compile"]["reason"]
    assert rt["compile"]["seconds"] > 0
    pd.testing.assert_frame_equal(_probs(comp), _probs(eager), atol=1e-4, rtol=1e-4)


def test_compile_is_ignored_when_openvino_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "ov_precision_hint", lambda: "f32")
    cfg = setup(tmp_path, ["infer.runtime=openvino", "infer.compile=true"])
    infer.run(cfg)
    (rt,) = _sidecar(cfg)["runtime"].values()
    assert rt["runtime"] == "openvino" and rt["compile"]["compiled"] is False
    assert "ignored" in rt["compile"]["reason"]


def test_choose_checks_openvino_asked_for_or_proposed() -> None:
    cpu = torch.device("cpu")
    p = np.random.default_rng(0).dirichlet(np.ones(5), 200).astype(np.float32)
    flipped = p.copy()
    flipped[:2] = flipped[:2, ::-1]  # 1% of the argmaxes change: below the 99.5% bar
    fake = [torch.nn.Identity()]
    convert = lambda hint: fake  # noqa: E731
    close = lambda dtype, models=None: p if models is None else p + 1e-3  # noqa: E731
    wrong = lambda dtype, models=None: p if models is None else flipped  # noqa: E731
    for requested in ("auto", "openvino"):
        kept, models = runtime.choose(requested, cpu, convert, close)
        assert kept.name == "openvino" and models is fake and kept.check["argmax_agreement"] == 1.0
        dropped, models = runtime.choose(requested, cpu, convert, wrong)
        assert dropped.name == "torch" and models is None and "disagrees with fp32" in dropped.reason
    unchecked, models = runtime.choose("openvino", cpu, convert, None)
    assert unchecked.name == "openvino" and "not checked" in unchecked.reason and models is fake
    auto, models = runtime.choose("auto", cpu, convert, None)
    assert auto.name == "torch" and "no validation images" in auto.reason and models is None
    assert runtime.choose("torch", cpu, convert, close)[0].reason == "infer.runtime=torch"


class _Converted(torch.nn.Module):
    """What `runtime.to_openvino` returns, stood in by the torch model itself, counting its calls: the wiring is
    under test here, not OpenVINO (whose own tests are above; in the full suite a further real conversion
    crashed the process afterwards, once its native threads had run beside everything else)."""

    calls = 0

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Converted.calls += 1
        return self.inner(x)


def test_oof_tta_runs_the_models_in_the_runtime_infer_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """oof_tta/<view>.csv stands in for oof.csv in ensembles (same code path as the test predictions), so it is
    predicted in the form infer would use: here the converted models, checked on the run's own validation rows."""
    from kpipe.io import read_csv_ids
    from kpipe.stages import oof_tta

    views = "infer.tta=[identity,hflip]"
    ov = setup(tmp_path / "ov", ["infer.runtime=openvino", views])
    ref = setup(tmp_path / "ref", ["infer.runtime=torch", "infer.precision=fp32", views])
    monkeypatch.setattr(runtime, "ov_precision_hint", lambda: "f32")
    monkeypatch.setattr(runtime, "to_openvino", lambda model, x, hint: _Converted(model).eval())
    oof_tta.run(ov)
    assert "runtime openvino, f32: agrees with torch fp32" in " ".join(capsys.readouterr().out.split())
    checked_and_predicted = _Converted.calls
    oof_tta.run(ref)
    assert checked_and_predicted > 2 and _Converted.calls == checked_and_predicted  # only the OpenVINO run's
    for view in ("identity", "hflip"):
        got = read_csv_ids(paths.run_dir(ov).root / "oof_tta" / f"{view}.csv")
        want = read_csv_ids(paths.run_dir(ref).root / "oof_tta" / f"{view}.csv")
        cols = [c for c in want.columns if c.startswith("p_")]
        assert got["id"].tolist() == want["id"].tolist()
        np.testing.assert_allclose(got[cols].to_numpy(float), want[cols].to_numpy(float), atol=1e-6)
