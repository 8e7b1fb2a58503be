"""Distillation: fold k's student learns from the teacher's own fold-k model, never from a model that saw fold k."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe import paths
from kpipe.data.folds import load_fold_table
from kpipe.errors import KpipeError
from kpipe.nn import distill
from kpipe.stages import folds, train


def test_soften_and_mix() -> None:
    p = np.array([[0.7, 0.2, 0.1]])
    np.testing.assert_allclose(distill.soften(p, 1.0), p)
    flat = distill.soften(p, 4.0)
    assert flat[0, 0] < 0.7 and flat[0, 2] > 0.1 and flat.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(distill.mix(np.array([[1.0, 0, 0]]), p, 0.5), [[0.85, 0.1, 0.05]])


@pytest.mark.slow
def test_fold_k_student_uses_only_the_teachers_fold_k_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    comp = write_competition(tmp_path, n_per_class=6)
    teacher_cfg = tiny_config(tmp_path, comp, ["name=teacher"])
    folds.run(teacher_cfg)
    train.run(teacher_cfg)
    teacher = paths.run_dir(teacher_cfg)
    cfg = tiny_config(
        tmp_path,
        comp,
        [
            "name=student",
            f"train.teacher={teacher.root}",
            "train.distill_weight=0.7",
            "train.distill_temperature=2",
        ],
    )
    df, _ = load_fold_table(cfg)
    path_to_id = dict(zip(df["path"], df["id"], strict=True))

    used: dict[int, tuple[Path, set[str]]] = {}  # fold -> (teacher checkpoint, ids it was asked about)
    real_probs = distill.teacher_probs

    def spy_probs(run: str, k: int, files: list[str], *args: Any) -> tuple[np.ndarray, Path]:
        probs, ckpt = real_probs(run, k, files, *args)
        used[k] = (ckpt, {path_to_id[f] for f in files})
        return probs, ckpt

    trained: dict[int, set[str]] = {}
    soft_rows: list[bool] = []
    real_epoch = train.train_epoch

    def spy_epoch(st: Any, loader: Any, step: Any, on_step: Any) -> tuple[float, int]:
        seen: set[str] = set()
        trained[len(trained)] = seen

        def batches() -> Any:
            for batch in loader:
                seen.update(df["id"].to_numpy()[batch[2].numpy()])
                soft_rows.extend((batch[1].max(dim=1).values < 1.0).tolist())  # labels mixed with the teacher
                yield batch

        return real_epoch(st, batches(), step, on_step)

    monkeypatch.setattr(distill, "teacher_probs", spy_probs)
    monkeypatch.setattr(train, "train_epoch", spy_epoch)
    train.run(cfg)
    teacher_oof = pd.read_csv(teacher.oof, dtype={"id": str})
    for k in (0, 1):
        val_ids = set(df.loc[df["fold"] == k, "id"])
        ckpt, asked = used[k]
        assert ckpt == teacher.fold(k).best  # the teacher's own fold-k model ...
        assert set(teacher_oof.loc[teacher_oof["fold"] == k, "id"]) == val_ids  # ... which held fold k out
        assert not asked & val_ids and asked == set(
            df.loc[df["fold"] != k, "id"]
        )  # no soft target for fold k
        assert not trained[k] & val_ids
        rec = json.loads(paths.run_dir(cfg).fold(k).teacher_json.read_text())
        assert rec["checkpoint"] == str(teacher.fold(k).best) and rec["weight"] == 0.7
    assert soft_rows and all(soft_rows)


def test_teacher_on_other_folds_is_refused(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    teacher = tmp_path / "runs" / "t"
    teacher.mkdir(parents=True)
    (teacher / "folds.sha256").write_text("0" * 64 + "\n")
    cfg = tiny_config(tmp_path, comp, [f"train.teacher={teacher}"])
    folds.run(cfg)
    df, classes = load_fold_table(cfg)
    with pytest.raises(KpipeError, match="folds.sha256 differs"):
        train.distill_targets(cfg, 0, df, classes, None, None)
