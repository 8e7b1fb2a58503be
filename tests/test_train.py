"""Training end to end on a tiny competition: artefacts, resume, determinism, GoogLeNet path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.config import load_run_config
from kpipe.data import folds as folds_lib
from kpipe.errors import Interrupted, KpipeError
from kpipe.nn import engine, predict
from kpipe.stages import folds, train

pytestmark = pytest.mark.slow


def _setup(tmp_path: Path, overrides: list[str] = ()) -> object:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp, ["train.epochs=2", *overrides])
    folds.run(cfg)
    return cfg


def test_run_writes_every_artefact(tmp_path: Path) -> None:
    cfg = _setup(tmp_path)
    result = train.run(cfg)
    run = paths.run_dir(cfg).root
    for name in [
        "config.yaml",
        "oof.csv",
        "cv.json",
        "curves.png",
        "confusion.png",
        "per_class.csv",
        "per_class.png",
    ]:
        assert (run / name).is_file(), name
    oof = pd.read_csv(run / "oof.csv", dtype={"id": str})
    assert len(oof) == 18 and oof["id"].is_unique
    pcols = [c for c in oof.columns if c.startswith("p_")]
    assert pcols == ["p_cat", "p_dog", "p_fox"]
    assert np.allclose(oof[pcols].sum(axis=1), 1.0, atol=1e-5)
    for k in (0, 1):
        fdir = run / f"fold{k}"
        m = pd.read_csv(fdir / "metrics.csv")
        assert len(m) == 2 and {
            "train_loss",
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "lr",
            "seconds",
            "images_per_s",
        } <= set(m.columns)
        best = torch.load(fdir / "best.pt", weights_only=False)
        assert best["classes"] == ["cat", "dog", "fox"] and "model" in best
        assert set(oof.loc[oof["fold"] == k, "id"]) == set(
            pd.read_csv(paths.folds_csv(cfg), dtype=str).query(f"fold == '{k}'")["id"]
        )
    assert 0.0 <= result["cv"] <= 1.0 and result["complete"]


def test_refuses_to_overwrite_without_resume(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, ["train.epochs=1", "train.folds=0"])
    train.run(cfg)
    with pytest.raises(KpipeError, match="--resume"):
        train.run(cfg)
    train.run(cfg, resume=True)  # finished folds are skipped
    labels = pd.read_csv(paths.folds_csv(cfg), dtype=str)
    labels.loc[0, "label"] = "fox" if labels.loc[0, "label"] != "fox" else "cat"
    labels.to_csv(paths.folds_csv(cfg), index=False)
    with pytest.raises(KpipeError, match="changed since"):
        train.run(cfg, resume=True)


def test_resume_after_interrupt_finishes_all_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _setup(tmp_path, ["train.folds=0", "data.batch_size=2"])
    real_step = engine._optimizer_step
    calls = {"n": 0}

    def step_then_stop(
        st, clip
    ):  # Ctrl-C during the 5th optimiser step: 4 steps per epoch, so epoch 2, step 1
        real_step(st, clip)
        calls["n"] += 1
        if calls["n"] == 5:
            engine.StopRequested.signum = 2

    monkeypatch.setattr(engine, "_optimizer_step", step_then_stop)
    with pytest.raises(Interrupted) as e:
        train.run(cfg)
    assert e.value.signum == 2
    last = torch.load(paths.run_dir(cfg).root / "fold0" / "last.pt", weights_only=False)
    assert last["epoch"] == 1 and last["step_in_epoch"] == 1 and not last["finished"]
    monkeypatch.setattr(engine, "_optimizer_step", real_step)
    train.run(cfg, resume=True)
    m = pd.read_csv(paths.run_dir(cfg).root / "fold0" / "metrics.csv")
    assert m["epoch"].tolist() == [1, 2]
    assert torch.load(paths.run_dir(cfg).root / "fold0" / "last.pt", weights_only=False)["finished"]


def test_same_seed_same_cv(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, ["train.folds=0"])
    a = train.run(cfg)
    cfg_b = cfg.model_copy(update={"name": "again"})
    b = train.run(cfg_b)
    oof_a = pd.read_csv(paths.run_dir(cfg).root / "oof.csv")
    oof_b = pd.read_csv(paths.run_dir(cfg_b).root / "oof.csv")
    assert a["cv"] == b["cv"]
    pd.testing.assert_frame_equal(oof_a, oof_b)


def test_googlenet_goes_through_the_same_loop(tmp_path: Path) -> None:
    cfg = _setup(
        tmp_path, ["model.name=googlenet", "model.small_stem=true", "train.epochs=1", "train.folds=0"]
    )
    result = train.run(cfg)
    assert result["n_oof"] == 9


def test_baseline_cnn_with_resampling_and_an_aug_list(tmp_path: Path) -> None:
    cfg = _setup(
        tmp_path,
        [
            "model.name=simple_cnn",
            "model.init=kaiming",
            "model.kwargs={width: 8, hidden: 32}",
            "train.epochs=1",
            "train.folds=0",
            "data.sampling=oversample",
            "data.aug=hflip,rotate,color_jitter",
        ],
    )
    assert train.run(cfg)["n_oof"] == 9
    saved = load_run_config(paths.run_dir(cfg).root)
    assert saved.data.aug == ["hflip", "rotate", "color_jitter"] and saved.model.kwargs["width"] == 8


def test_schedules_optimisers_and_extras_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _setup(
        tmp_path,
        [
            "train.folds=0",
            "train.optimizer=nadam",
            "train.scheduler=plateau",
            "train.ema=true",
            "train.mixup_alpha=0.2",
            "train.label_smoothing=0.1",
            "train.accum_steps=2",
            "train.clip_grad=1.0",
            "data.balanced_sampling=true",
            "data.aug=heavy",
            "model.freeze_until=layer2",
            "model.unfreeze_epoch=1",
            "model.act=silu",
            "data.cache=true",
            "data.hflip=false",
        ],
    )
    seen: dict[str, object] = {}
    real_fit = train.fit

    def fit(fold: train.Fold, st: engine.FoldState) -> None:
        """Look at what build_fold made of each option, then fit as usual."""
        seen["frozen_before"] = not fold.model.conv1[0].weight.requires_grad  # stages before layer2 frozen
        seen["fold"], seen["st"] = fold, st
        real_fit(fold, st)
        seen["frozen_after"] = not fold.model.conv1[0].weight.requires_grad

    monkeypatch.setattr(train, "fit", fit)
    train.run(cfg)
    m = pd.read_csv(paths.run_dir(cfg).root / "fold0" / "metrics.csv")
    assert len(m) == 2
    fold, st = seen["fold"], seen["st"]
    assert isinstance(st.optimizer, torch.optim.NAdam)
    assert isinstance(st.scheduler.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert st.ema is not None
    assert fold.step.mixup is not None and fold.step.label_smoothing == 0.1
    assert fold.step.accum_steps == 2 and fold.step.clip_grad == 1.0
    assert fold.sampler.weights is not None  # balanced sampling
    dataset = fold.loader.dataset
    assert dataset.cache is not None and any(
        Path(cfg.data.cache_dir).rglob("*")
    )  # read from the decode-once cache
    ops = {type(t).__name__: t for t in dataset.transform.transforms}
    assert {"Affine", "ColorJitter", "CoarseDropout"} <= ops.keys()  # the heavy preset
    assert ops["HorizontalFlip"].p == 0.0  # data.hflip=false
    assert any(isinstance(mod, torch.nn.SiLU) for mod in fold.model.modules())
    assert seen["frozen_before"] and not seen["frozen_after"]  # frozen for epoch 1, unfrozen at epoch 2
    # accum_steps=2: one optimiser step per two batches (and one for a trailing odd batch), per epoch.
    # (The classifier's weights: the frozen stem was stepped in epoch 2 only.)
    state = st.optimizer.state_dict()["state"]
    assert int(state[max(state)]["step"]) == 2 * -(-len(fold.loader) // 2)


def test_batch_augmentation_trains_from_the_cache(tmp_path: Path) -> None:
    cfg = _setup(
        tmp_path,
        ["train.folds=0", "train.epochs=1", "data.cache=true", "data.batch_aug=true", "data.aug=medium"],
    )
    assert train.run(cfg)["n_oof"] == 9
    with pytest.raises(KpipeError, match="batch_aug=true needs data.cache=true"):
        train.run(
            cfg.model_copy(update={"name": "nocache", "data": cfg.data.model_copy(update={"cache": False})})
        )


def test_oof_comes_from_best_pt_not_the_last_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kpipe.data import transforms

    # Invert "better" so best.pt keeps epoch 1 while training goes on to epoch 3: best and last differ.
    monkeypatch.setattr(train.metrics, "higher_is_better", lambda metric: False)
    cfg = _setup(tmp_path, ["train.folds=0", "train.epochs=3", "train.lr=0.01"])
    train.run(cfg)
    fdir = paths.run_dir(cfg).root / "fold0"
    assert torch.load(fdir / "best.pt", weights_only=False)["epoch"] == 1
    oof = pd.read_csv(paths.run_dir(cfg).root / "oof.csv", dtype={"id": str}).sort_values("id")
    df, classes = folds_lib.load_fold_table(cfg)
    rows = df[df["id"].isin(oof["id"])].sort_values("id")
    rm = predict.load_run(str(paths.run_dir(cfg).root), classes, torch.device("cpu"))  # fold0/best.pt
    loader = predict.make_eval_loader(
        rows["path"].tolist(), rm.data_cfg, 4, 0, torch.device("cpu"), tolerant=False
    )
    prepare = transforms.Normalize(rm.data_cfg["mean"], rm.data_cfg["std"])
    best, _ = predict.predict_models(
        rm.models, loader, ["identity"], len(classes), torch.device("cpu"), None, False, prepare
    )
    got = oof[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(got, best[0, 0], atol=1e-5)
    rm.models[0].load_state_dict(torch.load(fdir / "last.pt", weights_only=False)["model"])
    last, _ = predict.predict_models(
        rm.models, loader, ["identity"], len(classes), torch.device("cpu"), None, False, prepare
    )
    assert not np.allclose(
        got, last[0, 0], atol=1e-3
    )  # the last weights would have given other probabilities


def test_mixup_on_an_odd_batch_gets_soft_targets() -> None:
    """timm's Mixup needs an even batch: an odd one used to reach the soft-target loss with integer labels."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    mix = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    step = engine.Step(engine.Precision(torch.device("cpu")), SoftTargetCrossEntropy(), None, 3, mix, 0.1)
    x, y = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    _, target = step.batch(x, y)
    assert target.shape == (5, 3) and target.is_floating_point()
    assert torch.allclose(target.sum(1), torch.ones(5))
    assert target[0, 0] == pytest.approx(
        1 - 0.1 + 0.1 / 3
    )  # the smoothed one-hot, as Mixup would give at lam=1
    step.criterion(torch.randn(5, 3), target)  # the loss takes it


@pytest.mark.slow
def test_training_with_mixup_and_an_odd_batch_size_runs(tmp_path: Path) -> None:
    cfg = _setup(tmp_path, ["train.folds=0", "data.batch_size=3", "train.mixup_alpha=0.2"])
    train.run(cfg)
    assert (paths.run_dir(cfg).fold(0).best).is_file()


def test_cuda_device_turns_cudnn_benchmark_and_tf32_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.cudnn_benchmark reaches torch's switches when the device is CUDA (faked here: no GPU in CI)."""
    from kpipe.nn import dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    try:
        for on in (True, False):
            assert dist.pick_device("auto", on).type == "cuda"
            assert torch.backends.cudnn.benchmark is on
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
        assert dist.pick_device("cpu", True).type == "cpu"
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = flags
