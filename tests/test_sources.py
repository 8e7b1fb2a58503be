"""Files computed from the data say from which data, and messages stay clear (issue 16, items 4 and 7).

The audit's tables and labels_clean.csv record a fingerprint of the training data (train CSV and
the image list with sizes); `kpipe folds` refuses them for other data, naming the command to re-run.
Fewer groups than folds and an empty sample submission are KpipeErrors; a signed storage URL never
reaches a Kaggle error message.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import requests
from rich.console import Console

from conftest import tiny_config, write_competition
from kpipe import cli, paths
from kpipe.config import Config
from kpipe.data import ingest
from kpipe.data.folds import make_folds
from kpipe.errors import KpipeError
from kpipe.io import read_csv_ids, write_csv
from kpipe.kaggle import api
from kpipe.stages import audit, folds, relabel


def _change_train_csv(cfg: Config) -> None:
    """A re-download with one more labelled row (the same images)."""
    csv = paths.data_dir(cfg) / cfg.competition.train_csv
    df = read_csv_ids(csv)
    df.loc[0, "label"] = "dog" if df.loc[0, "label"] != "dog" else "cat"
    df.to_csv(csv, index=False)


def test_fingerprint_follows_the_csv_and_the_image_list(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    first = ingest.fingerprint(cfg)
    assert ingest.fingerprint(cfg) == first
    img = next((paths.data_dir(cfg) / "train").glob("*.png"))
    img.write_bytes(img.read_bytes() + b"\0")  # same name, another size
    second = ingest.fingerprint(cfg)
    assert second != first
    _change_train_csv(cfg)
    assert ingest.fingerprint(cfg) != second


def test_stale_audit_is_refused_by_folds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    summary = audit.run(cfg, workers=1)
    assert summary["train_fingerprint"] == ingest.fingerprint(cfg)
    folds.run(cfg)  # same data: fine
    _change_train_csv(cfg)
    with pytest.raises(KpipeError, match=r"audit.*other training data.*`kpipe audit --comp tiny`"):
        folds.run(cfg)
    audit.run(cfg, workers=1)
    folds.run(cfg)


def test_stale_clean_labels_are_refused_by_folds(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    one = ingest.load_train(cfg).df["id"].iloc[0]
    write_csv(
        paths.relabels_csv(cfg),
        pd.DataFrame(
            [
                {
                    "id": one,
                    "given": "",
                    "suggested": "fox",
                    "score": "",
                    "decision": "accept",
                    "source": "manual",
                }
            ]
        ),
    )
    relabel.run(cfg, apply=True)
    assert paths.clean_labels_source(cfg).is_file()
    folds.run(cfg)
    _change_train_csv(cfg)
    with pytest.raises(
        KpipeError, match=r"labels_clean\.csv.*other training data.*kpipe relabel .*--apply"
    ) as e:
        folds.run(cfg)
    assert "folds.clean_labels=false" in str(e.value)
    folds.run(
        tiny_config(tmp_path, tmp_path / "tiny.yaml", ["folds.clean_labels=false"])
    )  # the way out it names


def test_clean_labels_without_a_record_warn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    one = ingest.load_train(cfg).df["id"].iloc[0]
    write_csv(paths.clean_labels_csv(cfg), pd.DataFrame([{"id": one, "label": "fox", "action": "relabel"}]))
    buf = io.StringIO()
    monkeypatch.setattr("kpipe.console.console", Console(file=buf, width=300))
    folds.run(cfg)
    assert "does not say which training data" in buf.getvalue()


# ------------------------------------------------------------------ messages


def test_fewer_groups_than_folds_is_a_clear_error() -> None:
    df = pd.DataFrame(
        {"id": [f"i{j}" for j in range(12)], "label": ["a", "b", "c"] * 4, "group": ["g0"] * 6 + ["g1"] * 6}
    )
    with pytest.raises(KpipeError, match=r"n_folds=3.*only 2 groups.*Lower folds.n_folds to 2"):
        make_folds(df, 3, 0, "group")


def test_fewer_groups_than_folds_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    comp = write_competition(tmp_path)
    cfg = tiny_config(tmp_path, comp, ["competition.group_col=site"])
    csv = paths.data_dir(cfg) / "train.csv"
    df = read_csv_ids(csv)
    df.assign(site="one").to_csv(csv, index=False)  # every image from one site: one group, two folds
    monkeypatch.setattr(cli, "config_from", lambda args: cfg)
    assert cli.main(["folds"]) == 2
    err = capsys.readouterr().err
    assert "only 1 groups" in err and "Traceback" not in err


def test_empty_sample_submission_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, write_competition(tmp_path))
    (paths.data_dir(cfg) / "sample_submission.csv").write_text("id,label\n")
    with pytest.raises(KpipeError, match="header but no rows"):
        ingest.load_test(cfg)


SIGNED = (
    "https://storage.googleapis.com/kaggle-competitions-data/x/train.zip?GoogleAccessId=web-data%40kaggle"
    "&Expires=1700000000&X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=deadbeefcafe0123"
)


@pytest.mark.parametrize(
    "url",
    [
        SIGNED,
        "https://bucket.s3.amazonaws.com/f.zip?X-Amz-Credential=AKIA&X-Amz-Signature=deadbeefcafe0123",
        "https://example.com/download?file=train.zip&token=deadbeefcafe0123",
        "https://cdn.example.com/f.zip?Expires=1&Signature=deadbeefcafe0123&Key-Pair-Id=K",
    ],
)
def test_signed_urls_never_reach_a_message(url: str) -> None:
    response = requests.Response()
    response.status_code, response.url = 403, url
    error = requests.HTTPError(f"403 Client Error: Forbidden for url: {url}", response=response)

    def download() -> None:
        raise error

    with pytest.raises(api.KaggleError) as e:
        api.call(download, what="downloading train.zip", slug="tiny", backoff=api.Backoff(0.0, tries=1))
    msg = str(e.value)
    assert "deadbeefcafe0123" not in msg and "?<redacted>" in msg, msg
    assert "403" in msg


def test_redact_keeps_ordinary_urls() -> None:
    text = "see https://www.kaggle.com/competitions/tiny/rules?tab=rules and https://x.org/a?page=2"
    assert api.redact(text) == text
