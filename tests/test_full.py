"""`kpipe train --full`: one model on every usable row, its epoch count from the CV run, usable by infer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError
from kpipe.eval import runs_table
from kpipe.nn import predict
from kpipe.stages import folds, infer, train


def test_best_epochs_follow_the_metric_direction() -> None:
    m = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_score": [0.5, 0.8, 0.8, 0.6]})
    assert train.best_epochs("accuracy", [m]) == [2]  # first of ties, as best.pt keeps it
    assert train.best_epochs("log_loss", [m]) == [1]


@pytest.mark.slow
def test_full_run_trains_on_every_usable_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    # 18 images in batches of 3: no partial last batch to drop, so every epoch sees every row
    cfg = tiny_config(tmp_path, comp, ["train.epochs=2", "train.folds=0", "data.batch_size=3"])
    folds.run(cfg)
    with pytest.raises(KpipeError, match="train.full_epochs"):
        train.run_full(cfg)  # no CV run yet to take the epochs from
    train.run(cfg)
    best = train.best_epochs("accuracy", [pd.read_csv(paths.run_dir(cfg).fold(0).metrics)])

    seen: list[list[int]] = []  # dataset rows of every training batch, per epoch
    real = train.train_epoch

    def spy(st: Any, loader: Any, step: Any, on_step: Any) -> tuple[float, int]:
        rows: list[int] = []
        seen.append(rows)

        def batches() -> Any:
            for batch in loader:
                rows.extend(batch[2].tolist())
                yield batch

        return real(st, batches(), step, on_step)

    monkeypatch.setattr(train, "train_epoch", spy)
    result = train.run_full(cfg)
    df, _ = load_fold_table(cfg)
    assert result["epochs"] == best[0] and len(seen) == best[0]
    for rows in seen:  # every usable id, of every fold, once in every epoch
        assert sorted(df["id"].to_numpy()[rows]) == sorted(df["id"]) and len(df) == 18

    run = paths.full_run_dir(cfg)
    saved = json.loads(run.cv.read_text())
    assert "cv" not in saved and saved["has_oof"] is False and saved["n_train"] == len(df)
    table = runs_table.build_table(
        [runs_table.load_run(run)], pd.DataFrame()
    )  # `kpipe runs` lists it, CV nan
    assert np.isnan(table["cv"].iloc[0])
    assert not run.oof.exists() and run.full.best.is_file()
    rm = predict.load_run(str(run.root), ["cat", "dog", "fox"], torch.device("cpu"))
    assert rm.folds == [paths.FULL_FOLD]

    monkeypatch.setattr(train, "train_epoch", real)
    alone = infer.run(cfg, runs=[str(run.root)])  # the full-data model alone ...
    both = infer.run(cfg, runs=[str(paths.run_dir(cfg).root), str(run.root)])  # ... and beside the folds
    assert alone["cv"] is None and both["cv"] is None  # no OOF for the full run: no CV claimed
    with pytest.raises(KpipeError, match="already has a full-data model"):
        train.run_full(cfg)
