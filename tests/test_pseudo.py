"""Pseudo-labels: `kpipe pseudo` selects confident test rows; training uses them in every fold, never in validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.data import pseudo as pseudo_lib
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError
from kpipe.stages import folds, pseudo, train

CLASSES = ["cat", "dog", "fox"]


def test_select_keeps_confident_rows_soft_or_hard() -> None:
    probs = np.array([[0.95, 0.03, 0.02], [0.5, 0.3, 0.2], [0.05, 0.05, 0.9]])
    soft = pseudo_lib.select(["a", "b", "c"], probs, CLASSES, 0.9, hard=False)
    assert soft["id"].tolist() == ["a", "c"] and soft["label"].tolist() == ["cat", "fox"]
    np.testing.assert_allclose(soft[["p_cat", "p_dog", "p_fox"]].to_numpy(), probs[[0, 2]])
    hard = pseudo_lib.select(["a", "b", "c"], probs, CLASSES, 0.9, hard=True)
    np.testing.assert_allclose(hard[["p_cat", "p_dog", "p_fox"]].to_numpy(), [[1, 0, 0], [0, 0, 1]])


def _predictions(tmp_path: Path) -> Path:
    """What `kpipe infer` writes: t000..t005, t001 unsure, t002 unreadable (it got the class prior)."""
    out = tmp_path / "predictions" / "teacher"
    out.mkdir(parents=True)
    p = np.tile([0.96, 0.02, 0.02], (6, 1))
    p[1] = [0.4, 0.3, 0.3]
    p[[3, 4]] = [0.02, 0.96, 0.02]
    df = pd.DataFrame({"id": [f"t{j:03d}" for j in range(6)]})
    df[[f"p_{c}" for c in CLASSES]] = p
    df.to_csv(out / "probs.csv", index=False)
    (out / "classes.json").write_text(json.dumps(CLASSES))
    pd.DataFrame({"id": ["t002"], "reason": ["not decodable"]}).to_csv(out / "unreadable.csv", index=False)
    return out


@pytest.mark.slow
def test_pseudo_rows_train_in_every_fold_and_never_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    cfg = tiny_config(tmp_path, comp)
    folds.run(cfg)
    info = pseudo.run(cfg, str(_predictions(tmp_path)), threshold=0.9)
    table = pd.read_csv(info["file"], dtype={"id": str})
    assert table["id"].tolist() == [
        "t000",
        "t003",
        "t004",
        "t005",
    ]  # unsure t001 and unreadable t002 left out

    cfg = tiny_config(tmp_path, comp, [f"data.pseudo={info['file']}", "data.pseudo_weight=0.5"])
    df, _ = load_fold_table(cfg)
    rows, targets = train.add_pseudo(cfg, df, CLASSES)
    pseudo_ids = set(table["id"])
    assert set(rows.loc[rows["fold"] == pseudo_lib.PSEUDO_FOLD, "id"]) == pseudo_ids
    np.testing.assert_allclose(
        targets[len(df) :], 0.5 * table[["p_cat", "p_dog", "p_fox"]].to_numpy(), rtol=1e-6
    )

    trained: list[set[str]] = []  # ids of every training batch, per epoch (one epoch per fold here)
    validated: list[set[str]] = []  # ids of every validation / OOF / weight-choice pass
    real_epoch, real_gather = train.train_epoch, train.gather_predictions
    ids = rows["id"].to_numpy()

    def spy_epoch(st: Any, loader: Any, step: Any, on_step: Any) -> tuple[float, int]:
        seen: set[str] = set()
        trained.append(seen)

        def batches() -> Any:
            for batch in loader:
                assert batch[1].dtype.is_floating_point and batch[1].shape[1] == 3  # probability targets
                seen.update(ids[batch[2].numpy()])
                yield batch

        return real_epoch(st, batches(), step, on_step)

    def spy_gather(model: Any, loader: Any, precision: Any, prepare: Any) -> tuple[np.ndarray, np.ndarray]:
        idx, probs = real_gather(model, loader, precision, prepare)
        validated.append(set(ids[idx]))
        return idx, probs

    monkeypatch.setattr(train, "train_epoch", spy_epoch)
    monkeypatch.setattr(train, "gather_predictions", spy_gather)
    result = train.run(cfg)
    assert len(trained) == 2 and validated
    for (
        seen
    ) in trained:  # pseudo rows in every fold's training batches (18 labelled / 2 folds + 4 pseudo = 13,
        assert pseudo_ids & seen  # one partial batch dropped, so at least 9 of 13 seen)
    for seen in validated:
        assert not seen & pseudo_ids and seen <= set(df["id"])
    assert result["n_oof"] == len(df) == 18 and result["complete"]  # CV on labelled rows only
    oof = pd.read_csv(paths.run_dir(cfg).oof, dtype={"id": str})
    assert not set(oof["id"]) & pseudo_ids
    used = json.loads(paths.run_dir(cfg).pseudo_json.read_text())
    assert (
        used["file"] == info["file"]
        and used["n_rows"] == 4
        and used["weight"] == 0.5
        and len(used["sha256"]) == 64
    )


def test_bad_pseudo_files_fail_clearly(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["nope"], "label": ["cat"], "p_cat": [1.0], "p_dog": [0.0], "p_fox": [0.0]}).to_csv(
        bad
    )
    cfg = tiny_config(tmp_path, comp, [f"data.pseudo={bad}"])
    folds.run(cfg)
    df, _ = load_fold_table(cfg)
    with pytest.raises(KpipeError, match="not test images"):
        train.add_pseudo(cfg, df, CLASSES)
    with pytest.raises(KpipeError, match="not found"):
        train.add_pseudo(tiny_config(tmp_path, comp, ["data.pseudo=missing.csv"]), df, CLASSES)
    with pytest.raises(KpipeError, match="mixup"):
        train.add_pseudo(
            tiny_config(tmp_path, comp, [f"data.pseudo={bad}", "train.mixup_alpha=0.2"]), df, CLASSES
        )
