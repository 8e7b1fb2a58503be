"""Ingest: both layouts, string and integer labels, and every ingest problem on a small fixture."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_config, write_competition
from kpipe.data import ingest
from kpipe.errors import KpipeError


def _kinds(ing: ingest.Ingest) -> dict[str, set[str]]:
    return {p.kind: set(p.ids) for p in ing.problems}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_csv_layout(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    ing = ingest.load_train(cfg)
    assert ing.classes == ["cat", "dog", "fox"] and len(ing.df) == 12 and not ing.problems
    assert all(Path(p).is_file() for p in ing.df["path"])


def test_folder_layout(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path, layout="folders"))
    ing = ingest.load_train(cfg)
    assert ing.classes == ["cat", "dog", "fox"] and len(ing.df) == 12
    assert set(ing.df["id"].str.split("/").str[0]) == {"cat", "dog", "fox"}


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path, labels=["2", "10", "1"]))
    assert ingest.load_train(cfg).classes == ["1", "2", "10"]


def test_ids_with_and_without_extension(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    csv = tmp_path / "data" / "tiny" / "train.csv"
    df = pd.read_csv(csv, dtype=str)
    df.loc[::2, "id"] = df.loc[::2, "id"] + ".png"
    df.to_csv(csv, index=False)
    ing = ingest.load_train(tiny_config(tmp_path, comp))
    assert len(ing.df) == 12 and not ing.problems


def test_every_ingest_problem_reported_and_raw_untouched(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, labels=["cat", "dog", "fox", "owl"], n_per_class=3)
    root = tmp_path / "data" / "tiny"
    csv = root / "train.csv"
    df = pd.read_csv(csv, dtype=str)
    (root / "train" / "owl_000.png").unlink()
    (root / "train" / "owl_001.png").unlink()
    (root / "train" / "owl_002.png").write_bytes(b"")
    extra = pd.DataFrame(
        {"id": ["ghost", "cat_000", "dog_000", "dog_001"], "label": ["cat", "cat", "fox", "dog"]}
    )
    df = pd.concat([df, extra], ignore_index=True)
    df.loc[df["id"] == "fox_000", "label"] = " fox "
    df.to_csv(csv, index=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    pd.concat([sample, pd.DataFrame({"id": ["nofile"], "label": ["cat"]})]).to_csv(
        root / "sample_submission.csv", index=False
    )
    before = _snapshot(root)
    cfg = tiny_config(tmp_path, comp)
    ing = ingest.load_train(cfg)
    kinds = _kinds(ing)
    assert kinds["missing files"] == {"ghost", "owl_000", "owl_001"}
    assert kinds["duplicate ids"] == {"cat_000", "dog_001"}
    assert kinds["duplicate ids with different labels"] == {"dog_000"}
    assert kinds["label whitespace"] == {"fox_000"}
    assert kinds["zero-byte files"] == {"owl_002"}
    assert kinds["empty classes"] == {"owl"}
    assert ing.df.loc[ing.df["id"] == "fox_000", "label"].item() == "fox"
    assert set(ing.excluded["id"]) == {"ghost", "owl_000", "owl_001", "owl_002", "dog_000"}
    assert not ing.df["id"].duplicated().any() and "owl" in ing.classes
    for p in ing.problems:  # each message: what, which rows, what to do
        assert p.ids and p.hint
    test = ingest.load_test(cfg)
    assert test["id"].tolist()[-1] == "nofile" and not test["found"].iloc[-1]
    assert [p.kind for p in ingest.check_test(test, cfg)] == ["test ids without an image"]
    assert _snapshot(root) == before


def test_wrong_column_and_missing_folder(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    with pytest.raises(KpipeError, match=r"no column 'breed'.*label_col"):
        ingest.load_train(tiny_config(tmp_path, comp, ["competition.label_col=breed"]))
    with pytest.raises(KpipeError, match="training image folder not found"):
        ingest.load_train(tiny_config(tmp_path, comp, ["competition.train_dir=imgs"]))


def test_folder_layout_empty_class_and_stray_files(tmp_path: Path) -> None:
    comp = write_competition(tmp_path, layout="folders")
    train = tmp_path / "data" / "tiny" / "train"
    (train / "zebra").mkdir()
    (train / "cat" / "notes.txt").write_text("hi")
    ing = ingest.load_train(tiny_config(tmp_path, comp))
    kinds = _kinds(ing)
    assert kinds["empty classes"] == {"zebra"} and kinds["not images"] == {"cat/notes.txt"}
    assert "zebra" in ing.classes


def test_test_order_follows_sample_submission(tmp_path: Path) -> None:
    comp = write_competition(tmp_path)
    root = tmp_path / "data" / "tiny"
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str).iloc[::-1]
    sample.to_csv(root / "sample_submission.csv", index=False)
    test = ingest.load_test(tiny_config(tmp_path, comp))
    assert test["id"].tolist() == sample["id"].tolist() and test["found"].all()
