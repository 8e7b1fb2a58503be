"""Every stage on a hostile competition (tests/hostile.py), in both ingest layouts, through the CLI.

audit -> folds -> train -> relabel --accept-above --apply -> folds -> infer -> validate-submission
must all complete. Unusable train images are left out and listed once, with the reason, in
folds/<comp>.excluded.csv; every test id gets a row (the class prior where unreadable) and a
warning; ids keep their exact bytes (spaces, NFC and NFD unicode, leading zeros); label
whitespace is one warning and the stripped label everywhere.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hostile
from kpipe import cli
from kpipe.config import Config, load_config
from kpipe.data import image, ingest
from kpipe.io import read_csv_ids
from kpipe.stages import infer

LAYOUTS = ["csv", "folders"]
SUB_NAME = "hostile_exp"  # infer.name defaults to the experiment name: the exp file's stem


@dataclass
class Ran:
    """A hostile competition and what each stage printed and returned."""

    h: hostile.Hostile
    rc: dict[str, int] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)  # whitespace removed: rich wraps anywhere
    first_folds: pd.DataFrame | None = None  # folds.csv before relabel --apply changed labels
    accept_above: float = 1.0

    def cfg(self) -> Config:
        return load_config(self.h.exp, self.h.comp, self.h.overrides())


def _cli(ran: Ran, key: str, argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        ran.rc[key] = cli.main(argv)  # an exception here is the traceback a user would see
    ran.text[key] = "".join((out.getvalue() + err.getvalue()).split())


def squash(s: str) -> str:
    return "".join(s.split())


def _ingest(root: Path, layout: str) -> Ran:
    ran = Ran(hostile.build(root, layout))
    _cli(ran, "audit", ran.h.argv("audit"))
    _cli(ran, "folds", ran.h.argv("folds"))
    ran.first_folds = read_csv_ids(ran.h.root / "folds" / f"{hostile.COMP}.csv")
    return ran


@pytest.fixture(scope="module", params=LAYOUTS)
def ingested(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """audit + folds only (seconds)."""
    return _ingest(tmp_path_factory.mktemp(f"ingest_{request.param}"), request.param)


@pytest.fixture(scope="module", params=LAYOUTS)
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """Every stage, in order (a tiny 1-epoch train per layout)."""
    ran = _ingest(tmp_path_factory.mktemp(f"all_{request.param}"), request.param)
    h = ran.h
    _cli(ran, "train", h.argv("train"))
    _cli(ran, "relabel", h.argv("relabel"))
    # Accept the two strongest suspects only: a 1-epoch model's suspects are noise, and accepting them
    # all could empty a class (which `kpipe folds` then refuses, rightly).
    scores = sorted(read_csv_ids(h.data_dir / "relabels.csv")["score"].astype(float), reverse=True)
    ran.accept_above = scores[1] if len(scores) > 1 else 1.0
    _cli(ran, "apply", h.argv("relabel", "--accept-above", str(ran.accept_above), "--apply"))
    _cli(ran, "refolds", h.argv("folds"))
    _cli(ran, "infer", h.argv("infer"))
    sub = h.root / "submissions" / f"{SUB_NAME}.csv"
    _cli(ran, "validate", h.argv("validate-submission", pre=(str(sub),)))
    return ran


# ------------------------------------------------------------------ audit and folds (fast)


def test_audit_and_folds_complete(ingested: Ran) -> None:
    assert ingested.rc == {"audit": 0, "folds": 0}, ingested.text


def test_audit_lists_every_unreadable_file_in_train_and_test(ingested: Ran) -> None:
    h = ingested.h
    bad = read_csv_ids(h.data_dir / "audit" / "unreadable.csv")
    train, test = bad[bad["split"] == "train"], bad[bad["split"] == "test"]
    assert set(train["id"]) == set(h.bad_train)
    assert set(test["id"]) == set(h.bad_test)
    for frame, expected in ((train, h.bad_train), (test, h.bad_test)):
        for i, reason in zip(frame["id"], frame["reason"], strict=True):
            assert any(w in reason.lower() for w in expected[i]), (i, reason)
    images = read_csv_ids(h.data_dir / "audit" / "images.csv").set_index(["split", "id"])
    exif = images.loc[("test", "exif 1")]
    assert (exif["width"], exif["height"]) == ("20", "32")  # as displayed, after EXIF orientation 6
    modes = set(images.loc[images["reason"] == "", "mode"])
    assert {"RGBA", "CMYK"} <= modes


def test_one_report_lists_every_left_out_train_row_with_its_reason(ingested: Ran) -> None:
    h = ingested.h
    excluded = read_csv_ids(h.root / "folds" / f"{hostile.COMP}.excluded.csv")
    assert excluded["id"].is_unique
    assert dict(zip(excluded["id"], excluded["reason"], strict=True)).keys() == h.bad_train.keys()
    for i, reason in zip(excluded["id"], excluded["reason"], strict=True):
        assert any(w in reason.lower() for w in h.bad_train[i]), (i, reason)
    assert set(excluded["label"]) <= set(hostile.CLASSES)  # ' dog ' of the missing row, stripped
    text = ingested.text["folds"]
    for i in h.bad_train:
        assert squash(i) in text, i
    assert squash(f"{len(h.bad_train)} rows left out") in text


def test_folds_keep_exactly_the_good_rows_with_their_exact_ids(ingested: Ran) -> None:
    h, folds = ingested.h, ingested.first_folds
    assert folds is not None and folds["id"].is_unique
    assert set(folds["id"]) == set(h.good_train)  # byte for byte: NFD and NFC 'café' stay apart
    ids = set(folds["id"])
    assert any(hostile.NFD_ID in i for i in ids) and any("café 01" in i for i in ids)
    assert any(i.endswith("end space ") or "end space .png" in i for i in ids)
    assert set(folds["fold"]) == {"0", "1"}
    assert (
        json.loads((h.root / "folds" / f"{hostile.COMP}.classes.json").read_text())["classes"]
        == hostile.CLASSES
    )


def test_label_whitespace_is_one_warning_and_the_stripped_label_everywhere(ingested: Ran) -> None:
    h, folds = ingested.h, ingested.first_folds
    assert folds is not None
    assert dict(zip(folds["id"], folds["label"], strict=True)) == h.good_train
    text = ingested.text["folds"]
    assert text.count("labelwhitespace") == 1, text
    for i in h.ws_train[:5]:  # the warning previews five
        assert squash(i) in text
    images = read_csv_ids(h.data_dir / "audit" / "images.csv")
    train = images[images["split"] == "train"]
    assert set(train["label"]) == set(hostile.CLASSES)
    ing = ingest.load_train(ingested.cfg())
    ws = [p for p in ing.problems if p.kind == "label whitespace"]
    assert len(ws) == 1 and ws[0].severity == "warning"


def test_odd_but_readable_images_decode(ingested: Ran) -> None:
    test = ingested.h.data_dir / "test"
    for name in (
        "rgba 1.png",
        "cmyk 1.jpg",
        "deep16 1.png",
        "exif 1.jpg",
        "猫 2.png",
        f"{hostile.NFD_ID}.png",
    ):
        rgb = image.read_rgb(test / name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
    assert image.read_rgb(test / "exif 1.jpg").shape == (32, 20, 3)


def test_csvs_saved_with_bom_and_crlf_ingest_the_same(tmp_path: Path) -> None:
    """Excel writes a UTF-8 byte-order mark and CRLF line ends; ids and labels must not change."""
    h = hostile.build(tmp_path, "csv")
    cfg = load_config(h.exp, h.comp, h.overrides())
    before_train, before_test = ingest.load_train(cfg).df, ingest.load_test(cfg)
    for name in ("train.csv", "sample_submission.csv"):
        raw = (h.data_dir / name).read_bytes()
        (h.data_dir / name).write_bytes(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    after_train, after_test = ingest.load_train(cfg).df, ingest.load_test(cfg)
    pd.testing.assert_frame_equal(after_train, before_train)
    pd.testing.assert_frame_equal(after_test, before_test)
    assert list(ingest.read_sample_submission(cfg).columns) == ["id", "label"]


def test_train_before_audit_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without the audit, folds keep the undecodable files; training must stop with a message, not a trace."""
    h = hostile.build(tmp_path, "csv")
    assert cli.main(h.argv("folds")) == 0
    capsys.readouterr()
    assert cli.main(h.argv("train")) == 2
    err = squash(capsys.readouterr().err)
    assert "cannotreadimage" in err and "Traceback" not in err


@pytest.mark.slow
def test_train_before_audit_with_loader_workers_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = hostile.build(tmp_path, "csv")
    assert cli.main(h.argv("folds")) == 0
    assert cli.main(h.argv("train", "data.num_workers=1")) == 2


# ------------------------------------------------------------------ every stage (slow)


@pytest.mark.slow
def test_every_stage_completes(pipeline: Ran) -> None:
    assert pipeline.rc == {
        "audit": 0,
        "folds": 0,
        "train": 0,
        "relabel": 0,
        "apply": 0,
        "refolds": 0,
        "infer": 0,
        "validate": 0,
    }, pipeline.text


@pytest.mark.slow
def test_oof_covers_the_good_rows_with_stripped_labels(pipeline: Ran) -> None:
    h = pipeline.h
    oof = read_csv_ids(h.root / "runs" / SUB_NAME / "oof.csv")
    assert dict(zip(oof["id"], oof["label"], strict=True)) == h.good_train


@pytest.mark.slow
def test_relabel_accepts_above_the_threshold_and_folds_apply_it(pipeline: Ran) -> None:
    h = pipeline.h
    rel = read_csv_ids(h.data_dir / "relabels.csv")
    assert set(rel["id"]) <= set(h.good_train)
    assert set(rel["given"]) | set(rel["suggested"]) <= set(hostile.CLASSES)
    score = rel["score"].astype(float)
    assert (rel.loc[score >= pipeline.accept_above, "decision"] == "accept").all()
    accepted = rel[rel["decision"] == "accept"]
    assert len(accepted) == (score >= pipeline.accept_above).sum() >= min(len(rel), 2)
    now = read_csv_ids(h.root / "folds" / f"{hostile.COMP}.csv").set_index("id")["label"]
    assert set(now.index) == set(h.good_train)  # relabelled, none lost
    assert dict(zip(accepted["id"], now.loc[accepted["id"]], strict=True)) == dict(
        zip(accepted["id"], accepted["suggested"], strict=True)
    )


@pytest.mark.slow
def test_submission_ids_are_the_sample_ids_byte_for_byte(pipeline: Ran) -> None:
    h = pipeline.h

    def first_column(path: Path) -> list[str]:
        with open(path, encoding="utf-8", newline="") as fh:
            return [row[0] for row in csv.reader(fh)]

    sub_path = h.root / "submissions" / f"{SUB_NAME}.csv"
    assert first_column(sub_path) == first_column(h.data_dir / "sample_submission.csv")
    raw = sub_path.read_bytes()
    assert hostile.NFD_ID.encode() in raw and b"end space ," in raw and b"\n007," in raw
    sub = read_csv_ids(sub_path)
    assert set(sub["label"]) <= set(hostile.CLASSES)  # the sample's 'cat ' is never copied
    assert "OK" in pipeline.text["validate"]


@pytest.mark.slow
def test_unreadable_test_images_get_the_prior_and_a_warning(pipeline: Ran) -> None:
    h = pipeline.h
    pred = h.root / "predictions" / SUB_NAME
    unreadable = read_csv_ids(pred / "unreadable.csv")
    assert set(unreadable["id"]) == set(h.bad_test)
    text = pipeline.text["infer"]
    assert squash(f"{len(h.bad_test)} test images could not be read") in text
    for i in h.bad_test:
        assert squash(i) in text
    probs = read_csv_ids(pred / "probs.csv").set_index("id").astype(float)
    assert list(probs.index) == h.test_ids
    prior = infer.class_prior(
        read_csv_ids(h.root / "folds" / f"{hostile.COMP}.csv")["label"].tolist(), hostile.CLASSES
    )
    bad = list(h.bad_test)
    np.testing.assert_allclose(probs.loc[bad].to_numpy(), np.tile(prior, (len(bad), 1)), atol=1e-6)
    readable = [i for i in h.test_ids if i not in h.bad_test]
    assert not np.allclose(probs.loc[readable].to_numpy(), prior, atol=1e-6)
