"""`kpipe runs`: the table of every run, from hand-written run folders (one half-finished)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kpipe import paths
from kpipe.errors import KpipeError
from kpipe.eval import runs_table
from kpipe.kaggle import ledger

BASE = {
    "name": "x",
    "competition": {"name": "tiny", "metric": "accuracy"},
    "model": {"name": "resnet18", "pretrained": True},
    "data": {"img_size": 64, "num_workers": 2},
    "train": {"epochs": 2, "optimizer": "adamw", "folds": None},
    "folds": {"n_folds": 2},
    "paths": {"runs_dir": "runs"},
}
CLASSES = ["a", "b"]


def write_run(
    runs: Path,
    name: str,
    changes: dict,
    folds_done: list[int],
    cv: dict | None,
    facts: dict | None = None,
    tta: tuple[str, ...] = (),
) -> Path:
    """A run folder as `kpipe train` leaves it: config.yaml, fold<k>/metrics.csv + oof.csv, cv.json."""
    cfg = json.loads(json.dumps(BASE))
    cfg["name"] = name
    for key, value in changes.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    root = runs / name
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    for k in folds_done:
        fold = root / f"fold{k}"
        fold.mkdir()
        pd.DataFrame(
            {
                "epoch": [1, 2],
                "val_score": [0.5, 0.6],
                "val_loss": [1.0, 0.9],
                "seconds": [10.0, 30.0],
                "images_per_s": [100.0, 200.0],
            }
        ).to_csv(fold / "metrics.csv", index=False)
        pd.DataFrame(
            {"id": [f"{k}a", f"{k}b"], "fold": k, "label": CLASSES, "p_a": [0.9, 0.2], "p_b": [0.1, 0.8]}
        ).to_csv(fold / "oof.csv", index=False)
    if cv is not None:
        (root / "cv.json").write_text(json.dumps(cv))
        good = name == "r18"  # r18 gets every row right; the others miss one class
        pd.DataFrame(
            {
                "id": ["0a", "0b", "1a", "1b"],
                "fold": [0, 0, 1, 1],
                "label": CLASSES * 2,
                "p_a": [0.9, 0.2 if good else 0.6] * 2,
                "p_b": [0.1, 0.8 if good else 0.4] * 2,
            }
        ).to_csv(root / "oof.csv", index=False)
    if facts is not None:
        (root / "run.json").write_text(json.dumps(facts))
    for view in tta:
        (root / "oof_tta").mkdir(exist_ok=True)
        (root / "oof_tta" / f"{view}.csv").write_text("id,fold,label,p_a,p_b\n")
    return root


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    write_run(
        runs,
        "r18",
        {},
        [0, 1],
        {"metric": "accuracy", "cv": 0.8, "per_fold": {"0": 0.7, "1": 0.9}, "complete": True},
        facts={
            "params_total": 11_000_000,
            "params_trainable": 5_000_000,
            "fold_wall_s": {"0": 50.0, "1": 70.0},
        },
        tta=("hflip", "identity"),
    )
    write_run(
        runs,
        "r34_sgd",
        {"model.name": "resnet34", "train.optimizer": "sgd", "data.num_workers": 8},
        [0, 1],
        {"metric": "accuracy", "cv": 0.85, "per_fold": {"0": 0.85, "1": 0.85}, "complete": True},
    )
    write_run(runs, "half", {"model.name": "resnet34"}, [0], None)  # killed during fold 1
    (runs / "ensembles").mkdir()
    return runs


def test_differing_keys_only_the_keys_that_differ() -> None:
    configs = {
        "a": {
            "model.name": "r18",
            "train.lr": 0.1,
            "name": "a",
            "paths.runs_dir": "x",
            "train.folds": [0, 1],
        },
        "b": {
            "model.name": "r34",
            "train.lr": 0.1,
            "name": "b",
            "paths.runs_dir": "y",
            "train.folds": [0, 1],
        },
        "c": {"model.name": "r18", "train.lr": 0.1, "name": "c", "train.folds": [0], "model.extra": 1},
    }
    assert runs_table.differing_keys(configs) == ["model.extra", "model.name", "train.folds"]
    assert runs_table.differing_keys({"a": configs["a"]}) == []


def test_table_lists_every_run_with_its_numbers(runs: Path, tmp_path: Path) -> None:
    sub = tmp_path / "submissions"
    ledger.append(
        paths.ledger_csv_in(sub),
        [
            {
                "file": "s.csv",
                "runs": f"{runs / 'r18'};{runs / 'r34_sgd'}",
                "public_score": "0.81",
                "private_score": "0.79",
                "status": "complete",
            }
        ],
    )
    records = [runs_table.load_run(r) for r in paths.run_folders(runs)]
    assert [r.name for r in records] == ["half", "r18", "r34_sgd"]  # ensembles/ is not a run
    df = runs_table.build_table(records, ledger.read(paths.ledger_csv_in(sub))).set_index("run")
    assert df.loc["r18", "status"] == "done"
    assert df.loc["half", "status"] == "unfinished 1/2 folds"
    assert np.isnan(df.loc["half", "cv"])
    assert (
        df.loc["r18", "differs"] == "model.name=resnet18  train.optimizer=adamw"
    )  # num_workers is not a difference
    assert df.loc["r34_sgd", "differs"] == "model.name=resnet34  train.optimizer=sgd"
    assert df.loc["r18", "cv"] == 0.8
    assert df.loc["r18", "fold_mean"] == pytest.approx(0.8)
    assert df.loc["r18", "fold_std"] == pytest.approx(0.1)
    assert df.loc["r18", "per_fold"] == "0:0.7000 1:0.9000"
    assert df.loc["r18", "wall_s"] == 120.0
    assert df.loc["r18", "params"] == 11_000_000
    # 10 s at 100 img/s + 30 s at 200 img/s per fold: 7000 images in 40 s
    assert df.loc["r18", "img_per_s"] == pytest.approx(175.0)
    assert df.loc["r18", "tta_views"] == "hflip,identity"
    assert (df.loc["r18", "public"], df.loc["r18", "private"]) == ("0.81", "0.79")
    assert df.loc["r34_sgd", "public"] == "0.81"
    assert df.loc["half", "public"] == ""
    assert df.loc["r34_sgd", "img_size"] == 64


def test_partial_cv_and_sorting(runs: Path) -> None:
    write_run(
        runs,
        "one_fold",
        {"train.folds": [0]},
        [0],
        {"metric": "accuracy", "cv": 0.95, "per_fold": {"0": 0.95}, "complete": False},
    )
    df = runs_table.build_table(
        [runs_table.load_run(r) for r in paths.run_folders(runs)], ledger.read(runs / "no")
    )
    assert df.set_index("run").loc["one_fold", "status"] == "partial 1/1 folds"  # CV over fold 0 only
    assert runs_table.sort_table(df, "cv")["run"].tolist() == ["one_fold", "r34_sgd", "r18", "half"]
    assert runs_table.sort_table(df, "cv", reverse=True)["run"].tolist()[:3] == ["r18", "r34_sgd", "one_fold"]
    with pytest.raises(KpipeError, match="--sort nope: no such column"):
        runs_table.sort_table(df, "nope")


def test_cli_runs_prints_and_writes_csv(
    runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kpipe import cli

    out = tmp_path / "t.csv"
    assert (
        cli.main(
            [
                "runs",
                "--runs-dir",
                str(runs),
                "--submissions-dir",
                str(tmp_path / "s"),
                "--sort",
                "cv",
                "--csv",
                str(out),
            ]
        )
        == 0
    )
    assert "runs under" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert table["run"].tolist() == ["r34_sgd", "r18", "half"]
    assert table["status"].tolist()[-1] == "unfinished 1/2 folds"
    assert cli.main(["runs", "--runs-dir", str(runs), "nope"]) == 2


def test_compare_writes_its_pictures(runs: Path) -> None:
    from kpipe.eval import compare as compare_lib
    from kpipe.stages import compare

    index = compare.run(runs, ["r34_sgd", "half"], baseline="r18", name="cmp")
    assert index == runs / "compare" / "cmp" / "index.html"
    for png in ("cv.png", "time.png", "curves.png", "f1_delta.png"):
        assert (index.parent / png).read_bytes()[:4] == b"\x89PNG"
    page = index.read_text()
    assert "train.optimizer" in page and "baseline: r18" in page and "data.num_workers" not in page
    assert [r.name for r in paths.run_folders(runs)] == ["half", "r18", "r34_sgd"]  # compare/ is not a run
    delta = compare_lib.f1_delta(
        compare.per_class_f1(paths.RunDir(runs / "r34_sgd")), compare.per_class_f1(paths.RunDir(runs / "r18"))
    )
    assert delta.index[0] in CLASSES and delta.iloc[0] < 0 and list(delta) == sorted(delta)
    with pytest.raises(KpipeError, match="not a run folder"):
        compare.run(runs, ["nope"])
