"""Weight averaging (train.swa): BatchNorm re-estimated after averaging, and the fold keeps the best weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.nn.average import WeightAverage
from kpipe.nn.checkpoint import load
from kpipe.stages import folds, train


def _net() -> nn.Module:
    """Conv, BatchNorm, linear; the lazy layer materialised in eval mode, so BatchNorm keeps mean 0 / var 1."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net.eval()(torch.randn(2, 3, 8, 8))
    return net.train()


def test_averaging_then_update_bn_changes_the_eval_output() -> None:
    torch.manual_seed(0)
    model = _net()
    avg = WeightAverage(model, last=2, epochs=3)
    avg.end_epoch(model, 0)  # before the window: not averaged
    assert avg.n_averaged == 0
    for epoch in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        avg.end_epoch(model, epoch)
    assert avg.n_averaged == 2
    x = torch.randn(5, 3, 8, 8) * 3 + 2  # far from BatchNorm's initial mean 0 / var 1
    averaged = avg.averaged.module.eval()
    before = averaged(x).detach().clone()
    bn = averaged[1]
    assert torch.equal(bn.running_mean, torch.zeros(4))  # the copy's statistics: never trained
    out = avg.finish([x[:3], x[3:]])
    after = out(x).detach()
    assert not torch.allclose(before, after)  # BatchNorm statistics were re-estimated ...
    # ... from x: update_bn's cumulative average of the two batches' means
    means = [out[0](part).mean(dim=(0, 2, 3)) for part in (x[:3], x[3:])]
    torch.testing.assert_close(bn.running_mean, (means[0] + means[1]).detach() / 2, rtol=1e-4, atol=1e-5)


def test_averaged_state_survives_a_state_dict_round_trip() -> None:
    model = _net()
    a = WeightAverage(model, last=1, epochs=1)
    a.end_epoch(model, 0)
    b = WeightAverage(_net(), last=1, epochs=1)
    b.load_state_dict(a.state_dict())
    assert b.n_averaged == 1


@pytest.mark.slow
def test_fold_scores_raw_ema_swa_and_keeps_the_best(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(
        tmp_path,
        comp,
        ["train.epochs=2", "train.folds=0", "train.ema=true", "train.swa=true", "train.swa_epochs=2"],
    )
    folds.run(cfg)
    result = train.run(cfg)
    fdir = paths.run_dir(cfg).fold(0)
    chosen = json.loads(fdir.weights_json.read_text())
    assert set(chosen["val_scores"]) == {"ema", "raw", "swa"} and chosen["swa_averaged"] == 2
    best_score = max(chosen["val_scores"].values())
    assert chosen["val_scores"][chosen["chosen"]] == best_score
    best = load(fdir.best)
    assert best["weights"] == chosen["chosen"] and best["score"] == best_score
    assert result["weights"] == {0: chosen["chosen"]}
    assert load(fdir.last)["average"]["n_averaged"] == 2  # resumable: the average travels in last.pt
