"""Resume is exact, and a non-finite loss stops the fold (issue 16, item 6).

A run stopped after a few optimiser steps (a StopRequested, as SIGINT/SIGTERM set it) and resumed
ends with the same weights, bit for bit on CPU, as one never stopped: torch, numpy and Python RNGs,
the sampler's order and every sample's augmentation (AugSeeds) carry over. With 0 and 2 workers.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config, write_competition
from kpipe.errors import Interrupted, KpipeError
from kpipe.nn import engine
from kpipe.stages import folds, train

# medium: random crops, flips, affine and colour jitter, so a replayed augmentation stream shows.
OVERRIDES = ["data.aug=medium", "train.epochs=2", "train.folds=[0]", "train.mixup_alpha=0.2"]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "fold0" / "last.pt", map_location="cpu", weights_only=True)["model"]


def _stop_after(monkeypatch: pytest.MonkeyPatch, n_steps: int) -> None:
    """The n-th optimiser step sets the stop request, as the SIGTERM handler would."""
    calls = {"n": 0}
    real = engine._optimizer_step

    def step(st: engine.FoldState, clip: float | None) -> None:
        real(st, clip)
        calls["n"] += 1
        if calls["n"] == n_steps:
            engine.StopRequested.signum = signal.SIGTERM

    monkeypatch.setattr(engine, "_optimizer_step", step)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_at", [2, 5])  # mid epoch 1; mid epoch 2 (epoch 1 has 3 steps)
def test_stopped_and_resumed_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, stop_at: int
) -> None:
    comp = write_competition(tmp_path, n_per_class=10)
    base = [*OVERRIDES, f"data.num_workers={workers}"]
    whole = tiny_config(tmp_path, comp, [*base, "name=whole"])
    folds.run(whole)
    train.run(whole)

    cut = tiny_config(tmp_path, comp, [*base, "name=cut"])
    with monkeypatch.context() as m:
        _stop_after(m, stop_at)
        with pytest.raises(Interrupted):
            train.run(cut)
    stopped = torch.load(
        tmp_path / "runs" / "cut" / "fold0" / "last.pt", map_location="cpu", weights_only=True
    )
    assert not stopped["finished"] and stopped["step_in_epoch"] > 0  # really stopped mid-epoch
    train.run(cut, resume=True)

    a, b = _final_weights(tmp_path / "runs" / "whole"), _final_weights(tmp_path / "runs" / "cut")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ
    ma, mb = (
        pd.read_csv(tmp_path / "runs" / r / "fold0" / "metrics.csv").drop(columns=["seconds", "images_per_s"])
        for r in ("whole", "cut")
    )  # wall-clock columns differ
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)


class _NanAfter(torch.nn.Module):
    """Cross-entropy for the first `good` calls, then NaN."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good, self.calls = good, 0
        self.ce = torch.nn.CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.ce(logits, target)
        return loss * float("nan") if self.calls > self.good else loss


def test_nan_loss_stops_the_fold_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(
        tmp_path, write_competition(tmp_path, n_per_class=10), ["train.epochs=3", "train.folds=[0]"]
    )
    folds.run(cfg)
    monkeypatch.setattr(
        train, "_criterion_and_mixup", lambda cfg, n: (_NanAfter(good=4), None)
    )  # epoch 2, step 2
    with pytest.raises(KpipeError) as e:
        train.run(cfg)
    msg = str(e.value)
    assert "fold 0" in msg and "epoch 2, step 2" in msg and "NaN" in msg, msg
    last = torch.load(
        tmp_path / "runs" / cfg.name / "fold0" / "last.pt", map_location="cpu", weights_only=True
    )
    assert last["epoch"] == 1 and last["step_in_epoch"] == 0  # epoch 1's end, nothing after
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    best = torch.load(
        tmp_path / "runs" / cfg.name / "fold0" / "best.pt", map_location="cpu", weights_only=True
    )
    assert np.isfinite(best["score"])


def test_a_worker_killed_by_the_stop_is_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop signal that also reaches a DataLoader worker (Slurm signals every process of a job) ends
    in the usual save-and-resume path, not in torch's "DataLoader worker ... killed" RuntimeError."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = type("NoSchedule", (), {"after_step": lambda self: None})()
    st = engine.FoldState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False))
    step = engine.Step(engine.Precision(torch.device("cpu")), torch.nn.CrossEntropyLoss(), None, 3)

    def batches(stop: bool):
        yield torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool)
        if stop:
            engine.StopRequested.signum = signal.SIGTERM
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")

    monkeypatch.setattr(engine.StopRequested, "signum", None)
    with pytest.raises(Interrupted):
        engine.train_epoch(st, batches(stop=True), step, lambda n, loss: None)
    assert st.step_in_epoch == 1 and st.epoch_seen == 2  # what last.pt will hold
    monkeypatch.setattr(engine.StopRequested, "signum", None)
    with pytest.raises(RuntimeError, match="killed by signal"):  # no stop asked: a real crash stays one
        engine.train_epoch(st, batches(stop=False), step, lambda n, loss: None)
