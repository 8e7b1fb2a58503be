"""Submissions in sample_submission's shape, and the validator's problem kinds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kpipe.config import validate
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids, write_csv
from kpipe.kaggle import submission

# ids that a careless reader would change: leading zeros, unicode, spaces, a comma, a quote
IDS = ["007", "café 1", " spaced ", "a,b", 'q"t', "img_10"]


def _comp(**kw):
    return validate({"competition": {"name": "c", **kw}}).competition


def _probs(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


def _roundtrip(tmp_path: Path, df: pd.DataFrame) -> pd.DataFrame:
    write_csv(tmp_path / "sub.csv", df)
    return read_csv_ids(tmp_path / "sub.csv")


@pytest.mark.parametrize("classes", [["cat", "dog", "eel"], ["0", "1", "10"]], ids=["strings", "integers"])
def test_label_format_matches_sample(tmp_path: Path, classes: list[str]) -> None:
    sample = pd.DataFrame({"image_id": IDS, "target": [classes[0]] * len(IDS)})
    write_csv(tmp_path / "sample.csv", sample)
    sample = read_csv_ids(tmp_path / "sample.csv")
    probs = _probs(len(IDS), 3)
    order = [5, 3, 0, 4, 1, 2]  # predictions arrive in another order
    sub = submission.make_submission(probs[order], [IDS[i] for i in order], classes, sample, _comp())
    back = _roundtrip(tmp_path, sub)
    assert list(back.columns) == ["image_id", "target"]
    assert back["image_id"].tolist() == IDS  # sample's order, byte for byte
    assert back["target"].tolist() == [classes[k] for k in probs.argmax(1)]
    assert submission.validate_submission(back, sample, classes) == []


def test_proba_format_follows_sample_column_order(tmp_path: Path) -> None:
    classes = ["cat", "dog", "eel"]
    sample = pd.DataFrame({"id": IDS, "eel": "0", "cat": "0", "dog": "0"})
    probs = _probs(len(IDS), 3)
    sub = submission.make_submission(probs, IDS, classes, sample, _comp())
    back = _roundtrip(tmp_path, sub)
    assert list(back.columns) == ["id", "eel", "cat", "dog"]
    assert back["id"].tolist() == IDS
    np.testing.assert_allclose(back[["cat", "dog", "eel"]].astype(float).to_numpy(), probs)
    assert submission.validate_submission(back, sample, classes) == []


def test_id_column_not_first_and_explicit_format() -> None:
    sample = pd.DataFrame({"label": ["x"] * 2, "fname": ["b", "a"]})
    sub = submission.make_submission(
        np.eye(2), ["a", "b"], ["x", "y"], sample, _comp(sub_id_col="fname", submission_format="label")
    )
    assert sub.to_dict("list") == {"label": ["y", "x"], "fname": ["b", "a"]}


def test_format_errors_are_clear() -> None:
    sample = pd.DataFrame({"id": ["a"], "p1": ["0"], "p2": ["0"]})
    with pytest.raises(KpipeError, match="submission_format"):
        submission.make_submission(np.eye(3)[:1], ["a"], ["x", "y", "z"], sample, _comp())
    with pytest.raises(KpipeError, match="'proba'"):
        submission.detect_format(sample, ["x", "y"], "proba")
    with pytest.raises(KpipeError, match="not predicted.*'b'"):
        submission.make_submission(
            np.eye(2)[:1], ["a"], ["x", "y"], pd.DataFrame({"id": ["a", "b"], "t": ["x", "x"]}), _comp()
        )
    with pytest.raises(KpipeError, match="differ only by spaces"):
        submission.make_submission(
            np.eye(2)[:1], ["a "], ["x", "y"], pd.DataFrame({"id": ["a"], "t": ["x"]}), _comp()
        )


CLASSES = ["cat", "dog"]
LABEL_SAMPLE = pd.DataFrame({"id": ["1", "2", "3"], "label": ["cat"] * 3})
PROBA_SAMPLE = pd.DataFrame({"id": ["1", "2", "3"], "cat": ["0"] * 3, "dog": ["0"] * 3})
GOOD_LABEL = {"id": ["1", "2", "3"], "label": ["cat", "dog", "cat"]}
GOOD_PROBA = {"id": ["1", "2", "3"], "cat": ["0.5", "1", "0.25"], "dog": ["0.5", "0", "0.75"]}

CASES = {
    # kind: (sample, submission columns, ids the problem should name)
    "columns": (LABEL_SAMPLE, {"id": GOOD_LABEL["id"], "Label": GOOD_LABEL["label"]}, ()),
    "row_count": (LABEL_SAMPLE, {"id": ["1", "2"], "label": ["cat", "dog"]}, ()),
    "missing_ids": (LABEL_SAMPLE, {"id": ["1", "2"], "label": ["cat", "dog"]}, ("3",)),
    "extra_ids": (LABEL_SAMPLE, {"id": ["1", "2", "3", "4"], "label": ["cat"] * 4}, ("4",)),
    "duplicate_ids": (LABEL_SAMPLE, {"id": ["1", "2", "3", "3"], "label": ["cat"] * 4}, ("3",)),
    "id_order": (LABEL_SAMPLE, {"id": ["2", "1", "3"], "label": ["cat"] * 3}, ("2",)),
    "unknown_labels": (LABEL_SAMPLE, {"id": GOOD_LABEL["id"], "label": ["cat", "Dog", "cat"]}, ("2",)),
    "empty_values": (LABEL_SAMPLE, {"id": GOOD_LABEL["id"], "label": ["cat", "", "cat"]}, ("2",)),
    "non_numeric": (PROBA_SAMPLE, {**GOOD_PROBA, "dog": ["0.5", "zero", "0.75"]}, ("2",)),
    "proba_range": (
        PROBA_SAMPLE,
        {**GOOD_PROBA, "cat": ["0.5", "1", "-0.25"], "dog": ["0.5", "0", "1.25"]},
        ("3",),
    ),
    "proba_sum": (PROBA_SAMPLE, {**GOOD_PROBA, "dog": ["0.5", "0", "0.7"]}, ("3",)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_validate_catches_each_problem(kind: str) -> None:
    sample, cols, ids = CASES[kind]
    problems = submission.validate_submission(pd.DataFrame(cols), sample, CLASSES)
    found = {p.kind: p for p in problems}
    assert kind in found, problems
    assert found[kind].ids == ids
    assert found[kind].hint
    if kind == "unknown_labels":
        assert "differ only by spaces, case" in found[kind].hint


@pytest.mark.parametrize("sample, good", [(LABEL_SAMPLE, GOOD_LABEL), (PROBA_SAMPLE, GOOD_PROBA)])
def test_validate_accepts_good(sample: pd.DataFrame, good: dict) -> None:
    assert submission.validate_submission(pd.DataFrame(good), sample, CLASSES) == []


def _files(tmp_path: Path, sub_text: str) -> tuple[Path, object]:
    data = tmp_path / "data" / "c"
    data.mkdir(parents=True)
    (data / "sample_submission.csv").write_text("id,label\n1,cat\n2,cat\n", encoding="utf-8")
    (tmp_path / "folds").mkdir()
    (tmp_path / "folds" / "c.classes.json").write_text(json.dumps({"classes": CLASSES}), encoding="utf-8")
    (tmp_path / "sub.csv").write_bytes(sub_text.encode("utf-8"))
    cfg = validate(
        {
            "competition": {"name": "c"},
            "paths": {"data_root": str(tmp_path / "data"), "folds_dir": str(tmp_path / "folds")},
        }
    )
    return tmp_path / "sub.csv", cfg


def test_validate_file_and_exit_codes(tmp_path: Path) -> None:
    path, cfg = _files(tmp_path, "id,label\n1,cat\n2,dog\n")
    assert submission.validate_file(path, cfg) == []
    assert submission.run_validate(cfg, path) == 0
    path.write_text("\ufeffid,label\n1,cat\n2,dog\n", encoding="utf-8")
    assert [(p.kind, p.severity) for p in submission.validate_file(path, cfg)] == [("bom", "warning")]
    assert submission.run_validate(cfg, path) == 0
    path.write_text("id,label\n1,cat\n2,bird\n", encoding="utf-8")
    assert submission.run_validate(cfg, path) == 1
    with pytest.raises(KpipeError, match="no such"):
        submission.validate_file(tmp_path / "missing.csv", cfg)
